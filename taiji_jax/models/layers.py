"""Small NNX building blocks shared by the models (SASRec, BERT, decoder)."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp


def param(rngs: nnx.Rngs,
          shape,
          axes,
          std: float = 0.02,
          dtype=jnp.float32) -> nnx.Param:
  """A truncated-normal parameter carrying its logical axis names."""
  init = jax.nn.initializers.truncated_normal(std, dtype=dtype)
  return nnx.Param(init(rngs.params(), shape), logical_axes=axes)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis (scale and bias on the `embed` axis).

  The parameter names match Hugging Face's `weight`/`bias` as
  `scale`/`bias`.
  """

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,)), logical_axes=("embed",))
    self.bias = nnx.Param(jnp.zeros((dim,)), logical_axes=("embed",))
    self.eps = eps

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    mean = x_btd.mean(-1, keepdims=True)
    var = jnp.square(x_btd - mean).mean(-1, keepdims=True)
    y = (x_btd - mean) * jax.lax.rsqrt(var + self.eps)
    return y * self.scale[...] + self.bias[...]


class RMSNorm(nnx.Module):
  """Root-mean-square norm over the last axis (Llama / Qwen2 convention).

  Normalises in float32, casts back to the input dtype, then multiplies by
  `scale` (initialised to ones), as Hugging Face's `LlamaRMSNorm` does, so
  imported checkpoints give the same activations in bfloat16 too.
  """

  def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
    self.scale = nnx.Param(
        jnp.ones((dim,), param_dtype), logical_axes=("embed",))
    self.eps = eps

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    x32 = x_btd.astype(jnp.float32)
    var = jnp.square(x32).mean(-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x_btd.dtype)
    return y * self.scale[...].astype(x_btd.dtype)

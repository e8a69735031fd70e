"""Small NNX building blocks shared by the models (SASRec, BERT, ...)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape, axes, std: float = 0.02) -> nnx.Param:
  """A truncated-normal parameter carrying its logical axis names."""
  init = jax.nn.initializers.truncated_normal(std)
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

"""Llama / Qwen2-style decoder-only language model in Flax NNX.

A token embedding, N pre-norm blocks (RMSNorm -> grouped-query attention
with rotary position embeddings -> residual; RMSNorm -> SwiGLU MLP ->
residual), a final RMSNorm and an LM head tied to the embedding or
separate. The layout follows Hugging Face's `LlamaForCausalLM` /
`Qwen2ForCausalLM` (rotate-half RoPE, query head n reads key/value head
n // (num_heads / num_kv_heads), Qwen2's q/k/v biases), so published
checkpoints load weight by weight and give the same logits.

Sequences may be left-padded: `attention_mask_bt` marks real tokens, and
positions are counted over real tokens only, so a padded row gives the same
logits at its real positions as the unpadded sequence. Generation uses a
fixed-size `KVCache` whose every leaf has the batch as leading axis, so a
beam search can reorder rows with `jax.tree.map(lambda x: x[idx], cache)`.

The module is tree-shaped (no shared submodules) and every parameter
carries logical axis names; activations are constrained at block
boundaries, so the same code runs on one CPU or FSDP x tensor-parallel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax
from flax import nnx
import jax
import jax.numpy as jnp

from taiji_jax import sharding
from taiji_jax.models import layers

# Finite, so rows whose keys are all masked (left padding) stay NaN-free.
_NEG_INF = -1e9
_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
_BTD = ("batch", "length", "embed")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Frequency scaling of RoPE for long contexts (Hugging Face semantics).

  Attributes:
    rope_type: "linear" (every frequency divided by `factor`) or "llama3"
      (Llama 3.1+: low frequencies divided by `factor`, high ones kept,
      a smooth interpolation in between).
    factor: context-extension factor.
    low_freq_factor: llama3 only.
    high_freq_factor: llama3 only.
    original_max_position_embeddings: llama3 only; the pre-training context.
  """
  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ("linear", "llama3"):
      raise NotImplementedError(
          f"rope_scaling type {self.rope_type!r} is not supported "
          "(supported: none, 'linear', 'llama3').")
    if self.factor <= 0:
      raise ValueError(f"rope scaling factor must be > 0, got {self.factor}.")
    if (self.rope_type == "llama3" and
        self.high_freq_factor <= self.low_freq_factor):
      raise ValueError("llama3 rope scaling needs high_freq_factor > "
                       "low_freq_factor.")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Hyper-parameters of the decoder.

  Attributes:
    vocab_size: rows V of the token embedding.
    hidden_size: model width D.
    num_layers: Transformer blocks.
    num_heads: query heads N.
    num_kv_heads: key/value heads K (grouped-query attention; N % K == 0).
    intermediate_size: SwiGLU hidden width F.
    head_dim: per-head width H; None means hidden_size // num_heads (it is
      resolved in `__post_init__`, so it is always an int afterwards).
    rope_theta: RoPE base.
    rope_scaling: optional long-context frequency scaling.
    rms_norm_eps: RMSNorm epsilon.
    max_seq_len: longest context the model is meant for (documentation and
      the default cache length; RoPE itself has no limit).
    tie_embeddings: LM head = embedding transposed (else a separate matrix).
    attention_bias: biases on the q/k/v projections (Qwen2: True).
    dtype: activation / compute dtype ("float32" or "bfloat16"); logits,
      softmax, norms and RoPE are computed in float32 regardless.
    param_dtype: storage dtype of the parameters.
    init_std: std of the truncated-normal weight initialisers.
    remat: rematerialise each block in the backward pass (saves activation
      memory for long sequences at the cost of one more forward).
    dropout_rate: dropout on the embeddings and on the attention and MLP
      outputs before each residual add, applied only in calls that pass a
      `dropout_rng` (training); decoding and evaluation never drop. 0 for
      imported pretrained models (as their configs say).
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  head_dim: int | None = None
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  max_seq_len: int = 2048
  tie_embeddings: bool = True
  attention_bias: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02
  remat: bool = False
  dropout_rate: float = 0.0

  def __post_init__(self):
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"hidden_size {self.hidden_size} is not divisible "
                         f"by num_heads {self.num_heads}; set head_dim.")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not divisible by "
                       f"num_kv_heads {self.num_kv_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(
          f"dropout_rate must be in [0, 1), got {self.dropout_rate}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"{name} must be one of {sorted(_DTYPES)}, got "
                         f"{getattr(self, name)!r}.")

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  @classmethod
  def tiny(cls, vocab_size: int = 67, **overrides) -> DecoderConfig:
    """Small, mostly prime dims for fast shape-tracing tests.

    head_dim 6 differs from hidden / heads (28 / 4), as in models that set
    head_dim explicitly, so both code paths are exercised.
    """
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=28,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=6,
        intermediate_size=44,
        max_seq_len=64,
        attention_bias=True)
    return cls(**{**kwargs, **overrides})

  @classmethod
  def small(cls, vocab_size: int = 8192, **overrides) -> DecoderConfig:
    """About 12.6M parameters (vocab 8192): trains on ml-100k on a CPU."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=384,
        num_layers=6,
        num_heads=6,
        num_kv_heads=2,
        intermediate_size=1024,
        max_seq_len=1024)
    return cls(**{**kwargs, **overrides})

  @classmethod
  def qwen2_0_5b(cls, **overrides) -> DecoderConfig:
    """Qwen2-0.5B (494,032,768 parameters, tied embeddings)."""
    kwargs = dict(
        vocab_size=151_936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        max_seq_len=131_072,
        tie_embeddings=True,
        attention_bias=True)
    return cls(**{**kwargs, **overrides})

  @classmethod
  def llama_1b(cls, **overrides) -> DecoderConfig:
    """Llama-3.2-1B (1,235,814,400 parameters, tied embeddings)."""
    kwargs = dict(
        vocab_size=128_256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
        rope_theta=500_000.0,
        rope_scaling=RopeScaling(
            "llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192),
        rms_norm_eps=1e-5,
        max_seq_len=131_072,
        tie_embeddings=True,
        attention_bias=False)
    return cls(**{**kwargs, **overrides})

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> DecoderConfig:
    """Reads a Llama / Qwen2 Hugging Face `config.json` dict.

    Args:
      hf: the parsed config.json.
      **overrides: fields to set on top (e.g. dtype="bfloat16").

    Raises:
      NotImplementedError: another architecture, an activation other than
        SiLU, MLP biases, sliding-window attention, or a rope_scaling type
        other than none / linear / llama3.
    """
    model_type = hf.get("model_type")
    if model_type not in ("llama", "qwen2"):
      raise NotImplementedError(f"model_type {model_type!r} is not supported "
                                "(supported: 'llama', 'qwen2').")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise NotImplementedError(f"hidden_act {act!r} is not supported.")
    if hf.get("mlp_bias", False):
      raise NotImplementedError("mlp_bias=True is not supported.")
    if hf.get("use_sliding_window", False):
      raise NotImplementedError("sliding-window attention is not supported.")
    num_heads = hf["num_attention_heads"]
    rope = _rope_parameters(hf)
    kwargs = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        intermediate_size=hf["intermediate_size"],
        head_dim=hf.get("head_dim"),
        rope_theta=float(rope.get("rope_theta", 10_000.0)),
        rope_scaling=_rope_scaling_from_hf(rope),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=(model_type == "qwen2" or
                        bool(hf.get("attention_bias", False))))
    return cls(**{**kwargs, **overrides})


def _rope_parameters(hf: Mapping[str, Any]) -> Mapping[str, Any]:
  """RoPE base and scaling in one dict, from either config.json format.

  transformers >= 5 writes `rope_parameters` ({"rope_type", "rope_theta",
  scaling fields}); older versions write top-level `rope_theta` and
  `rope_scaling`. Reading only the old keys would silently give a v5
  Qwen2 (theta 1e6) the default theta 1e4.
  """
  if hf.get("rope_parameters"):
    return hf["rope_parameters"]
  params = dict(hf.get("rope_scaling") or {})
  params["rope_theta"] = hf.get("rope_theta", 10_000.0)
  return params


def _rope_scaling_from_hf(spec: Mapping[str, Any] | None) -> RopeScaling | None:
  if not spec:
    return None
  rope_type = spec.get("rope_type", spec.get("type"))
  if rope_type in (None, "default"):
    return None
  if rope_type not in ("linear", "llama3"):
    raise NotImplementedError(
        f"rope_scaling type {rope_type!r} is not supported "
        "(supported: none, 'linear', 'llama3').")
  kwargs = {
      k: spec[k] for k in ("low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings") if k in spec
  }
  return RopeScaling(rope_type, float(spec["factor"]), **kwargs)


# ----------------------------------------------------------------- RoPE ---


def rope_inv_freq(head_dim: int,
                  theta: float,
                  scaling: RopeScaling | None = None) -> jax.Array:
  """Inverse frequencies (H / 2,) of rotary embeddings, float32."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta**exponents)
  if scaling is None:
    return inv_freq
  if scaling.rope_type == "linear":
    return inv_freq / scaling.factor
  # llama3: wavelengths longer than the pre-training context / low factor
  # are stretched by `factor`, shorter than context / high factor are kept.
  old_len = scaling.original_max_position_embeddings
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old_len / low, inv_freq / scaling.factor,
                     inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(medium, smoothed, scaled)


def rope_tables(positions_bt: jax.Array,
                inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each (B, T, H), in the rotate-half layout [f, f]."""
  angles_btf = positions_bt.astype(jnp.float32)[..., None] * inv_freq
  angles_bth = jnp.concatenate([angles_btf, angles_btf], axis=-1)
  return jnp.cos(angles_bth), jnp.sin(angles_bth)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array,
               sin_bth: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin, computed in float32 (HF convention)."""
  x = x_btnh.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_bth[:, :, None] + rotated * sin_bth[:, :, None]
  return out.astype(x_btnh.dtype)


# ---------------------------------------------------------------- cache ---


@flax.struct.dataclass
class KVCache:
  """Fixed-size key/value cache; every leaf has the batch as leading axis.

  Attributes:
    keys: per layer (B, S, K, H) rotated keys.
    values: per layer (B, S, K, H).
    mask: (B, S) bool, slot holds a real (non-padding) token.
    index: (B,) int32, next slot to write (equal across rows unless rows
      were written separately).
    next_position: (B,) int32, RoPE position of the next real token.
  """
  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  mask: jax.Array
  index: jax.Array
  next_position: jax.Array

  @property
  def max_len(self) -> int:
    return self.mask.shape[1]


def init_cache(cfg: DecoderConfig,
               batch_size: int,
               max_len: int | None = None,
               dtype=None) -> KVCache:
  """An empty cache of `max_len` (default cfg.max_seq_len) slots per row."""
  max_len = max_len or cfg.max_seq_len
  dtype = dtype or cfg.compute_dtype
  shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(
      keys=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
      values=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
      mask=jnp.zeros((batch_size, max_len), bool),
      index=jnp.zeros((batch_size,), jnp.int32),
      next_position=jnp.zeros((batch_size,), jnp.int32))


def _write_rows(cache_bs: jax.Array, new_bt: jax.Array,
                index_b: jax.Array) -> jax.Array:
  """Writes new_bt[b] into cache_bs[b, index_b[b]:index_b[b] + T].

  Works for any trailing dims (keys (B, S, K, H), the (B, S) mask).
  """

  def one(cache_s, new_t, index):
    return jax.lax.dynamic_update_slice_in_dim(cache_s, new_t, index, 0)

  return jax.vmap(one)(cache_bs, new_bt.astype(cache_bs.dtype), index_b)


# --------------------------------------------------------------- layers ---


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE (and optional q/k/v biases)."""

  def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
    d, n, k, h = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                  cfg.head_dim)
    std, pd = cfg.init_std, cfg.weight_dtype
    self.w_q = layers.param(rngs, (d, n, h), ("embed", "heads", "kv"), std, pd)
    self.w_k = layers.param(rngs, (d, k, h), ("embed", "kv_heads", "kv"), std,
                            pd)
    self.w_v = layers.param(rngs, (d, k, h), ("embed", "kv_heads", "kv"), std,
                            pd)
    self.w_o = layers.param(rngs, (n, h, d), ("heads", "kv", "embed"), std, pd)
    if cfg.attention_bias:
      self.b_q = nnx.Param(jnp.zeros((n, h), pd), logical_axes=("heads", "kv"))
      self.b_k = nnx.Param(
          jnp.zeros((k, h), pd), logical_axes=("kv_heads", "kv"))
      self.b_v = nnx.Param(
          jnp.zeros((k, h), pd), logical_axes=("kv_heads", "kv"))
    else:
      self.b_q = self.b_k = self.b_v = None

  def _project(self, x_btd, w, b):
    y = jnp.einsum("btd,dnh->btnh", x_btd, w[...].astype(x_btd.dtype))
    return y if b is None else y + b[...].astype(x_btd.dtype)

  def __call__(self,
               x_btd: jax.Array,
               cos_bth: jax.Array,
               sin_bth: jax.Array,
               mask_bts: jax.Array,
               kv: tuple[jax.Array, jax.Array] | None = None,
               index_b: jax.Array | None = None):
    """Attention output (B, T, D) and the updated (keys, values) cache.

    Without `kv` the keys are this call's own T tokens (S = T); with `kv`
    the new keys/values are first written at slots index_b[b] + [0, T).
    `mask_bts` says which key s query t may attend to.
    """
    q_btnh = apply_rope(
        self._project(x_btd, self.w_q, self.b_q), cos_bth, sin_bth)
    k_btkh = apply_rope(
        self._project(x_btd, self.w_k, self.b_k), cos_bth, sin_bth)
    v_btkh = self._project(x_btd, self.w_v, self.b_v)
    q_btnh = sharding.constrain(q_btnh, ("batch", "length", "heads", "kv"))
    if kv is None:
      k_bskh, v_bskh = k_btkh, v_btkh
    else:
      k_bskh = _write_rows(kv[0], k_btkh, index_b)
      v_bskh = _write_rows(kv[1], v_btkh, index_b)
      cache_axes = ("batch", "length", "kv_heads", "kv")
      k_bskh = sharding.constrain(k_bskh, cache_axes)
      v_bskh = sharding.constrain(v_bskh, cache_axes)
      kv = (k_bskh, v_bskh)
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    # Query head n reads key/value head n // G (HF's repeat_kv order).
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    logits_bkgts = jnp.einsum(
        "btkgh,bskh->bkgts",
        q_btkgh,
        k_bskh.astype(q_btkgh.dtype),
        preferred_element_type=jnp.float32) / math.sqrt(h)
    logits_bkgts = jnp.where(mask_bts[:, None, None], logits_bkgts, _NEG_INF)
    probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(x_btd.dtype)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts,
                           v_bskh.astype(x_btd.dtype))
    out_btnh = out_btkgh.reshape(b, t, n, h)
    out_btd = jnp.einsum("btnh,nhd->btd", out_btnh,
                         self.w_o[...].astype(x_btd.dtype))
    return out_btd, kv


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    std, pd = cfg.init_std, cfg.weight_dtype
    self.w_gate = layers.param(rngs, (d, f), ("embed", "mlp"), std, pd)
    self.w_up = layers.param(rngs, (d, f), ("embed", "mlp"), std, pd)
    self.w_down = layers.param(rngs, (f, d), ("mlp", "embed"), std, pd)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    dt = x_btd.dtype
    gate_btf = x_btd @ self.w_gate[...].astype(dt)
    up_btf = x_btd @ self.w_up[...].astype(dt)
    h_btf = sharding.constrain(
        jax.nn.silu(gate_btf) * up_btf, ("batch", "length", "mlp"))
    return h_btf @ self.w_down[...].astype(dt)


class Block(nnx.Module):
  """Pre-norm block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

  def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
    self.attn_norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                    cfg.weight_dtype)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                   cfg.weight_dtype)
    self.mlp = MLP(cfg, rngs)
    self.dropout_rate = cfg.dropout_rate

  def __call__(self,
               x_btd,
               cos_bth,
               sin_bth,
               mask_bts,
               kv=None,
               index_b=None,
               key=None):
    h_btd, kv = self.attn(
        self.attn_norm(x_btd), cos_bth, sin_bth, mask_bts, kv, index_b)
    attn_key, mlp_key = (None, None) if key is None else jax.random.split(key)
    x_btd = x_btd + dropout(h_btd, self.dropout_rate, attn_key)
    x_btd = x_btd + dropout(
        self.mlp(self.mlp_norm(x_btd)), self.dropout_rate, mlp_key)
    return sharding.constrain(x_btd, _BTD), kv


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when `key` is None or `rate` is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _call_block(block, x_btd, cos_bth, sin_bth, mask_bts, kv, index_b, key):
  return block(x_btd, cos_bth, sin_bth, mask_bts, kv, index_b, key)


_remat_block = nnx.remat(_call_block)


def default_positions(attention_mask_bt: jax.Array) -> jax.Array:
  """RoPE positions counting real tokens only: 0 at each row's first."""
  mask = attention_mask_bt.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


class Decoder(nnx.Module):
  """Decoder-only causal language model (Llama / Qwen2 architecture)."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    std, pd = cfg.init_std, cfg.weight_dtype
    self.embed = layers.param(rngs, (cfg.vocab_size, cfg.hidden_size),
                              ("vocab", "embed"), std, pd)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    if cfg.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = layers.param(rngs, (cfg.hidden_size, cfg.vocab_size),
                                  ("embed", "vocab"), std, pd)

  def _rope(self, positions_bt):
    inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta,
                             self.cfg.rope_scaling)
    return rope_tables(positions_bt, inv_freq)

  def _embed(self, tokens_bt):
    x_btd = jnp.take(self.embed[...], tokens_bt, axis=0)
    return sharding.constrain(x_btd.astype(self.cfg.compute_dtype), _BTD)

  def _blocks(self, x_btd, cos_bth, sin_bth, mask_bts, cache=None, key=None):
    run = _remat_block if self.cfg.remat else _call_block
    layer_keys = [None] * len(self.blocks) if key is None else list(
        jax.random.split(key, len(self.blocks)))
    keys, values = [], []
    for i, block in enumerate(self.blocks):
      kv = None if cache is None else (cache.keys[i], cache.values[i])
      index_b = None if cache is None else cache.index
      x_btd, kv = run(block, x_btd, cos_bth, sin_bth, mask_bts, kv, index_b,
                      layer_keys[i])
      if kv is not None:
        keys.append(kv[0])
        values.append(kv[1])
    return self.final_norm(x_btd), keys, values

  def hidden(self,
             tokens_bt: jax.Array,
             positions_bt: jax.Array | None = None,
             attention_mask_bt: jax.Array | None = None,
             dropout_rng: jax.Array | None = None) -> jax.Array:
    """Final hidden states (B, T, D) (after the final norm, before the head).

    Args:
      tokens_bt: (B, T) int token ids.
      positions_bt: (B, T) RoPE positions; default counts real tokens from
        0 (`default_positions`), so left padding does not shift them.
      attention_mask_bt: (B, T), true / 1 at real tokens; default all real.
        Keys at padding are never attended; outputs at padding are
        arbitrary (finite) and should be masked by the caller.
      dropout_rng: a PRNG key for training-time dropout
        (`cfg.dropout_rate`); None (the default) drops nothing.
    """
    b, t = tokens_bt.shape
    if attention_mask_bt is None:
      mask_bt = jnp.ones((b, t), bool)
    else:
      mask_bt = attention_mask_bt.astype(bool)
    if positions_bt is None:
      positions_bt = default_positions(mask_bt)
    cos_bth, sin_bth = self._rope(positions_bt)
    causal_ts = jnp.tril(jnp.ones((t, t), bool))
    mask_bts = causal_ts[None] & mask_bt[:, None, :]
    x_btd = self._embed(tokens_bt)
    block_key = None
    if dropout_rng is not None and self.cfg.dropout_rate > 0:
      embed_key, block_key = jax.random.split(dropout_rng)
      x_btd = dropout(x_btd, self.cfg.dropout_rate, embed_key)
    h_btd, _, _ = self._blocks(x_btd, cos_bth, sin_bth, mask_bts, key=block_key)
    return h_btd

  def logits_from_hidden(self, h_btd: jax.Array) -> jax.Array:
    """LM-head logits (..., V) in float32 from hidden states (..., D)."""
    dt = h_btd.dtype
    if self.lm_head is None:
      w_vd = self.embed[...].astype(dt)
      logits = jnp.einsum(
          "...d,vd->...v", h_btd, w_vd, preferred_element_type=jnp.float32)
    else:
      w_dv = self.lm_head[...].astype(dt)
      logits = jnp.einsum(
          "...d,dv->...v", h_btd, w_dv, preferred_element_type=jnp.float32)
    if logits.ndim == 3:
      logits = sharding.constrain(logits, ("batch", "length", "vocab"))
    return logits

  def __call__(self,
               tokens_bt: jax.Array,
               positions_bt: jax.Array | None = None,
               attention_mask_bt: jax.Array | None = None,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """Next-token logits (B, T, V), float32; see `hidden` for the args."""
    return self.logits_from_hidden(
        self.hidden(tokens_bt, positions_bt, attention_mask_bt, dropout_rng))

  def init_cache(self,
                 batch_size: int,
                 max_len: int | None = None,
                 dtype=None) -> KVCache:
    """An empty `KVCache`; see the module-level `init_cache`."""
    return init_cache(self.cfg, batch_size, max_len, dtype)

  def decode_step(
      self,
      tokens_bt: jax.Array,
      cache: KVCache,
      attention_mask_bt: jax.Array | None = None,
      positions_bt: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Runs T new tokens per row against the cache (prefill or one step).

    Prefill a left-padded prompt batch with its mask, then feed one token
    at a time (mask default all real); under jax.jit each distinct T
    compiles once. Writing past `cache.max_len` is not checked (the write
    clamps), so size the cache for prompt + generated tokens.

    Args:
      tokens_bt: (B, T) token ids; T = 1 for a generation step.
      cache: from `init_cache` or a previous step.
      attention_mask_bt: (B, T) real tokens; padding slots are never
        attended later on.
      positions_bt: (B, T) RoPE positions; default continues each row's
        count of real tokens (`cache.next_position`).

    Returns:
      (logits (B, T, V) float32, updated cache).
    """
    b, t = tokens_bt.shape
    if attention_mask_bt is None:
      mask_bt = jnp.ones((b, t), bool)
    else:
      mask_bt = attention_mask_bt.astype(bool)
    if positions_bt is None:
      positions_bt = (cache.next_position[:, None] + default_positions(mask_bt))
    cache_mask_bs = _write_rows(cache.mask, mask_bt, cache.index)
    slots_s = jnp.arange(cache.max_len)
    query_slots_bt = cache.index[:, None] + jnp.arange(t)
    causal_bts = slots_s[None, None, :] <= query_slots_bt[..., None]
    mask_bts = causal_bts & cache_mask_bs[:, None, :]
    cos_bth, sin_bth = self._rope(positions_bt)
    h_btd, keys, values = self._blocks(
        self._embed(tokens_bt), cos_bth, sin_bth, mask_bts, cache)
    last_real_b = jnp.max(jnp.where(mask_bt, positions_bt, -1), axis=1)
    next_position = jnp.where(
        mask_bt.any(1), last_real_b + 1, cache.next_position)
    new_cache = KVCache(
        keys=tuple(keys),
        values=tuple(values),
        mask=cache_mask_bs,
        index=cache.index + t,
        next_position=next_position.astype(jnp.int32))
    return self.logits_from_hidden(h_btd), new_cache

  def decode_next(self, tokens_b: jax.Array,
                  cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One real token per row -> (next-token logits (B, V), cache).

    The `step_fn(tokens_n, cache)` signature of `taiji_jax.generate`.
    """
    logits_b1v, cache = self.decode_step(tokens_b[:, None], cache)
    return logits_b1v[:, 0], cache


# ------------------------------------------------------ pure functions ---


def next_token_loss(
    logits_btv: jax.Array,
    targets_bt: jax.Array,
    loss_mask_bt: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy over the masked-in target tokens.

  `targets_bt` are already shifted (target t is the token after input t).

  Returns:
    (mean loss over tokens with loss_mask_bt true (all if None), count).
  """
  logits_btv = logits_btv.astype(jnp.float32)
  logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  gold_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], -1)[..., 0]
  if loss_mask_bt is None:
    mask_bt = jnp.ones(targets_bt.shape, jnp.float32)
  else:
    mask_bt = loss_mask_bt.astype(jnp.float32)
  count = mask_bt.sum()
  loss = ((logz_bt - gold_bt) * mask_bt).sum() / jnp.maximum(count, 1.0)
  return loss, count


def abstract_decoder(cfg: DecoderConfig) -> Decoder:
  """The model with ShapeDtypeStruct leaves; allocates nothing."""
  return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(params=0)))


def count_params(cfg: DecoderConfig) -> int:
  """Number of parameters, from shapes only (works for billion-size)."""
  params = nnx.state(abstract_decoder(cfg), nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def init_sharded(cfg: DecoderConfig,
                 mesh: jax.sharding.Mesh,
                 rules: sharding.Rules | None = None,
                 seed: int = 0) -> Decoder:
  """Initialises the model directly into its sharded layout.

  Abstract init -> shardings from the parameters' logical axes -> a jitted
  init with those out_shardings, so no device ever holds the full model.
  """
  graphdef, abstract_state = nnx.split(abstract_decoder(cfg))
  shardings = sharding.tree_shardings(abstract_state, mesh, rules)

  def init():
    return nnx.state(Decoder(cfg, rngs=nnx.Rngs(params=seed)))

  with sharding.use_mesh(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)

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

import math

import flax
from flax import nnx
import jax
import jax.numpy as jnp

from taiji_jax import sharding
from taiji_jax.models import decoder_config
from taiji_jax.models import layers
from taiji_jax.models import rope

# The config and RoPE live in their own modules; these names keep
# `decoder.DecoderConfig`, `decoder.apply_rope`, ... the public API.
DecoderConfig = decoder_config.DecoderConfig
RopeScaling = decoder_config.RopeScaling
apply_rope = rope.apply_rope
rope_inv_freq = rope.rope_inv_freq
rope_tables = rope.rope_tables

# Finite, so rows whose keys are all masked (left padding) stay NaN-free.
_NEG_INF = -1e9
_BTD = ("batch", "length", "embed")

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


def add_lora(decoder: "Decoder", cfg: DecoderConfig,
             rngs: nnx.Rngs) -> "Decoder":
  """Gives `decoder` the low-rank updates `cfg` asks for (in place).

  Each target projection of every block gets an `nnx.LoRA` (A drawn, B
  zero: the model's function is unchanged until B trains); its parameters
  are `nnx.LoRAParam`s, trainable `nnx.Param`s without logical axes (r is
  small: replicated). Called last by `Decoder.__init__`, so the base weights
  are drawn exactly as without LoRA, and on a loaded pretrained model
  (whose cfg then becomes `cfg`).
  """
  decoder.cfg = cfg
  if not cfg.lora_rank:
    return decoder
  d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  f = cfg.intermediate_size
  sizes = {
      "q": (d, n * h), "k": (d, k * h), "v": (d, k * h), "o": (n * h, d),
      "gate": (d, f), "up": (d, f), "down": (f, d)
  }
  for block in decoder.blocks:
    for target, (i, o) in sizes.items():
      if not cfg.lora(target):
        continue
      owner = block.attn if target in ("q", "k", "v", "o") else block.mlp
      owner.lora_scale = cfg.lora_scale
      setattr(owner, f"lora_{target}",
              nnx.LoRA(i, cfg.lora_rank, o, param_dtype=cfg.weight_dtype,
                       rngs=rngs))
  return decoder


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
    # Low-rank updates: set by `add_lora` once the weights exist.
    self.lora_scale = 0.0
    self.lora_q = self.lora_k = self.lora_v = self.lora_o = nnx.data(None)
    if cfg.attention_bias:
      self.b_q = nnx.Param(jnp.zeros((n, h), pd), logical_axes=("heads", "kv"))
      self.b_k = nnx.Param(
          jnp.zeros((k, h), pd), logical_axes=("kv_heads", "kv"))
      self.b_v = nnx.Param(
          jnp.zeros((k, h), pd), logical_axes=("kv_heads", "kv"))
    else:
      self.b_q = self.b_k = self.b_v = None

  def _project(self, x_btd, w, b, lora=None):
    y = jnp.einsum("btd,dnh->btnh", x_btd, w[...].astype(x_btd.dtype))
    if lora is not None:
      y = y + (self.lora_scale * lora(x_btd)).reshape(y.shape).astype(y.dtype)
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
        self._project(x_btd, self.w_q, self.b_q, self.lora_q), cos_bth,
        sin_bth)
    k_btkh = apply_rope(
        self._project(x_btd, self.w_k, self.b_k, self.lora_k), cos_bth,
        sin_bth)
    v_btkh = self._project(x_btd, self.w_v, self.b_v, self.lora_v)
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
    if self.lora_o is not None:
      out_btd = out_btd + (self.lora_scale * self.lora_o(
          out_btnh.reshape(b, t, n * h))).astype(out_btd.dtype)
    return out_btd, kv


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    std, pd = cfg.init_std, cfg.weight_dtype
    self.w_gate = layers.param(rngs, (d, f), ("embed", "mlp"), std, pd)
    self.w_up = layers.param(rngs, (d, f), ("embed", "mlp"), std, pd)
    self.w_down = layers.param(rngs, (f, d), ("mlp", "embed"), std, pd)
    self.lora_scale = 0.0  # and the updates below: `add_lora`
    self.lora_gate = self.lora_up = self.lora_down = nnx.data(None)

  def _linear(self, x, w, lora):
    y = x @ w[...].astype(x.dtype)
    if lora is None:
      return y
    return y + (self.lora_scale * lora(x)).astype(y.dtype)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    gate_btf = self._linear(x_btd, self.w_gate, self.lora_gate)
    up_btf = self._linear(x_btd, self.w_up, self.lora_up)
    h_btf = sharding.constrain(
        jax.nn.silu(gate_btf) * up_btf, ("batch", "length", "mlp"))
    return self._linear(h_btf, self.w_down, self.lora_down)


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


def _real_tokens(tokens_bt: jax.Array,
                 attention_mask_bt: jax.Array | None) -> jax.Array:
  """(B, T) bool mask of real tokens; all real when no mask is given."""
  if attention_mask_bt is None:
    return jnp.ones(tokens_bt.shape, bool)
  return attention_mask_bt.astype(bool)


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
    add_lora(self, cfg, rngs)

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
    t = tokens_bt.shape[1]
    mask_bt = _real_tokens(tokens_bt, attention_mask_bt)
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
    t = tokens_bt.shape[1]
    mask_bt = _real_tokens(tokens_bt, attention_mask_bt)
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

"""SASRec (Kang & McAuley, 2018) in Flax NNX.

A causal Transformer over item-id sequences: item embedding (scaled by
sqrt(d)) plus a learned position embedding, pre-LayerNorm blocks of causal
multi-head self-attention and a GELU feed-forward layer, a final LayerNorm,
and scores = hidden @ item_table^T (tied input/output item embeddings).
Training uses full softmax cross-entropy over all items at every position,
which the literature finds clearly stronger than the original sampled BCE
(Klenitskiy & Vasilev, RecSys 2023; Petrov & Macdonald, gSASRec 2023).

Sequences are right-aligned: the most recent item is at the last position
and item id 0 pads the left. The module is tree-shaped (no shared
submodules); every parameter carries logical axis names for sharding.

The trained model doubles as the collaborative preference reward of the RL
stage through `score(model, histories, items)`.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx
import jax
import jax.numpy as jnp

from taiji_jax import sharding
from taiji_jax.models import layers

_NEG_INF = -1e9


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  """Hyper-parameters of SASRec.

  Attributes:
    num_items: real items; the item table has num_items + 1 rows (0 = pad).
    max_len: sequence length L (positions).
    embed_dim: model width D.
    num_layers: Transformer blocks.
    num_heads: attention heads (embed_dim must be divisible by it).
    mlp_dim: feed-forward hidden width.
    dropout: dropout on embeddings and residual branches.
    attn_dropout: dropout on attention probabilities.
    layer_norm_eps: LayerNorm epsilon.
    init_std: std of the truncated-normal initialisers.
  """
  num_items: int
  max_len: int = 50
  embed_dim: int = 64
  num_layers: int = 2
  num_heads: int = 2
  mlp_dim: int = 256
  dropout: float = 0.2
  attn_dropout: float = 0.2
  layer_norm_eps: float = 1e-6
  init_std: float = 0.02

  def __post_init__(self):
    if self.num_items < 1:
      raise ValueError(f"num_items must be >= 1, got {self.num_items}.")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim {self.embed_dim} is not divisible by "
                       f"num_heads {self.num_heads}.")
    for name in ("dropout", "attn_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got "
                         f"{getattr(self, name)}.")

  @classmethod
  def tiny(cls, num_items: int, max_len: int = 11) -> SASRecConfig:
    """Prime-number dims for fast shape-tracing tests."""
    return cls(
        num_items=num_items,
        max_len=max_len,
        embed_dim=14,
        num_layers=2,
        num_heads=2,
        mlp_dim=22,
        dropout=0.1,
        attn_dropout=0.1)

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with a key padding mask."""

  def __init__(self, cfg: SASRecConfig, rngs: nnx.Rngs):
    d, n, h = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    self.w_qkv = layers.param(rngs, (3, d, n, h),
                              (None, "embed", "heads", "kv"), cfg.init_std)
    self.b_qkv = nnx.Param(
        jnp.zeros((3, n, h)), logical_axes=(None, "heads", "kv"))
    self.w_out = layers.param(rngs, (n, h, d), ("heads", "kv", "embed"),
                              cfg.init_std)
    self.b_out = nnx.Param(jnp.zeros((d,)), logical_axes=("embed",))
    self.attn_dropout = nnx.Dropout(cfg.attn_dropout)

  def __call__(self, x_btd, valid_bt, *, deterministic, rngs):
    qkv = jnp.einsum("btd,sdnh->sbtnh", x_btd, self.w_qkv[...])
    qkv = qkv + self.b_qkv[...][:, None, None]
    q_btnh, k_btnh, v_btnh = qkv[0], qkv[1], qkv[2]
    logits_bnts = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_btnh)
    logits_bnts = logits_bnts / math.sqrt(q_btnh.shape[-1])
    t = x_btd.shape[1]
    causal_ts = jnp.tril(jnp.ones((t, t), bool))
    mask_bts = causal_ts[None] & valid_bt[:, None, :]
    # Padded queries see no valid key; a finite fill keeps them NaN-free and
    # their outputs are zeroed by the caller.
    logits_bnts = jnp.where(mask_bts[:, None], logits_bnts, _NEG_INF)
    probs_bnts = jax.nn.softmax(logits_bnts, axis=-1)
    probs_bnts = self.attn_dropout(
        probs_bnts, deterministic=deterministic, rngs=rngs)
    out_btnh = jnp.einsum("bnts,bsnh->btnh", probs_bnts, v_btnh)
    return jnp.einsum("btnh,nhd->btd", out_btnh,
                      self.w_out[...]) + self.b_out[...]


class FeedForward(nnx.Module):
  """Position-wise two-layer GELU MLP (dropout is applied by the block)."""

  def __init__(self, cfg: SASRecConfig, rngs: nnx.Rngs):
    d, m = cfg.embed_dim, cfg.mlp_dim
    self.w_in = layers.param(rngs, (d, m), ("embed", "mlp"), cfg.init_std)
    self.b_in = nnx.Param(jnp.zeros((m,)), logical_axes=("mlp",))
    self.w_out = layers.param(rngs, (m, d), ("mlp", "embed"), cfg.init_std)
    self.b_out = nnx.Param(jnp.zeros((d,)), logical_axes=("embed",))

  def __call__(self, x_btd):
    h_btm = jax.nn.gelu(x_btd @ self.w_in[...] + self.b_in[...])
    h_btm = sharding.constrain(h_btm, ("batch", "length", "mlp"))
    return h_btm @ self.w_out[...] + self.b_out[...]


class Block(nnx.Module):
  """Pre-LN Transformer block: x + Attn(LN(x)), then x + FFN(LN(x))."""

  def __init__(self, cfg: SASRecConfig, rngs: nnx.Rngs):
    self.ln_attn = layers.LayerNorm(cfg.embed_dim, cfg.layer_norm_eps)
    self.attn = CausalSelfAttention(cfg, rngs)
    self.ln_mlp = layers.LayerNorm(cfg.embed_dim, cfg.layer_norm_eps)
    self.mlp = FeedForward(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x_btd, valid_bt, *, deterministic, rngs):
    h = self.attn(
        self.ln_attn(x_btd), valid_bt, deterministic=deterministic, rngs=rngs)
    x_btd = x_btd + self.dropout(h, deterministic=deterministic, rngs=rngs)
    h = self.mlp(self.ln_mlp(x_btd))
    x_btd = x_btd + self.dropout(h, deterministic=deterministic, rngs=rngs)
    x_btd = x_btd * valid_bt[..., None]
    return sharding.constrain(x_btd, ("batch", "length", "embed"))


class SASRec(nnx.Module):
  """Self-attentive sequential recommender."""

  def __init__(self, cfg: SASRecConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.item_embed = layers.param(rngs, (cfg.num_items + 1, cfg.embed_dim),
                                   ("vocab", "embed"), cfg.init_std)
    self.pos_embed = layers.param(rngs, (cfg.max_len, cfg.embed_dim),
                                  ("length", "embed"), cfg.init_std)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.ln_final = layers.LayerNorm(cfg.embed_dim, cfg.layer_norm_eps)
    self.dropout = nnx.Dropout(cfg.dropout)

  def hidden(self,
             items_bt: jax.Array,
             *,
             deterministic: bool = True,
             rngs: nnx.Rngs | None = None) -> jax.Array:
    """Hidden states (B, L, D) of right-aligned item sequences (B, L)."""
    t = items_bt.shape[1]
    if t > self.cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len "
                       f"{self.cfg.max_len}.")
    valid_bt = items_bt > 0
    table = self.item_embed[...]
    x_btd = jnp.take(table, items_bt, axis=0) * math.sqrt(self.cfg.embed_dim)
    # Right alignment: the last position always has the last position id.
    x_btd = x_btd + self.pos_embed[...][self.cfg.max_len - t:][None]
    x_btd = self.dropout(x_btd, deterministic=deterministic, rngs=rngs)
    x_btd = sharding.constrain(x_btd * valid_bt[..., None],
                               ("batch", "length", "embed"))
    for block in self.blocks:
      x_btd = block(x_btd, valid_bt, deterministic=deterministic, rngs=rngs)
    return self.ln_final(x_btd)

  def __call__(self,
               items_bt: jax.Array,
               *,
               deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Next-item logits (B, L, N + 1) at every position; column 0 = pad."""
    h_btd = self.hidden(items_bt, deterministic=deterministic, rngs=rngs)
    logits_btv = jnp.einsum("btd,vd->btv", h_btd, self.item_embed[...])
    return sharding.constrain(logits_btv, ("batch", "length", "vocab"))

  def score(self,
            histories_bt: jax.Array,
            items: jax.Array | None = None) -> jax.Array:
    """`score(model, histories, items)` as a method; see the function."""
    return score(self, histories_bt, items)


def score(model: SASRec,
          histories_bt: jax.Array,
          items: jax.Array | None = None) -> jax.Array:
  """Preference scores of items for users given their histories.

  Args:
    model: a trained SASRec.
    histories_bt: (B, L) right-aligned, 0-padded item histories.
    items: None for all items -> (B, N + 1) with column 0 the padding item;
      (N,) item ids scored for every user -> (B, N); or (B, N) per-user
      candidate ids -> (B, N).

  Returns:
    Unnormalised scores (logits of the next-item softmax), float32.
  """
  h_bd = model.hidden(histories_bt, deterministic=True)[:, -1]
  table = model.item_embed[...]
  if items is None:
    return h_bd @ table.T
  items = jnp.asarray(items)
  if items.ndim == 1:
    return h_bd @ jnp.take(table, items, axis=0).T
  return jnp.einsum("bd,bnd->bn", h_bd, jnp.take(table, items, axis=0))


def next_item_loss(logits_btv: jax.Array,
                   targets_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy over positions whose target is not 0.

  The padding item (column 0) is excluded from the softmax.

  Returns:
    (mean loss, number of target positions).
  """
  logits_btv = logits_btv.astype(jnp.float32)
  logits_btv = logits_btv.at[..., 0].set(_NEG_INF)
  logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  gold_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], -1)[..., 0]
  mask_bt = (targets_bt > 0).astype(jnp.float32)
  count = mask_bt.sum()
  loss = ((logz_bt - gold_bt) * mask_bt).sum() / jnp.maximum(count, 1.0)
  return loss, count

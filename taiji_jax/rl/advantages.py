"""Group-relative advantages and DAPO's dynamic sampling, fixed shapes.

All functions take flat rollout arrays of N = B * G rows where the G
rollouts of one prompt are adjacent (row n belongs to group n // G), and a
validity vector `valid_n` (> 0: the row counts). Invalid rows never enter a
statistic and get advantage 0; their rewards may be NaN or inf, and are
replaced with `jnp.where` before any arithmetic, so neither the values nor
the gradients of the valid rows can pick them up.

Statistics are shifted by the group's first valid reward before averaging,
so a group whose rewards are all equal has deviations of exactly 0 (and
advantages of exactly 0, never a rounding residue divided by eps).

  group_advantages   GRPO ("std"), Dr. GRPO ("center") or raw ("none");
  gdpo_advantages    GDPO: each reward normalised in its group separately,
                     weighted sum, whitened over the batch;
  group_has_variance which groups carry a learning signal;
  dynamic_sampling   DAPO: pick the informative groups first (fixed count);
  gather_groups      the rows of the picked groups from a pytree.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

KINDS: Sequence[str] = ("std", "center", "none")


def _valid_bool(valid_n: jax.Array) -> jax.Array:
  return jnp.asarray(valid_n) > 0


def _standardise(x_bg: jax.Array, valid_bg: jax.Array, scale: bool,
                 eps: float) -> jax.Array:
  """(x - mean) [/ (std + eps)] over the valid entries of each row.

  `x_bg` must already be finite where invalid. The population std (ddof 0)
  is used; rows with fewer than two distinct valid values give 0.
  """
  cnt_b = jnp.sum(valid_bg, axis=-1).astype(jnp.float32)
  first_b = jnp.argmax(valid_bg, axis=-1)  # 0 when there is no valid entry
  shift_b = jnp.take_along_axis(x_bg, first_b[:, None], axis=-1)
  shifted = jnp.where(valid_bg, x_bg - shift_b, 0.0)
  mean_b = jnp.sum(shifted, axis=-1) / jnp.maximum(cnt_b, 1.0)
  dev_bg = jnp.where(valid_bg, shifted - mean_b[:, None], 0.0)
  if not scale:
    return dev_bg
  var_b = jnp.sum(dev_bg * dev_bg, axis=-1) / jnp.maximum(cnt_b, 1.0)
  # sqrt has an infinite derivative at 0: keep it off that branch.
  positive = var_b > 0
  std_b = jnp.where(positive, jnp.sqrt(jnp.where(positive, var_b, 1.0)), 0.0)
  return jnp.where(valid_bg, dev_bg / (std_b[:, None] + eps), 0.0)


def group_advantages(rewards_n: jax.Array,
                     valid_n: jax.Array,
                     group_size: int,
                     kind: str = "std",
                     eps: float = 1e-6) -> jax.Array:
  """(N,) float32 per-rollout advantages relative to the rollout's group.

  Args:
    rewards_n: (N,) scalar rewards (anything at invalid rows).
    valid_n: (N,) bool or float; > 0 marks rows that count.
    group_size: G, static; N must be a multiple of it.
    kind: "std": GRPO's (r - mean_g) / (std_g + eps); "center": Dr. GRPO's
      r - mean_g (no std, which up-weights easy and hard prompts); "none":
      r itself (for objectives that use rewards directly).
    eps: the std's guard.

  Returns:
    The advantages; 0 at invalid rows, and for "std"/"center" 0 in groups
    whose valid rewards are all equal or that have a single valid row.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown advantage kind {kind!r}; known: {KINDS}.")
  valid = _valid_bool(valid_n)
  rewards = jnp.where(valid, jnp.asarray(rewards_n, jnp.float32), 0.0)
  if kind == "none":
    return rewards
  adv_bg = _standardise(
      rewards.reshape(-1, group_size), valid.reshape(-1, group_size),
      kind == "std", eps)
  return adv_bg.reshape(-1)


def gdpo_advantages(rewards_nk: jax.Array,
                    valid_n: jax.Array,
                    group_size: int,
                    weights_k: jax.Array,
                    eps: float = 1e-6) -> jax.Array:
  """(N,) GDPO advantages (Group reward-Decoupled normalisation, 2601.05242).

  Summing K rewards before the group normalisation lets the reward with the
  largest spread dominate and collapses distinct reward combinations onto
  one advantage. GDPO normalises each column within its group first ("std"
  as in `group_advantages`), takes the weighted sum A = sum_k w_k A_k, and
  whitens A over the valid rows of the whole batch, (A - mean) / (std +
  eps), so its scale does not grow with K.

  Args:
    rewards_nk: (N, K) reward columns (anything at invalid rows).
    valid_n: (N,) > 0 marks rows that count.
    group_size: G, static.
    weights_k: (K,) the columns' weights.
    eps: the std guard of both normalisations.
  """
  valid = _valid_bool(valid_n)
  rewards = jnp.where(valid[:, None], jnp.asarray(rewards_nk, jnp.float32),
                      0.0)
  k = rewards.shape[1]
  per_k = rewards.T.reshape(k, -1, group_size)  # (K, B, G)
  valid_kbg = jnp.broadcast_to(valid.reshape(1, -1, group_size), per_k.shape)
  adv_kbg = _standardise(
      per_k.reshape(-1, group_size), valid_kbg.reshape(-1, group_size), True,
      eps).reshape(per_k.shape)
  weights = jnp.asarray(weights_k, jnp.float32)
  combined_n = jnp.einsum("k,kbg->bg", weights, adv_kbg).reshape(-1)
  combined_n = jnp.where(valid, combined_n, 0.0)
  return _standardise(combined_n[None], valid[None], True, eps)[0]


def group_has_variance(rewards_n: jax.Array,
                       valid_n: jax.Array,
                       group_size: int,
                       tol: float = 1e-8) -> jax.Array:
  """(B,) bool: the group has >= 2 valid rows whose rewards differ by > tol.

  Only such groups give a group-relative learning signal.
  """
  valid_bg = _valid_bool(valid_n).reshape(-1, group_size)
  r_bg = jnp.where(valid_bg, jnp.asarray(rewards_n, jnp.float32).reshape(
      -1, group_size), 0.0)
  hi_b = jnp.max(jnp.where(valid_bg, r_bg, -jnp.inf), axis=-1)
  lo_b = jnp.min(jnp.where(valid_bg, r_bg, jnp.inf), axis=-1)
  enough_b = jnp.sum(valid_bg, axis=-1) >= 2
  spread_b = jnp.where(enough_b, hi_b - lo_b, 0.0)
  return enough_b & (spread_b > tol)


def dynamic_sampling(rewards_n: jax.Array, valid_n: jax.Array,
                     group_size: int,
                     num_groups: int) -> tuple[jax.Array, jax.Array]:
  """DAPO's dynamic sampling with fixed shapes.

  DAPO over-samples prompts and drops the groups whose rewards are all
  equal (zero advantage, no gradient, but they dilute the batch). With
  static shapes we instead pick `num_groups` of the B groups: those with
  variance first, each set in its original order (a stable sort).

  Args:
    rewards_n: (N,) the combined rewards.
    valid_n: (N,) > 0 marks rows that count.
    group_size: G, static.
    num_groups: static, <= B.

  Returns:
    (group_index_b, keep_b): (num_groups,) int32 indices of the picked
    groups and (num_groups,) bool whether each has variance (False when the
    batch held fewer informative groups; the caller masks those out).
  """
  return pick_groups(group_has_variance(rewards_n, valid_n, group_size),
                     num_groups)


def pick_groups(has_var_b: jax.Array,
                num_groups: int) -> tuple[jax.Array, jax.Array]:
  """`dynamic_sampling` given which groups carry a signal, (B,) bool (e.g.
  those where any of several rewards varies)."""
  b = has_var_b.shape[0]
  if not 0 < num_groups <= b:
    raise ValueError(f"dynamic sampling keeps num_groups in [1, {b}], got "
                     f"{num_groups}.")
  order_b = jnp.argsort(jnp.where(has_var_b, 0, 1), stable=True)
  index_b = order_b[:num_groups].astype(jnp.int32)
  return index_b, has_var_b[index_b]


def gather_groups(tree: Any, group_index_b: jax.Array, group_size: int) -> Any:
  """The rows of groups `group_index_b`, in that order, from every leaf.

  Every array leaf with at least one dimension must be (N, ...) with the
  group layout of the module; scalar leaves are kept as they are.
  """
  rows = (group_index_b[:, None] * group_size +
          jnp.arange(group_size)[None]).reshape(-1)
  return jax.tree.map(
      lambda x: jnp.take(x, rows, axis=0) if jnp.ndim(x) >= 1 else x, tree)

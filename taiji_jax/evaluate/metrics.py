"""Full-sort top-k retrieval and leave-one-out ranking metrics.

This file holds the evaluation protocol of RecBole's sequential benchmarks
(`eval_args.mode = 'full'`, one held-out item per user):

* `full_sort_topk` ranks every item of the catalogue for each user, after
  masking the padding item 0 and the items the user has already seen.
* `ranking_metrics` turns the ranked lists into per-user Recall@k, NDCG@k and
  MRR@k against the single held-out target.
* `mean_metrics` averages the per-user values over the valid (non-padding)
  rows on the host, for reporting.

Item ids are 1..N; id 0 is padding everywhere. The two array functions are
pure and jit-able (`k` / `ks` must be static Python values).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_KS = (5, 10, 20)


def _check_ks(ks: Sequence[int], num_slots: int) -> tuple[int, ...]:
  """Validates the cut-offs against the list length `num_slots` (static)."""
  ks = tuple(int(k) for k in ks)
  if not ks:
    raise ValueError("ks must name at least one cut-off.")
  for k in ks:
    if k < 1:
      raise ValueError(f"every k in ks must be >= 1, got k={k}.")
    if k > num_slots:
      raise ValueError(
          f"k={k} exceeds the length K={num_slots} of the top-k lists; "
          f"retrieve at least max(ks)={max(ks)} items.")
  return ks


def ranking_metrics(
    topk_items: jax.Array,
    target: jax.Array,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, jax.Array]:
  """Per-user Recall@k, NDCG@k and MRR@k for one held-out item per user.

  With a single relevant item these equal RecBole's definitions: Recall@k =
  hits / |pos| with |pos| = 1 (i.e. Hit@k), NDCG@k with an ideal DCG of 1,
  and MRR@k = 1 / (rank of the first hit). With `rank` the 1-based position
  of the target in the list:

    recall@k = 1                  if rank <= k else 0
    ndcg@k   = 1 / log2(rank + 1) if rank <= k else 0
    mrr@k    = 1 / rank           if rank <= k else 0

  Only the first occurrence of the target in a row counts: if a row repeats
  the target, `rank` is its first position and the metrics stay <= 1.
  Positions are taken as given (other repeated or padding entries still
  occupy their slots). Slots holding item 0 are padding and never a hit.

  Rows with `target == 0` are padding rows and get 0 for every metric; they
  are not "misses", so callers must drop them (`valid = target > 0`) before
  averaging, e.g. with `mean_metrics(per_user, target > 0)`.

  Args:
    topk_items: (B, K) int, ranked recommendations (best first), ids >= 1,
      0 for an empty slot.
    target: (B,) int, the held-out item of each user; 0 marks a padding row.
    ks: static cut-offs, each in 1..K (a tuple when passed through
      `jax.jit(..., static_argnames="ks")`, or bind it with
      `functools.partial`).

  Returns:
    Dict with keys `recall@k`, `ndcg@k` and `mrr@k` for every k in `ks`,
    each a (B,) float32 array of per-user values.

  Raises:
    ValueError: at trace time, if `ks` is empty or some k is < 1 or > K.
  """
  topk_items = jnp.asarray(topk_items)
  target = jnp.asarray(target)
  if topk_items.ndim != 2 or target.shape != topk_items.shape[:1]:
    raise ValueError(f"expected topk_items (B, K) and target (B,), got "
                     f"{topk_items.shape} and {target.shape}.")
  num_slots = topk_items.shape[1]
  ks = _check_ks(ks, num_slots)

  valid = target > 0  # (B,)
  # Since valid targets are >= 1, a 0 (padding) slot is never a hit.
  hits = (topk_items == target[:, None]) & valid[:, None]  # (B, K)
  positions = jnp.arange(1, num_slots + 1, dtype=jnp.float32)  # (K,)
  # The first occurrence has the smallest position; a miss gets rank K + 1,
  # which is past every cut-off and keeps the divisions below finite.
  rank = jnp.min(
      jnp.where(hits, positions, jnp.float32(num_slots + 1)), axis=-1)  # (B,)
  gain = 1.0 / jnp.log2(rank + 1.0)  # (B,)
  reciprocal = 1.0 / rank  # (B,)

  out = {}
  for k in ks:
    in_k = rank <= k  # (B,)
    out[f"recall@{k}"] = in_k.astype(jnp.float32)
    out[f"ndcg@{k}"] = jnp.where(in_k, gain, 0.0)
    out[f"mrr@{k}"] = jnp.where(in_k, reciprocal, 0.0)
  return out


def full_sort_topk(
    scores: jax.Array,
    seen_items: jax.Array,
    k: int,
) -> tuple[jax.Array, jax.Array]:
  """Top-k items over the whole catalogue, excluding padding and seen items.

  RecBole's full-sort protocol: column 0 (the padding item) and every item in
  `seen_items` get a score of -inf before `jax.lax.top_k`, so they are never
  recommended. The mask is a scatter over (B, S) indices, not a dense
  (B, S, N) comparison. `jax.lax.top_k` is stable, so equal scores are
  ranked toward the lower item id.

  If fewer than k items remain (the user has seen almost everything, or some
  scores are -inf already), the remaining slots hold item 0 with score -inf;
  a masked item is never returned. Scores should otherwise be finite (NaN
  ordering is unspecified).

  Args:
    scores: (B, N + 1) float, a score for every item id 0..N.
    seen_items: (B, S) int, items the user interacted with before, ids in
      0..N, 0-padded; duplicates are fine.
    k: static number of items to return, 1 <= k <= N + 1.

  Returns:
    topk_items: (B, k) int32, item ids best first, 0 for empty slots.
    topk_scores: (B, k), their masked scores (-inf for empty slots), in the
      dtype of `scores` (float32 if `scores` is not floating).

  Raises:
    ValueError: at trace time, on bad shapes or k outside 1..N + 1.
  """
  scores = jnp.asarray(scores)
  seen_items = jnp.asarray(seen_items)
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    scores = scores.astype(jnp.float32)
  if (scores.ndim != 2 or seen_items.ndim != 2 or
      seen_items.shape[0] != scores.shape[0]):
    raise ValueError(f"expected scores (B, N + 1) and seen_items (B, S), got "
                     f"{scores.shape} and {seen_items.shape}.")
  num_columns = scores.shape[1]
  k = int(k)
  if not 1 <= k <= num_columns:
    raise ValueError(
        f"k={k} must be in 1..{num_columns} (the number of item columns, "
        f"padding included).")

  neg_inf = jnp.array(-jnp.inf, dtype=scores.dtype)
  rows = jnp.arange(scores.shape[0])[:, None]  # (B, 1)
  masked = scores.at[:, 0].set(neg_inf)  # (B, N + 1)
  # Seen id 0 re-masks the padding column; duplicates set the same value.
  masked = masked.at[rows, seen_items].set(neg_inf, mode="drop")  # (B, N+1)
  topk_scores, topk_items = jax.lax.top_k(masked, k)  # (B, k), (B, k)
  # Slots past the last unmasked item would hold masked ids: make them 0.
  topk_items = jnp.where(topk_scores == neg_inf, 0,
                         topk_items).astype(jnp.int32)  # (B, k)
  return topk_items, topk_scores


def mean_metrics(
    per_user: Mapping[str, jax.Array | np.ndarray],
    valid_mask: jax.Array | np.ndarray,
) -> dict[str, float]:
  """Averages per-user metrics over the valid rows, on the host.

  Args:
    per_user: name -> (B,) per-user values, e.g. from `ranking_metrics`.
    valid_mask: (B,) bool, True for the rows to average (usually
      `target > 0`).

  Returns:
    name -> mean over the valid rows as a Python float (NaN if no row is
    valid).

  Raises:
    ValueError: if a value's shape differs from the mask's.
  """
  mask = np.asarray(jax.device_get(valid_mask)).astype(bool)  # (B,)
  count = int(mask.sum())
  out = {}
  for name, values in per_user.items():
    values = np.asarray(jax.device_get(values), dtype=np.float64)  # (B,)
    if values.shape != mask.shape:
      raise ValueError(
          f"{name!r} has shape {values.shape}, valid_mask has {mask.shape}.")
    out[name] = float(values[mask].sum() / count) if count else float("nan")
  return out

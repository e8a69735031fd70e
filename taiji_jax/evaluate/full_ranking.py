"""Full-ranking evaluation of a scoring function on a leave-one-out split.

Every user's target is ranked against *all* items (no sampled negatives).
Item 0 (padding) is never recommended. With `mask_history=True` (default)
every item the user interacted with before the target is masked out, which is
what a deployed recommender does and what the generative models of this
codebase do (their beam search cannot emit history items), so both families
are compared on the same candidate set. RecBole's sequential full-sort
evaluation does not mask history; `mask_history=False` reproduces it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from taiji_jax.data import pipeline
from taiji_jax.evaluate import metrics

ScoreFn = Callable[[jax.Array], jax.Array]  # histories (B, L) -> (B, N + 1)


def make_eval_step(score_fn: Callable, ks: Sequence[int], mask_history: bool):
  """Returns a jittable (params, batch) -> per-user metric dict."""
  ks = tuple(sorted(ks))

  def eval_step(params, batch):
    scores_bv = score_fn(params, batch["histories"])
    seen_bs = batch["seen_items"]
    if not mask_history:
      seen_bs = jnp.zeros_like(seen_bs[:, :1])
    topk_bk, _ = metrics.full_sort_topk(scores_bv, seen_bs, k=max(ks))
    return metrics.ranking_metrics(topk_bk, batch["targets"], ks)

  return eval_step


def evaluate(eval_step: Callable,
             params,
             split: dict[str, np.ndarray],
             batch_size: int,
             put: Callable = lambda b: b) -> dict[str, float]:
  """Averages per-user metrics over a split (padding rows excluded).

  Args:
    eval_step: jitted (params, batch) -> {metric: (B,)}.
    params: model parameters.
    split: a `Dataset.split_leave_one_out` part ("valid" or "test").
    batch_size: users per batch.
    put: moves a host batch to devices (e.g. with a data sharding).

  Returns:
    metric name -> mean over the split's users, plus "num_users".
  """
  per_user: dict[str, list[np.ndarray]] = {}
  masks = []
  for batch in pipeline.eval_batches(split, batch_size):
    masks.append(batch.pop("valid"))
    for name, values in jax.device_get(eval_step(params, put(batch))).items():
      per_user.setdefault(name, []).append(np.asarray(values))
  mask = np.concatenate(masks) if masks else np.zeros((0,), bool)
  if not mask.any():
    raise ValueError("the split has no users to evaluate.")
  out = metrics.mean_metrics(
      {
          name: np.concatenate(chunks) for name, chunks in per_user.items()
      }, mask)
  out = dict(sorted(out.items()))
  out["num_users"] = int(mask.sum())
  return out

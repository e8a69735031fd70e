"""Held-out judges of the RL stage's recommendations: models that are not the
rewards.

The policy is trained to raise its rewards, so a rise in
`reward/semantic@1` or `reward/preference@1` can be reward hacking (an item
the reward models over-rate, like the hub items the README shows). The
judges score the same recommended items with models the policy never saw:

  semantic    cosine of the answer and target items' embeddings by another
              text encoder (default SmolLM2-135M-Instruct, a causal LM
              read PromptEOL-style, `text.encoder.load_lm_encoder`; the
              reward uses all-MiniLM-L6-v2). Decoder states share a large
              common direction, so the embeddings
              are centred over the catalogue before normalising
              (`centred_rows`); 0 is then "as related as a random item".
  preference  item-kNN (Sarwar et al., 2001), a collaborative model of
              another family than the reward's SASRec (which also made the
              SIDs' collaborative part): sim(i, j) is the cosine of items i
              and j over the users of the *training* split (each user's
              sequence without its valid and test items), each item keeping
              its `neighbours` most similar items; a user's score of item i
              is sum_{j in history} sim(j, i), min-max normalised over the
              items the user has not seen, exactly as the preference reward
              normalises SASRec's scores (1 = the judge's favourite).

Both are pure functions of their tables (built once on the host, passed to
the jitted evaluation); `judge_metrics` gives `judge/semantic@k` and
`judge/preference@k` per user. Genre accuracy (`label_acc@1`, no model at
all) is the third held-out measure, computed by the SFT evaluation.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from taiji_jax.rl import rewards as rewards_lib

JUDGES = ("semantic", "preference")
# The item-kNN table is dense (I + 1)^2 float32.
MAX_KNN_ITEMS = 20_000


def centred_rows(x_nd: np.ndarray) -> np.ndarray:
  """(N + 1, D): a zero row 0 above the rows of x centred over the N rows
  and L2-normalised."""
  x = np.asarray(x_nd, np.float64)
  x = x - x.mean(0, keepdims=True)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return np.concatenate([np.zeros((1, x.shape[1])), x]).astype(np.float32)


def item_knn(sequences: Sequence[Sequence[int]], num_items: int,
             neighbours: int = 100, shrink: float = 0.0) -> np.ndarray:
  """(I + 1, I + 1) float32 item-item cosine over users, row/column 0 zero.

  Args:
    sequences: per user, the item ids (1..I) of the training split.
    num_items: I.
    neighbours: each row keeps its this many largest similarities (0: all).
    shrink: added to the denominator (damps pairs with few co-users).

  Raises:
    ValueError: an item id outside 1..num_items (its user is named), or a
      catalogue too large for the dense table.
  """
  if num_items > MAX_KNN_ITEMS:
    raise ValueError(f"the item-kNN judge holds a dense ({num_items} + 1)^2 "
                     f"table; {num_items} items exceed {MAX_KNN_ITEMS}.")
  x_ui = np.zeros((len(sequences), num_items + 1), np.float32)
  for u, seq in enumerate(sequences):
    seq = np.asarray(seq, np.int64)
    if len(seq) and (seq.min() < 1 or seq.max() > num_items):
      raise ValueError(f"training sequence {u} has item ids outside "
                       f"1..{num_items}: {seq[(seq < 1) | (seq > num_items)]}")
    x_ui[u, seq] = 1.0
  co_ii = x_ui.T @ x_ui
  norm_i = np.sqrt(np.diag(co_ii))
  sim = co_ii / (norm_i[:, None] * norm_i[None, :] + shrink + 1e-12)
  np.fill_diagonal(sim, 0.0)
  sim[0], sim[:, 0] = 0.0, 0.0
  if neighbours and neighbours < num_items:
    cut = np.partition(sim, -neighbours, axis=1)[:, -neighbours][:, None]
    sim = np.where(sim >= cut, sim, 0.0)
  return sim.astype(np.float32)


def knn_scores(sim_vv: jax.Array, seen_bh: jax.Array) -> jax.Array:
  """(B, V) item-kNN scores of every item for users with histories
  `seen_bh` (0-padded; repeated items count once)."""
  b, v = seen_bh.shape[0], sim_vv.shape[0]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], seen_bh.shape)
  hist_bv = jnp.zeros((b, v), sim_vv.dtype).at[rows, seen_bh].set(1.0)
  hist_bv = hist_bv.at[:, 0].set(0.0)
  return hist_bv @ sim_vv


def judge_metrics(tables, items_bj: jax.Array, targets_b: jax.Array,
                  seen_bh: jax.Array, names: Sequence[str] = JUDGES,
                  ks: Sequence[int] = (1, 10)) -> dict[str, jax.Array]:
  """Per-user judge scores of ranked items: `judge/<name>@k`, (B,) each.

  Args:
    tables: {"judge_item_embeddings": (V, D) from `centred_rows`,
      "judge_item_knn": (V, V) from `item_knn`}, those the names need.
    items_bj: (B, J) ranked items (0 = none: scores 0, as the rewards).
    targets_b: (B,) target items.
    seen_bh: (B, H) the users' histories (the preference judge's input and
      the items it does not normalise over).
    names: the judges to compute.
    ks: cut-offs <= J; `@k` is the mean over the top k.
  """
  out = {}
  per_item = {}
  answered = items_bj > 0
  if "semantic" in names:
    emb_vd = tables["judge_item_embeddings"]
    cos = jnp.einsum("bjd,bd->bj", emb_vd[items_bj], emb_vd[targets_b])
    per_item["semantic"] = cos
  if "preference" in names:
    scores_bv = knn_scores(tables["judge_item_knn"], seen_bh)
    mask_bv = rewards_lib.candidate_mask(scores_bv.shape[0],
                                         scores_bv.shape[1] - 1, seen_bh)
    per_item["preference"] = jax.vmap(
        rewards_lib.minmax_scores, in_axes=(None, None, 1),
        out_axes=1)(scores_bv, mask_bv, items_bj)
  for name, s_bj in per_item.items():
    s_bj = jnp.where(answered, s_bj, 0.0).astype(jnp.float32)
    for k in ks:
      out[f"judge/{name}@{k}"] = s_bj[:, :k].mean(1)
  return out

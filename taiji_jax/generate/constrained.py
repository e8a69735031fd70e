"""Trie-constrained decoding of semantic IDs: beam search and sampling.

Every output is a real item: at level l only the tokens that continue the
beam's prefix in the `SemanticIds` trie are allowed (the logits of all other
tokens, text and SID alike, are -inf), and at the last level the user's
history items can be excluded as well. Peers mask by post-filtering or with a
host-side prefix function; here the constraint is part of the jitted graph,
so it cannot be silently skipped by a sampling setting.

The model is abstract: a `step_fn(tokens_n, cache) -> (logits_nv, cache)`
that consumes one token per row and returns the next-token logits over the
full vocabulary, with `cache` a pytree whose leaves with leading dimension n
are per-row (they are gathered when beams are reordered; other leaves, e.g. a
shared write index, are kept). SID token ids are `level_offsets[l] + code`
(see `taiji_jax.text.vocab`).

Scores are the model's log-probabilities of the SID tokens normalised over
the *whole* vocabulary (not renormalised over the allowed set), so they are
comparable across items and equal to the sequence log-likelihood.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from taiji_jax.quantize import semantic_ids as sid_lib

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]
NEG_INF = -1e30


class Decoded(NamedTuple):
  """Top items per prompt.

  Attributes:
    items: (B, K) int32 item ids, best first; 0 where fewer than K valid
      items exist (the score is then -inf).
    scores: (B, K) float32 log p(SID | prompt).
    codes: (B, K, L) int32 the SIDs.
  """
  items: jax.Array
  scores: jax.Array
  codes: jax.Array


def reorder_cache(cache: Any, index: jax.Array, num_rows: int) -> Any:
  """Gathers rows `index` of every per-row leaf (leading dim == num_rows).

  Other leaves (scalars, shared tables) are kept as they are.
  """
  return jax.tree.map(
      lambda x: x[index]
      if getattr(x, "ndim", 0) >= 1 and x.shape[0] == num_rows else x, cache)


def _level_logprobs(logits_nv: jax.Array,
                    offset: int,
                    size: int,
                    temperature: float = 1.0) -> jax.Array:
  """(N, K) log-probs of the level's SID tokens under the full softmax."""
  logp_nv = jax.nn.log_softmax(
      logits_nv.astype(jnp.float32) / temperature, axis=-1)
  return jax.lax.dynamic_slice_in_dim(logp_nv, offset, size, axis=1)


def exclusion_paths(paths_il: jax.Array, exclude_bh: jax.Array) -> jax.Array:
  """(B, H, L) trie nodes on the paths of the distinct items to exclude.

  `paths_il` is `SemanticIds.paths`; padding (0) and repeated ids map to -1
  so that each excluded item is counted once.
  """
  items = jnp.sort(exclude_bh, axis=-1)
  repeated = jnp.concatenate(
      [jnp.zeros_like(items[:, :1], bool), items[:, 1:] == items[:, :-1]], -1)
  items = jnp.where(repeated | (items <= 0), 0, items)
  return jnp.take(paths_il, items, axis=0)  # row 0 of paths is all -1


def _allowed(trie, l, node_n, excluded_nhl):
  """(N, K_l) allowed tokens at level l and the child each one reaches.

  A token is allowed when it continues the prefix in the trie and, if items
  are excluded, its subtree still holds an item that is not: the number of
  excluded items whose path passes through the child is below the child's
  item count. So beams never enter a prefix whose items are all excluded.
  """
  children_nk, leaves_nk = sid_lib.trie_children(trie[l], node_n)
  mask = children_nk >= 0
  if excluded_nhl is not None:
    through = excluded_nhl[:, None, :, l] == children_nk[:, :, None]
    mask = mask & (jnp.sum(through, -1) < leaves_nk)
  return mask, children_nk


def _excluded(exclude_bh, paths, rows=None):
  if exclude_bh is None:
    return None
  if paths is None:
    raise ValueError("excluding items needs `paths` (SemanticIds.paths)")
  out = exclusion_paths(jnp.asarray(paths), exclude_bh)
  return out if rows is None else out[rows]


def beam_search(step_fn: StepFn,
                first_logits_bv: jax.Array,
                cache: Any,
                trie: Sequence[sid_lib.TrieLevel],
                level_offsets: Sequence[int],
                num_beams: int,
                exclude_bh: jax.Array | None = None,
                paths: jax.Array | None = None) -> Decoded:
  """Constrained beam search over SIDs; returns the `num_beams` best items.

  Args:
    step_fn: the model (module docstring); called L - 1 times on B * W rows.
    first_logits_bv: (B, V) logits for the first SID token (the output of
      the prompt's prefill).
    cache: the model state after the prompt, rows = B (it is repeated to
      B * W rows here, each prompt's beams adjacent).
    trie: `SemanticIds.trie`.
    level_offsets: token id of code 0 of each level.
    num_beams: W, also the number of items returned.
    exclude_bh: (B, H) item ids never to return (the user's history; 0 =
      padding, ignored), or None.
    paths: `SemanticIds.paths`, required with `exclude_bh`.

  Returns:
    `Decoded` with (B, W) items sorted by score. Items are distinct.
  """
  b = first_logits_bv.shape[0]
  w = num_beams
  levels = len(trie)
  n = b * w
  rows = jnp.repeat(jnp.arange(b), w)
  cache = reorder_cache(cache, rows, b)
  logits_nv = first_logits_bv[rows]
  excluded_nhl = _excluded(exclude_bh, paths, rows)
  # Only beam 0 of each prompt is live at the start (all are identical).
  score_bw = jnp.where(jnp.arange(w) == 0, 0.0, NEG_INF)[None].repeat(b, 0)
  node_n = jnp.zeros((n,), jnp.int32)
  codes_bwl = jnp.zeros((b, w, levels), jnp.int32)
  items_bw = jnp.zeros((b, w), jnp.int32)
  for l in range(levels):
    k = trie[l].vocab_size
    logp_nk = _level_logprobs(logits_nv, level_offsets[l], k)
    mask_nk, items_nk = _allowed(trie, l, node_n, excluded_nhl)
    cand = jnp.where(mask_nk, logp_nk, NEG_INF).reshape(b, w, k)
    cand = jnp.where(score_bw[:, :, None] > NEG_INF / 2,
                     score_bw[:, :, None] + cand, NEG_INF)
    top_score, top_idx = jax.lax.top_k(cand.reshape(b, w * k), w)
    parent_bw, token_bw = top_idx // k, top_idx % k
    flat_parent = (jnp.arange(b)[:, None] * w + parent_bw).reshape(-1)
    score_bw = jnp.where(top_score > NEG_INF / 2, top_score, NEG_INF)
    codes_bwl = jnp.take_along_axis(codes_bwl, parent_bw[:, :, None], axis=1)
    codes_bwl = codes_bwl.at[:, :, l].set(token_bw)
    child_n = items_nk[flat_parent, token_bw.reshape(-1)]
    if l + 1 < levels:
      node_n = jnp.maximum(child_n, 0)  # dead beams park on node 0
      cache = reorder_cache(cache, flat_parent, n)
      logits_nv, cache = step_fn(
          (token_bw.reshape(-1) + level_offsets[l]).astype(jnp.int32), cache)
    else:
      items_bw = child_n.reshape(b, w)
  valid = score_bw > NEG_INF / 2
  return Decoded(
      items=jnp.where(valid, items_bw, 0),
      scores=jnp.where(valid, score_bw, -jnp.inf),
      codes=codes_bwl)


def sample(step_fn: StepFn,
           first_logits_bv: jax.Array,
           cache: Any,
           trie: Sequence[sid_lib.TrieLevel],
           level_offsets: Sequence[int],
           key: jax.Array,
           temperature: float = 1.0,
           exclude_bh: jax.Array | None = None,
           paths: jax.Array | None = None) -> Decoded:
  """Constrained temperature sampling of one SID per row (RL rollouts).

  Each level samples from softmax(logits / temperature) restricted to the
  trie's allowed tokens (history items excluded at the last level). Returns
  `Decoded` with K = 1; `scores` are the log-probabilities under the
  temperature-1 model (what a policy-gradient loss needs), not the sampling
  distribution. Since excluded subtrees are masked at every level, a row
  only fails (item 0, score -inf) when every item is excluded.
  """
  b = first_logits_bv.shape[0]
  levels = len(trie)
  excluded_bhl = _excluded(exclude_bh, paths)
  logits_bv = first_logits_bv
  node_b = jnp.zeros((b,), jnp.int32)
  score_b = jnp.zeros((b,), jnp.float32)
  alive_b = jnp.ones((b,), bool)
  codes = []
  items_b = jnp.zeros((b,), jnp.int32)
  for l in range(levels):
    k = trie[l].vocab_size
    key, sub = jax.random.split(key)
    mask_bk, items_bk = _allowed(trie, l, node_b, excluded_bhl)
    alive_b = alive_b & mask_bk.any(-1)
    sample_logp = _level_logprobs(logits_bv, level_offsets[l], k, temperature)
    token_b = jax.random.categorical(
        sub, jnp.where(mask_bk, sample_logp, NEG_INF), axis=-1)
    logp_bk = _level_logprobs(logits_bv, level_offsets[l], k)
    score_b = score_b + jnp.take_along_axis(
        logp_bk, token_b[:, None], axis=1)[:, 0]
    codes.append(token_b)
    child_b = jnp.take_along_axis(items_bk, token_b[:, None], axis=1)[:, 0]
    if l + 1 < levels:
      node_b = jnp.maximum(child_b, 0)
      logits_bv, cache = step_fn((token_b + level_offsets[l]).astype(jnp.int32),
                                 cache)
    else:
      items_b = child_b
  return Decoded(
      items=jnp.where(alive_b, items_b, 0)[:, None],
      scores=jnp.where(alive_b, score_b, -jnp.inf)[:, None],
      codes=jnp.stack(codes, -1)[:, None])


def allowed_masks(trie: Sequence[sid_lib.TrieLevel],
                  codes_nl: jax.Array,
                  exclude_bh: jax.Array | None = None,
                  paths: jax.Array | None = None) -> tuple[jax.Array, ...]:
  """The allowed tokens at every level along given SIDs: L arrays (N, K_l).

  Replays `codes_nl` through the trie with the masks of `sample` and
  `beam_search` (trie continuation, excluded subtrees removed), so a policy
  loss can renormalise the model's distribution over exactly the set the
  constrained decoder chose from. Rows whose codes leave the trie get
  all-False masks from that level on.
  """
  excluded_nhl = _excluded(exclude_bh, paths)
  node_n = jnp.zeros(codes_nl.shape[:1], jnp.int32)
  alive_n = jnp.ones(codes_nl.shape[:1], bool)
  masks = []
  for l in range(len(trie)):
    mask_nk, child_nk = _allowed(trie, l, node_n, excluded_nhl)
    masks.append(mask_nk & alive_n[:, None])
    child_n = jnp.take_along_axis(child_nk, codes_nl[:, l:l + 1], axis=1)[:, 0]
    alive_n = alive_n & (child_n >= 0)
    node_n = jnp.maximum(child_n, 0)
  return tuple(masks)

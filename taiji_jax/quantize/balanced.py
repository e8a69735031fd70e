"""Capacity-constrained (balanced) assignment of points to centroids.

OneRec-style balanced clusters: the greedy matching by sorted (point,
cluster) distance, computed in parallel as a deferred-acceptance
(Gale-Shapley) matching over each point's `candidates` nearest clusters,
then a closing pass for points whose candidates are all full. Pure and
jit-able; re-exported by `kmeans`.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from taiji_jax.quantize.distances import as_float
from taiji_jax.quantize.distances import check_matrix
from taiji_jax.quantize.distances import DEFAULT_CHUNK
from taiji_jax.quantize.distances import is_concrete
from taiji_jax.quantize.distances import map_row_blocks
from taiji_jax.quantize.distances import pairwise_sq_dists

# Candidate clusters per point that `balanced_assign` ranks exactly.
DEFAULT_CANDIDATES = 32


def _rank_within_groups(group_n: jax.Array, dist_n: jax.Array,
                        num_groups: int) -> jax.Array:
  """Rank of each element inside its group, by (dist, index) ascending."""
  n = group_n.shape[0]
  idx_n = jnp.arange(n, dtype=jnp.int32)
  order_n = jnp.lexsort((idx_n, dist_n, group_n))
  group_sorted_n = group_n[order_n]
  counts_g = jnp.bincount(group_n, length=num_groups)
  starts_g = jnp.cumsum(counts_g) - counts_g
  rank_sorted_n = idx_n - starts_g[group_sorted_n].astype(jnp.int32)
  return jnp.zeros((n,), jnp.int32).at[order_n].set(rank_sorted_n)


def _accept(target_n, dist_n, active_n, cap_k):
  """Each cluster keeps its `cap_k` closest active proposers."""
  k = cap_k.shape[0]
  group_n = jnp.where(active_n, target_n, k)  # Inactive: sentinel group k.
  rank_n = _rank_within_groups(group_n, dist_n, k + 1)
  cap_ext = jnp.concatenate([cap_k, jnp.zeros((1,), cap_k.dtype)])
  return active_n & (rank_n < cap_ext[group_n])


def default_capacity(n: int, k: int) -> int:
  """Per-cluster capacity of a balanced assignment: ceil(N / K)."""
  return -(-n // k)


def check_capacity(capacity, k: int, n: int) -> None:
  if is_concrete(capacity) and int(capacity) * k < n:
    raise ValueError(f"capacity {int(capacity)} x K={k} clusters cannot hold "
                     f"N={n} points.")


def balanced_assign(x_nd: jax.Array,
                    c_kd: jax.Array,
                    capacity: int | jax.Array | None = None,
                    candidates: int = DEFAULT_CANDIDATES,
                    chunk: int = DEFAULT_CHUNK,
                    max_rounds: int = 512) -> tuple[jax.Array, jax.Array]:
  """Capacity-constrained assignment: no cluster gets more than `capacity`.

  The target is the greedy matching by sorted (point, cluster) distance:
  walk all pairs from the closest up and take a pair when the point is still
  free and the cluster still has room. When both sides rank partners by the
  same pair distance that matching is the unique stable matching, so it is
  computed in parallel by point-proposing deferred acceptance (Gale-Shapley
  with capacities): every free point proposes to its next-closest cluster,
  every cluster keeps its `capacity` closest proposers and rejects the rest,
  until nobody is rejected. Each round is one sort of N keys.

  To keep memory at N * candidates, points rank only their `candidates`
  nearest clusters (found in row blocks like `assign`); with
  candidates >= K the result is exactly the greedy matching. Points rejected
  by all their candidates (or still free after `max_rounds`) are placed by
  "closing rounds": each proposes to its nearest cluster that still has
  room, each such cluster keeps its closest proposers up to its remaining
  room, so every round fills a cluster or places everyone (<= K rounds).

  Args:
    x_nd: (N, D) points.
    c_kd: (K, D) centroids.
    capacity: max points per cluster (an int, or a traced int scalar);
      default ceil(N / K). A concrete capacity must satisfy K * capacity >=
      N; with a traced one that is too small the unplaced points get -1.
    candidates: nearest clusters each point ranks exactly (static).
    chunk: rows per block of the distance computations.
    max_rounds: cap on deferred-acceptance rounds (the rest go to the
      closing rounds).

  Returns:
    codes_n: (N,) int32 assigned cluster.
    sq_dist_n: (N,) squared distance to the assigned centroid.
  """
  x_nd, c_kd = as_float(x_nd), as_float(c_kd)
  check_matrix("x_nd", x_nd)
  check_matrix("c_kd", c_kd)
  n, k = x_nd.shape[0], c_kd.shape[0]
  if capacity is None:
    capacity = default_capacity(n, k)
  check_capacity(capacity, k, n)
  return _balanced_assign(
      x_nd,
      c_kd,
      jnp.asarray(capacity, jnp.int32),
      jnp.asarray(max_rounds, jnp.int32),
      candidates=int(candidates),
      chunk=int(chunk))


@functools.partial(jax.jit, static_argnames=("candidates", "chunk"))
def _balanced_assign(x_nd, c_kd, cap, max_rounds, *, candidates, chunk):
  """`balanced_assign` with capacity and round cap as traced scalars."""
  n, k = x_nd.shape[0], c_kd.shape[0]
  m = max(1, min(int(candidates), k))

  def top_m(xb_cd):
    neg_d_cm, idx_cm = lax.top_k(-pairwise_sq_dists(xb_cd, c_kd), m)
    return idx_cm.astype(jnp.int32), -neg_d_cm

  cand_nm, cand_d_nm = map_row_blocks(top_m, x_nd, chunk)
  cap_k = jnp.full((k,), cap, jnp.int32)
  rows_n = jnp.arange(n)

  def current(ptr_n):
    col_n = jnp.minimum(ptr_n, m - 1)
    return cand_nm[rows_n, col_n], cand_d_nm[rows_n, col_n], ptr_n < m

  def da_cond(state):
    _, rejected_any, rounds = state
    return rejected_any & (rounds < max_rounds)

  later_m = jnp.arange(m, dtype=jnp.int32)

  def da_body(state):
    ptr_n, _, rounds = state
    target_n, dist_n, active_n = current(ptr_n)
    held_n = _accept(target_n, dist_n, active_n, cap_k)
    rejected_n = active_n & ~held_n
    # A full cluster only ever trades up, so its worst held distance never
    # grows: a rejected point skips every candidate that is full with
    # closer points already (it would be rejected there too). This cuts the
    # rounds from the candidate depth to the length of the displacement
    # chains without changing the outcome.
    held_count_k = jnp.bincount(
        target_n, weights=held_n.astype(jnp.int32), length=k)
    worst_k = jax.ops.segment_max(
        jnp.where(held_n, dist_n, -jnp.inf), target_n, k)
    bar_k = jnp.where(held_count_k >= cap_k, worst_k, jnp.inf)
    viable_nm = ((later_m[None, :] > ptr_n[:, None]) &
                 (cand_d_nm <= bar_k[cand_nm]))
    next_n = jnp.where(
        viable_nm.any(axis=1),
        jnp.argmax(viable_nm, axis=1).astype(jnp.int32), m)
    ptr_n = jnp.where(rejected_n, next_n, ptr_n)
    return ptr_n, jnp.any(rejected_n), rounds + 1

  ptr_n, _, _ = lax.while_loop(da_cond, da_body, (jnp.zeros(
      (n,), jnp.int32), jnp.array(True), 0))
  target_n, dist_n, active_n = current(ptr_n)
  held_n = _accept(target_n, dist_n, active_n, cap_k)
  codes_n = jnp.where(held_n, target_n, -1)
  d2_n = jnp.where(held_n, dist_n, 0.0)
  room_k = cap_k - jnp.bincount(
      target_n, weights=held_n.astype(jnp.int32), length=k).astype(jnp.int32)

  # Closing rounds for the points the candidate lists could not place.
  # Only their rows are scored: the free points are moved to the front of
  # an index order and just the blocks that hold them are computed, so a
  # round costs in proportion to the points still free.
  block = min(int(chunk), n)

  def close_cond(state):
    codes_n, _, _, rounds = state
    return jnp.any(codes_n < 0) & (rounds <= k)

  def close_body(state):
    codes_n, d2_n, room_k, rounds = state
    bias_k = jnp.where(room_k > 0, 0.0, jnp.inf)
    free_n = codes_n < 0
    order_n = jnp.argsort(~free_n, stable=True)
    num_blocks = (jnp.sum(free_n) + block - 1) // block

    def score_block(b, carry):
      best_n, best_d_n = carry
      start = jnp.minimum(b * block, n - block)
      rows_c = lax.dynamic_slice_in_dim(order_n, start, block)
      d_ck = pairwise_sq_dists(x_nd[rows_c], c_kd) + bias_k[None, :]
      best_c = jnp.argmin(d_ck, axis=1).astype(jnp.int32)
      best_d_c = jnp.take_along_axis(d_ck, best_c[:, None], axis=1)[:, 0]
      return best_n.at[rows_c].set(best_c), best_d_n.at[rows_c].set(best_d_c)

    best_n, best_d_n = lax.fori_loop(0, num_blocks, score_block, (jnp.zeros(
        (n,), jnp.int32), jnp.full((n,), jnp.inf, x_nd.dtype)))
    took_n = _accept(best_n, best_d_n, free_n, room_k)
    codes_n = jnp.where(took_n, best_n, codes_n)
    d2_n = jnp.where(took_n, best_d_n, d2_n)
    room_k = room_k - jnp.bincount(
        best_n, weights=took_n.astype(jnp.int32), length=k).astype(jnp.int32)
    return codes_n, d2_n, room_k, rounds + 1

  codes_n, d2_n, _, _ = lax.while_loop(close_cond, close_body,
                                       (codes_n, d2_n, room_k, 0))
  return codes_n, d2_n

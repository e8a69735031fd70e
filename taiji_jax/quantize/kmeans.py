"""K-means for item embeddings: chunked assignment, k-means++, Lloyd, balanced.

The building block of both semantic-ID quantizers: RQ-KMeans (OneRec) fits
one k-means per residual level, and the RQ-VAE (TIGER) initialises its
codebooks with it. Everything here is a pure function of arrays and runs
under `jax.jit`:

* `pairwise_sq_dists` - squared Euclidean distances via the matmul expansion.
* `assign` - nearest centroid of every point, computed over row blocks so
  that 1M x 384 points against 256 centroids never hold more than
  chunk * K distances at once.
* `kmeans_plus_plus` - D^2 seeding on a random subsample of at most
  `KMEANSPP_MAX_POINTS` points.
* `balanced_assign` - capacity-constrained assignment (OneRec-style balanced
  clusters): the greedy matching by sorted (point, cluster) distance,
  computed in parallel as a deferred-acceptance (Gale-Shapley) matching.
* `lloyd_step` / `fit` - Lloyd iterations with deterministic re-seeding of
  empty clusters and an early stop on the relative change of the inertia.

Value checks (NaN/inf rows, k larger than the number of distinct points)
need concrete arrays and run in `fit` / `check_points`; under an outer
`jax.jit` they are skipped and only shape checks remain.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Rows per block in `assign`; the distance block is DEFAULT_CHUNK x K floats.
DEFAULT_CHUNK = 4096
# k-means++ seeds from a uniform subsample of at most this many points: the
# seeding loop makes k passes over the points it sees, and 100k points are
# plenty to place a few thousand seeds that Lloyd then refines on all data.
KMEANSPP_MAX_POINTS = 100_000
# Relative round-off under which k-means++ treats a squared distance as 0.
_ZERO_RTOL = 1e-5
# Candidate clusters per point that `balanced_assign` ranks exactly.
DEFAULT_CANDIDATES = 32


class KMeansResult(NamedTuple):
  """Output of `fit`.

  Attributes:
    centroids: (K, D) final centroids.
    codes: (N,) int32 cluster of each point under the final centroids
      (nearest centroid, or the capacity-constrained assignment when fitted
      with `balanced=True`).
    inertia: () sum of squared distances of the points to their centroid.
    iterations: () int32 Lloyd steps run before the early stop.
  """
  centroids: jax.Array
  codes: jax.Array
  inertia: jax.Array
  iterations: jax.Array


def _check_matrix(name: str, a: jax.Array) -> None:
  if a.ndim != 2:
    raise ValueError(f"{name} must be 2-D, got shape {tuple(a.shape)}.")


def _as_float(a) -> jax.Array:
  a = jnp.asarray(a)
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _is_concrete(a) -> bool:
  return not isinstance(a, jax.core.Tracer)


def check_points(x_nd, k: int | None = None, name: str = "x_nd") -> None:
  """Raises ValueError on a bad point matrix; a no-op on tracers.

  Checks that `x_nd` is 2-D with at least one row, that every row is finite
  (naming how many are not and the first such index) and, when `k` is given,
  that there are at least `k` points and at least `k` distinct points (k-means
  with more clusters than distinct points leaves duplicate centroids).

  Args:
    x_nd: (N, D) points.
    k: number of clusters that will be fitted, or None.
    name: how to call the array in messages.
  """
  x_nd = jnp.asarray(x_nd)
  if x_nd.ndim != 2:
    raise ValueError(f"{name} must be 2-D (N, D), got shape "
                     f"{tuple(x_nd.shape)}.")
  n = x_nd.shape[0]
  if n == 0 or x_nd.shape[1] == 0:
    raise ValueError(f"{name} is empty, shape {tuple(x_nd.shape)}.")
  if k is not None:
    if k < 1:
      raise ValueError(f"k must be >= 1, got k={k}.")
    if k > n:
      raise ValueError(f"k={k} clusters need at least k points, got N={n}.")
  if not _is_concrete(x_nd):
    return
  finite_n = np.asarray(jnp.isfinite(x_nd).all(axis=1))
  if not finite_n.all():
    bad = np.flatnonzero(~finite_n)
    raise ValueError(f"{name} has {bad.size} of {n} rows with NaN or inf "
                     f"values; the first is row {bad[0]}.")
  if k is not None and k > 1:
    distinct = _count_distinct_rows_at_least(x_nd, k)
    if distinct < k:
      raise ValueError(f"k={k} exceeds the number of distinct points "
                       f"({distinct}) among N={n} points.")


def _count_distinct_rows_at_least(x_nd: jax.Array, k: int) -> int:
  """Counts distinct rows, cheaply when there are clearly at least k.

  A random projection maps distinct rows to (almost surely) distinct
  numbers and equal rows to equal ones, so the number of distinct projections
  is a lower bound computed in O(N D); only when that bound is below k do we
  pay for an exact `np.unique(axis=0)`.
  """
  rng = np.random.default_rng(0)
  proj_d = jnp.asarray(rng.standard_normal(x_nd.shape[1]), x_nd.dtype)
  hashes_n = np.asarray(x_nd @ proj_d)
  lower = np.unique(hashes_n).size
  if lower >= k:
    return lower
  return int(np.unique(np.asarray(x_nd), axis=0).shape[0])


def pairwise_sq_dists(x_nd: jax.Array, c_kd: jax.Array) -> jax.Array:
  """Squared Euclidean distances (N, K) as ||x||^2 - 2 x.c + ||c||^2.

  The expansion turns the work into one matmul (run at full float32
  precision so that TPU/GPU defaults of bf16/tf32 passes do not flip
  argmins); cancellation can make it slightly negative, hence the clamp.
  """
  x_nd, c_kd = _as_float(x_nd), _as_float(c_kd)
  _check_matrix("x_nd", x_nd)
  _check_matrix("c_kd", c_kd)
  if x_nd.shape[1] != c_kd.shape[1]:
    raise ValueError(f"x_nd has dim {x_nd.shape[1]} but c_kd has dim "
                     f"{c_kd.shape[1]}.")
  x2_n1 = jnp.sum(x_nd * x_nd, axis=1, keepdims=True)
  c2_1k = jnp.sum(c_kd * c_kd, axis=1)[None, :]
  xc_nk = jnp.matmul(x_nd, c_kd.T, precision=lax.Precision.HIGHEST)
  return jnp.maximum(x2_n1 - 2.0 * xc_nk + c2_1k, 0.0)


def map_row_blocks(fn, rows, chunk: int):
  """Applies `fn` to blocks of `chunk` rows and stitches the outputs.

  `rows` is a pytree of arrays sharing the leading dim N; `fn` maps a block
  (the same pytree with leading dim chunk) to a pytree of arrays with leading
  dim chunk. Blocks run in a `lax.fori_loop` reading with
  `lax.dynamic_slice`; the last block starts at N - chunk and so overlaps
  its predecessor, recomputing a few rows with identical results. That
  avoids padding (a copy of the whole input, 1.5 GB for 1M x 384 floats)
  while keeping every block the same static shape.
  """
  leaves = jax.tree.leaves(rows)
  n = leaves[0].shape[0]
  chunk = max(1, min(int(chunk), n))
  num_blocks = -(-n // chunk)
  if num_blocks == 1:
    return fn(rows)
  block_shapes = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((chunk,) + a.shape[1:], a.dtype), rows)
  out_shapes = jax.eval_shape(fn, block_shapes)
  outs = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape[1:], s.dtype),
                      out_shapes)

  def body(i, outs):
    start = jnp.minimum(i * chunk, n - chunk)
    block = jax.tree.map(
        lambda a: lax.dynamic_slice_in_dim(a, start, chunk, axis=0), rows)
    res = fn(block)
    return jax.tree.map(
        lambda o, r: lax.dynamic_update_slice_in_dim(o, r, start, axis=0), outs,
        res)

  return lax.fori_loop(0, num_blocks, body, outs)


@functools.partial(jax.jit, static_argnames=("chunk",))
def assign(x_nd: jax.Array,
           c_kd: jax.Array,
           chunk: int = DEFAULT_CHUNK) -> tuple[jax.Array, jax.Array]:
  """Nearest centroid of every point, computed over row blocks.

  Args:
    x_nd: (N, D) points.
    c_kd: (K, D) centroids.
    chunk: rows per block; peak extra memory is chunk * K floats.

  Returns:
    codes_n: (N,) int32 index of the nearest centroid (lowest index on ties).
    sq_dist_n: (N,) squared distance to it.
  """
  x_nd, c_kd = _as_float(x_nd), _as_float(c_kd)
  _check_matrix("x_nd", x_nd)
  _check_matrix("c_kd", c_kd)

  def block(xb_cd):
    d_ck = pairwise_sq_dists(xb_cd, c_kd)
    codes_c = jnp.argmin(d_ck, axis=1).astype(jnp.int32)
    return codes_c, jnp.take_along_axis(d_ck, codes_c[:, None], axis=1)[:, 0]

  return map_row_blocks(block, x_nd, chunk)


@functools.partial(jax.jit, static_argnames=("k", "max_points"))
def kmeans_plus_plus(key: jax.Array,
                     x_nd: jax.Array,
                     k: int,
                     max_points: int = KMEANSPP_MAX_POINTS) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii 2007) by D^2 sampling.

  The first seed is uniform; each next seed is drawn with probability
  proportional to its squared distance to the nearest seed so far, kept as a
  running minimum in a `lax.fori_loop`. A chosen point's distance is set to
  exactly 0 (as are distances within float32 round-off of 0), so it is never
  drawn again: the seeds are distinct points whenever the data has k
  (numerically) distinct points. When N > max(max_points, k) the seeds are
  drawn from a uniform subsample (without replacement) of that many points,
  which bounds the cost at k passes over max_points rows.

  Args:
    key: PRNG key.
    x_nd: (N, D) points.
    k: number of seeds (static).
    max_points: subsample size cap (static).

  Returns:
    (k, D) seeds, each a row of x_nd.
  """
  x_nd = _as_float(x_nd)
  _check_matrix("x_nd", x_nd)
  n, d = x_nd.shape
  if not 1 <= k <= n:
    raise ValueError(f"k={k} clusters need 1 <= k <= N points, got N={n}.")
  key_sub, key_first, key_loop = jax.random.split(key, 3)
  max_points = max(int(max_points), k)
  if n > max_points:
    idx_m = jax.random.choice(key_sub, n, (max_points,), replace=False)
    xs_md = x_nd[idx_m]
  else:
    xs_md = x_nd
  m = xs_md.shape[0]
  sq_norms_m = jnp.sum(xs_md * xs_md, axis=1)

  def sq_dists_to(j):
    # Matmul expansion: a matvec per seed. (The direct sum((x - s)^2) makes
    # XLA materialise an (M, D) temporary per step, page-faulting M * D
    # floats k times.) Distances within float32 round-off of zero -
    # relative to the norms involved - are set to exactly 0, and so is the
    # seed's own, so no seed (or exact duplicate of one) is drawn twice.
    seed_d = xs_md[j]
    seed_sq = sq_norms_m[j]
    dot_m = jnp.matmul(xs_md, seed_d, precision=lax.Precision.HIGHEST)
    d2_m = sq_norms_m - 2.0 * dot_m + seed_sq
    d2_m = jnp.where(d2_m <= _ZERO_RTOL * (sq_norms_m + seed_sq), 0.0, d2_m)
    return seed_d, d2_m.at[j].set(0.0)

  seed_d, min_d2_m = sq_dists_to(jax.random.randint(key_first, (), 0, m))
  seeds_kd = jnp.zeros((k, d), x_nd.dtype).at[0].set(seed_d)

  def body(i, carry):
    seeds_kd, min_d2_m = carry
    logits_m = jnp.where(min_d2_m > 0, jnp.log(min_d2_m), -jnp.inf)
    j = jax.random.categorical(jax.random.fold_in(key_loop, i), logits_m)
    seed_d, d2_m = sq_dists_to(j)
    return seeds_kd.at[i].set(seed_d), jnp.minimum(min_d2_m, d2_m)

  seeds_kd, _ = lax.fori_loop(1, k, body, (seeds_kd, min_d2_m))
  return seeds_kd


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


def _check_capacity(capacity, k: int, n: int) -> None:
  if _is_concrete(capacity) and int(capacity) * k < n:
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
  x_nd, c_kd = _as_float(x_nd), _as_float(c_kd)
  _check_matrix("x_nd", x_nd)
  _check_matrix("c_kd", c_kd)
  n, k = x_nd.shape[0], c_kd.shape[0]
  if capacity is None:
    capacity = default_capacity(n, k)
  _check_capacity(capacity, k, n)
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


@functools.partial(jax.jit, static_argnames=("chunk", "balanced", "candidates"))
def lloyd_step(
    x_nd: jax.Array,
    c_kd: jax.Array,
    chunk: int = DEFAULT_CHUNK,
    balanced: bool = False,
    capacity: int | jax.Array | None = None,
    candidates: int = DEFAULT_CANDIDATES
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One Lloyd iteration: assign to `c_kd`, then move centroids to the means.

  An empty cluster is re-seeded deterministically: the j-th empty cluster
  (in index order) takes the j-th farthest point from its assigned centroid,
  the point the current solution explains worst.

  Args:
    x_nd: (N, D) points.
    c_kd: (K, D) current centroids.
    chunk: rows per block of the assignment.
    balanced: use `balanced_assign` (capacity-constrained) instead of the
      nearest centroid.
    capacity: per-cluster capacity when balanced (default ceil(N / K)).
    candidates: see `balanced_assign`.

  Returns:
    new_c_kd: (K, D) updated centroids.
    codes_n: (N,) int32 assignment to the *input* centroids.
    inertia: () sum of squared distances of that assignment.
  """
  x_nd, c_kd = _as_float(x_nd), _as_float(c_kd)
  n, k = x_nd.shape[0], c_kd.shape[0]
  if balanced:
    codes_n, d2_n = balanced_assign(x_nd, c_kd, capacity, candidates, chunk)
  else:
    codes_n, d2_n = assign(x_nd, c_kd, chunk)
  counts_k = jax.ops.segment_sum(jnp.ones((n,), x_nd.dtype), codes_n, k)
  sums_kd = jax.ops.segment_sum(x_nd, codes_n, k)
  means_kd = sums_kd / jnp.maximum(counts_k, 1.0)[:, None]
  empty_k = counts_k == 0

  def reseed(means_kd):
    num_far = min(k, n)
    _, far_f = lax.top_k(d2_n, num_far)
    rank_k = jnp.clip(jnp.cumsum(empty_k) - 1, 0, num_far - 1)
    return jnp.where(empty_k[:, None], x_nd[far_f[rank_k]], means_kd)

  new_c_kd = lax.cond(jnp.any(empty_k), reseed, lambda c: c, means_kd)
  return new_c_kd, codes_n, jnp.sum(d2_n)


@functools.partial(
    jax.jit,
    static_argnames=("k", "balanced", "chunk", "candidates",
                     "kmeanspp_max_points"))
def _fit(key, x_nd, iters, tol, *, k, balanced, chunk, capacity, candidates,
         kmeanspp_max_points) -> KMeansResult:
  c_kd = kmeans_plus_plus(key, x_nd, k, kmeanspp_max_points)
  step = functools.partial(
      lloyd_step,
      chunk=chunk,
      balanced=balanced,
      capacity=capacity,
      candidates=candidates)

  def cond(state):
    _, _, it, done = state
    return (it < iters) & ~done

  def body(state):
    c_kd, prev_inertia, it, _ = state
    new_c_kd, _, inertia = step(x_nd, c_kd)
    rel_change = jnp.abs(prev_inertia - inertia) / jnp.maximum(
        inertia,
        jnp.finfo(inertia.dtype).tiny)
    return new_c_kd, inertia, it + 1, rel_change <= tol

  init = (c_kd, jnp.array(jnp.inf,
                          x_nd.dtype), jnp.array(0,
                                                 jnp.int32), jnp.array(False))
  c_kd, _, iterations, _ = lax.while_loop(cond, body, init)
  if balanced:
    codes_n, d2_n = balanced_assign(x_nd, c_kd, capacity, candidates, chunk)
  else:
    codes_n, d2_n = assign(x_nd, c_kd, chunk)
  return KMeansResult(c_kd, codes_n, jnp.sum(d2_n), iterations)


def fit(key: jax.Array,
        x_nd: jax.Array,
        k: int,
        iters: int = 25,
        tol: float = 1e-4,
        balanced: bool = False,
        *,
        chunk: int = DEFAULT_CHUNK,
        capacity: int | None = None,
        candidates: int = DEFAULT_CANDIDATES,
        kmeanspp_max_points: int = KMEANSPP_MAX_POINTS,
        check_inputs: bool = True) -> KMeansResult:
  """K-means: k-means++ seeds, then up to `iters` Lloyd steps.

  The whole fit is one jitted `lax.while_loop` (no host round trip per
  step); it stops early once the inertia changes by at most `tol` relative
  to its current value between consecutive steps. The returned codes and
  inertia are recomputed for the final centroids, so `codes` equals
  `assign(x_nd, centroids)` (or the balanced assignment to them).

  Args:
    key: PRNG key for the seeding.
    x_nd: (N, D) points.
    k: number of clusters.
    iters: maximum Lloyd steps (0 = seeding only).
    tol: relative inertia change that counts as converged.
    balanced: OneRec-style balanced clusters; every step assigns with
      `balanced_assign` under a capacity of ceil(N / K) per cluster.
    chunk: rows per block of the distance computations.
    capacity: per-cluster capacity when balanced.
    candidates: nearest clusters each point ranks in `balanced_assign`.
    kmeanspp_max_points: subsample cap of the seeding.
    check_inputs: run `check_points` (needs concrete arrays; skipped on
      tracers anyway).

  Returns:
    A KMeansResult.

  Raises:
    ValueError: on NaN/inf rows, a non-2-D input, or k larger than N or
      than the number of distinct points.
  """
  x_nd = _as_float(x_nd)
  if check_inputs:
    check_points(x_nd, k)
  else:
    _check_matrix("x_nd", x_nd)
  if iters < 0:
    raise ValueError(f"iters must be >= 0, got {iters}.")
  if balanced and capacity is not None:
    _check_capacity(capacity, k, x_nd.shape[0])
  return _fit(
      key,
      x_nd,
      jnp.asarray(iters, jnp.int32),
      jnp.asarray(tol, x_nd.dtype),
      k=int(k),
      balanced=bool(balanced),
      chunk=int(chunk),
      capacity=capacity,
      candidates=int(candidates),
      kmeanspp_max_points=int(kmeanspp_max_points))

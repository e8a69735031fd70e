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

The distance and assignment helpers live in `distances.py` and the
balanced assignment in `balanced.py`; both are re-exported here, so
`kmeans.<name>` is the one public entry point.

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

from taiji_jax.quantize import balanced as balanced_lib
from taiji_jax.quantize import distances

# Re-exported: `kmeans` stays the one public entry point of the k-means code.
DEFAULT_CHUNK = distances.DEFAULT_CHUNK
DEFAULT_CANDIDATES = balanced_lib.DEFAULT_CANDIDATES
check_points = distances.check_points
pairwise_sq_dists = distances.pairwise_sq_dists
map_row_blocks = distances.map_row_blocks
assign = distances.assign
balanced_assign = balanced_lib.balanced_assign
default_capacity = balanced_lib.default_capacity
as_float = distances.as_float
check_matrix = distances.check_matrix

# k-means++ seeds from a uniform subsample of at most this many points: the
# seeding loop makes k passes over the points it sees, and 100k points are
# plenty to place a few thousand seeds that Lloyd then refines on all data.
KMEANSPP_MAX_POINTS = 100_000
# Relative round-off under which k-means++ treats a squared distance as 0.
_ZERO_RTOL = 1e-5


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
  x_nd = as_float(x_nd)
  check_matrix("x_nd", x_nd)
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
  x_nd, c_kd = as_float(x_nd), as_float(c_kd)
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
  x_nd = as_float(x_nd)
  if check_inputs:
    check_points(x_nd, k)
  else:
    check_matrix("x_nd", x_nd)
  if iters < 0:
    raise ValueError(f"iters must be >= 0, got {iters}.")
  if balanced and capacity is not None:
    balanced_lib.check_capacity(capacity, k, x_nd.shape[0])
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

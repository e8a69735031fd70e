"""Tests of taiji_jax.quantize.kmeans: assignment, seeding, Lloyd, balance."""

import chex
import jax
import numpy as np
import pytest

from taiji_jax.quantize import kmeans


def _blobs(n_per, centers_cd, noise, seed=0):
  """Points around each center; returns (x_nd float32, labels_n)."""
  rng = np.random.default_rng(seed)
  labels_n = np.repeat(np.arange(len(centers_cd)), n_per)
  x_nd = centers_cd[labels_n] + noise * rng.standard_normal(
      (len(labels_n), centers_cd.shape[1]))
  return x_nd.astype(np.float32), labels_n


def _same_partition(a_n, b_n) -> bool:
  """True when a and b split the points into the same groups."""
  pairs = set(zip(a_n.tolist(), b_n.tolist()))
  return (len(pairs) == len(set(a_n.tolist())) == len(set(b_n.tolist())))


def _greedy_balanced(d_nk, cap):
  """Reference: walk (point, cluster) pairs by distance, respect capacity."""
  n, k = d_nk.shape
  codes_n, room_k = -np.ones(n, int), np.full(k, cap)
  for flat in np.argsort(d_nk, axis=None, kind="stable"):
    i, c = divmod(int(flat), k)
    if codes_n[i] < 0 and room_k[c] > 0:
      codes_n[i], room_k[c] = c, room_k[c] - 1
  return codes_n


def test_pairwise_sq_dists_matches_numpy_and_is_nonnegative():
  rng = np.random.default_rng(0)
  x_nd = rng.standard_normal((37, 11)).astype(np.float32)
  c_kd = np.concatenate([x_nd[:3], rng.standard_normal((4, 11))])
  c_kd = c_kd.astype(np.float32)
  want_nk = ((x_nd[:, None, :].astype(np.float64) - c_kd[None])**2).sum(-1)
  got_nk = np.asarray(kmeans.pairwise_sq_dists(x_nd, c_kd))
  np.testing.assert_allclose(got_nk, want_nk, rtol=1e-4, atol=1e-4)
  assert got_nk.min() >= 0.0  # Points equal to a centroid clamp to 0.


def test_chunked_assign_equals_unchunked_and_numpy():
  rng = np.random.default_rng(1)
  x_nd = rng.standard_normal((101, 13)).astype(np.float32)
  c_kd = rng.standard_normal((7, 13)).astype(np.float32)
  codes_full, d2_full = kmeans.assign(x_nd, c_kd, chunk=1000)
  for chunk in (7, 10, 64):  # 101 rows: ragged last block in every case.
    codes, d2 = kmeans.assign(x_nd, c_kd, chunk=chunk)
    np.testing.assert_array_equal(codes, codes_full)
    np.testing.assert_allclose(d2, d2_full, rtol=1e-5, atol=1e-5)
  want = ((x_nd[:, None] - c_kd[None])**2).sum(-1).argmin(1)
  np.testing.assert_array_equal(codes_full, want)
  assert codes_full.dtype == np.int32


def test_jit_and_eager_agree():
  rng = np.random.default_rng(2)
  x_nd = rng.standard_normal((30, 5)).astype(np.float32)
  c_kd = rng.standard_normal((3, 5)).astype(np.float32)

  def run():
    return (kmeans.assign(x_nd, c_kd,
                          chunk=8), kmeans.lloyd_step(x_nd, c_kd, chunk=8))

  jitted = run()
  with jax.disable_jit():
    eager = run()
  chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    if a.dtype == np.int32:  # Codes agree exactly.
      np.testing.assert_array_equal(a, b)


def test_fit_recovers_planted_clusters():
  rng = np.random.default_rng(4)
  centers_cd = 20.0 * rng.standard_normal((5, 8))
  x_nd, labels_n = _blobs(40, centers_cd, noise=0.1)
  result = kmeans.fit(jax.random.key(0), x_nd, 5, iters=20)
  assert _same_partition(np.asarray(result.codes), labels_n)
  assert int(result.iterations) < 20  # Converged and stopped early.
  codes_n, d2_n = kmeans.assign(x_nd, result.centroids)
  np.testing.assert_array_equal(result.codes, codes_n)
  np.testing.assert_allclose(result.inertia, d2_n.sum(), rtol=1e-5)


def test_fit_is_deterministic_per_key():
  rng = np.random.default_rng(5)
  x_nd = rng.standard_normal((300, 6)).astype(np.float32)
  a = kmeans.fit(jax.random.key(7), x_nd, 11, iters=10)
  b = kmeans.fit(jax.random.key(7), x_nd, 11, iters=10)
  chex.assert_trees_all_equal(a, b)
  c = kmeans.fit(jax.random.key(8), x_nd, 11, iters=10)
  assert not np.array_equal(a.centroids, c.centroids)


def test_kmeans_plus_plus_picks_distinct_data_points():
  rng = np.random.default_rng(6)
  x_nd = rng.standard_normal((50, 4)).astype(np.float32)
  rows = {tuple(r) for r in x_nd.tolist()}
  for max_points in (1000, 45):  # Whole data, then the subsample path.
    seeds_kd = np.asarray(
        kmeans.kmeans_plus_plus(jax.random.key(1), x_nd, 43, max_points))
    seed_rows = [tuple(r) for r in seeds_kd.tolist()]
    assert len(set(seed_rows)) == 43
    assert set(seed_rows) <= rows


def test_kmeans_plus_plus_prefers_far_points():
  # 100 points at the origin-ish blob and one far outlier: D^2 sampling
  # must pick the outlier as the second seed for almost every key.
  x_nd, _ = _blobs(100, np.zeros((1, 3)), noise=0.01)
  x_nd = np.concatenate([x_nd, np.full((1, 3), 50.0, np.float32)])
  hits = 0
  for s in range(20):
    seeds_kd = np.asarray(kmeans.kmeans_plus_plus(jax.random.key(s), x_nd, 2))
    hits += bool((seeds_kd == 50.0).all(axis=1).any())
  assert hits >= 19


def test_lloyd_step_reseeds_empty_cluster_with_farthest_point():
  x_nd = np.array([[0, 0], [0, 1], [10, 0], [10, 1], [30, 0]], np.float32)
  c_kd = np.array([[0, 0.5], [10, 0.5], [-100, -100]], np.float32)
  new_c_kd, codes_n, inertia = kmeans.lloyd_step(x_nd, c_kd)
  np.testing.assert_array_equal(codes_n, [0, 0, 1, 1, 1])
  # Cluster 2 got no point: it moves to the worst-explained point (30, 0).
  np.testing.assert_allclose(new_c_kd[2], [30.0, 0.0])
  np.testing.assert_allclose(new_c_kd[0], [0.0, 0.5])
  np.testing.assert_allclose(inertia, 4 * 0.25 + (30 - 10)**2 + 0.25)


def test_balanced_assign_is_the_greedy_capacity_matching():
  rng = np.random.default_rng(7)
  x_nd = rng.standard_normal((300, 5)).astype(np.float32)
  x_nd[:200] += 3.0  # Two thirds of the points in one blob.
  c_kd = x_nd[rng.choice(300, 7, replace=False)]
  cap = kmeans.default_capacity(300, 7)
  want_n = _greedy_balanced(
      np.asarray(kmeans.pairwise_sq_dists(x_nd, c_kd)), cap)
  codes_n, _ = kmeans.balanced_assign(x_nd, c_kd, candidates=7)
  np.testing.assert_array_equal(codes_n, want_n)
  # One candidate: most placements go through the fallback rounds, which
  # still respect the capacity. (Capacity is traced: one compilation.)
  d_nk = np.asarray(kmeans.pairwise_sq_dists(x_nd, c_kd))
  for capacity in (None, 50):
    codes_n, d2_n = kmeans.balanced_assign(
        x_nd, c_kd, capacity=capacity, candidates=1, chunk=64)
    sizes_k = np.bincount(np.asarray(codes_n), minlength=7)
    assert codes_n.min() >= 0 and sizes_k.sum() == 300
    assert sizes_k.max() <= (capacity or cap)
    np.testing.assert_allclose(
        d2_n, d_nk[np.arange(300), codes_n], rtol=1e-4, atol=1e-4)
  # A capacity of N is no constraint: plain nearest-centroid assignment.
  np.testing.assert_array_equal(
      kmeans.balanced_assign(x_nd, c_kd, capacity=300, candidates=1,
                             chunk=64)[0], d_nk.argmin(axis=1))


def test_balanced_fit_respects_capacity_at_a_moderate_cost():
  big, _ = _blobs(280, np.zeros((1, 6)), noise=1.0, seed=1)
  small, _ = _blobs(40, np.full((1, 6), 6.0), noise=1.0, seed=2)
  x_nd = np.concatenate([big, small])  # 320 points, 7:1 imbalance.
  k = 8
  cap = kmeans.default_capacity(320, k)
  free = kmeans.fit(jax.random.key(0), x_nd, k, iters=30)
  assert np.bincount(np.asarray(free.codes), minlength=k).max() > cap
  bal = kmeans.fit(jax.random.key(0), x_nd, k, iters=30, balanced=True)
  assert np.bincount(np.asarray(bal.codes), minlength=k).max() <= cap == 40
  # At the balanced centroids the nearest assignment overflows a cluster;
  # the constraint costs inertia, but only a little.
  nearest_n, nearest_d2_n = kmeans.assign(x_nd, bal.centroids)
  assert np.bincount(np.asarray(nearest_n), minlength=k).max() > cap
  assert float(nearest_d2_n.sum()) < float(bal.inertia)
  assert float(bal.inertia) < 1.1 * float(nearest_d2_n.sum())
  # Comparable to the unconstrained fit, far below a random balanced split.
  assert float(bal.inertia) < 1.2 * float(free.inertia)
  random_codes_n = np.random.default_rng(8).permutation(np.arange(320) % k)
  means_kd = np.stack([x_nd[random_codes_n == c].mean(0) for c in range(k)])
  random_inertia = ((x_nd - means_kd[random_codes_n])**2).sum()
  assert float(bal.inertia) < 0.6 * random_inertia


def test_bad_inputs_raise_clear_errors():
  rng = np.random.default_rng(9)
  x_nd = rng.standard_normal((20, 3)).astype(np.float32)
  key = jax.random.key(0)
  bad = x_nd.copy()
  bad[4, 1], bad[9, 0] = np.nan, np.inf
  with pytest.raises(ValueError, match=r"2 of 20 rows .* first is row 4"):
    kmeans.fit(key, bad, 3)
  with pytest.raises(ValueError, match=r"k=21 .* N=20"):
    kmeans.fit(key, x_nd, 21)
  dup = np.repeat(x_nd[:3], 5, axis=0)  # 15 rows, 3 distinct.
  with pytest.raises(ValueError, match=r"k=4 .* distinct points \(3\)"):
    kmeans.fit(key, dup, 4)
  kmeans.fit(key, dup, 3)  # Exactly as many clusters as distinct points.
  with pytest.raises(ValueError, match=r"2-D"):
    kmeans.fit(key, x_nd[0], 2)
  with pytest.raises(ValueError, match=r"2-D"):
    kmeans.assign(x_nd, x_nd[0])
  with pytest.raises(ValueError, match=r"dim 3 .* dim 2"):
    kmeans.assign(x_nd, x_nd[:2, :2])
  with pytest.raises(ValueError, match=r"cannot hold N=20"):
    kmeans.balanced_assign(x_nd, x_nd[:3], capacity=6)

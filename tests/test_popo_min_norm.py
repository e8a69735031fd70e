"""The min-norm solver against an exact QP, its KKT conditions, jit/vmap."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taiji_jax.rl import popo


def exact_min_norm(gram: np.ndarray) -> tuple[np.ndarray, float]:
  """argmin_{w in simplex} w^T G w by enumerating the active sets.

  For every support S the equality-constrained QP min w_S^T G_SS w_S s.t.
  sum w_S = 1 is solved from its KKT system (least squares, so singular
  G_SS work); the best feasible (w >= 0) solution is the optimum.
  """
  k = gram.shape[0]
  best_w, best_v = None, np.inf
  for size in range(1, k + 1):
    for support in itertools.combinations(range(k), size):
      s = list(support)
      a = np.zeros((size + 1, size + 1))
      a[:size, :size] = 2 * gram[np.ix_(s, s)]
      a[:size, size] = 1
      a[size, :size] = 1
      rhs = np.zeros(size + 1)
      rhs[size] = 1
      sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
      w = np.zeros(k)
      w[s] = sol[:size]
      if w.min() < -1e-9 or abs(w.sum() - 1) > 1e-6:
        continue
      w = np.clip(w, 0, None)
      w /= w.sum()
      v = w @ gram @ w
      if v < best_v - 1e-15:
        best_w, best_v = w, v
  return best_w, best_v


def _gram(kind: str, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(gradients (K, D), Gram) of a random problem of the given kind."""
  rng = np.random.default_rng(seed)
  d = 9
  if kind == "random":
    g = rng.normal(size=(k, d))
  elif kind == "rank_deficient":  # K gradients in a 2-dim subspace
    g = rng.normal(size=(k, 2)) @ rng.normal(size=(2, d))
  elif kind == "one_dominates":  # one tiny gradient: w* is (nearly) it
    g = rng.normal(size=(k, d))
    g[0] *= 1e-3
  elif kind == "aligned":  # all in one half-space: d* != 0
    base = rng.normal(size=d)
    g = base + 0.3 * rng.normal(size=(k, d))
  else:
    raise ValueError(kind)
  return g, g @ g.T


KINDS = ("random", "rank_deficient", "one_dominates", "aligned")


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_the_exact_qp_and_satisfies_kkt(k, kind):
  solve = jax.jit(popo.min_norm_weights)
  for seed in range(4):
    g, gram = _gram(kind, k, seed)
    w = np.asarray(solve(jnp.asarray(gram)), np.float64)
    want_w, want_v = exact_min_norm(gram)
    scale = np.max(np.diag(gram))
    v = w @ gram @ w
    # On the simplex.
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0, abs=1e-5)
    # The optimal value (unique even where w* is not).
    assert v == pytest.approx(want_v, abs=2e-6 * scale, rel=1e-4)
    # KKT: every (G w)_i >= w^T G w, with equality on the support.
    gw = gram @ w
    assert gw.min() >= v - 1e-5 * scale
    on = w > 1e-3
    np.testing.assert_allclose(gw[on], v, atol=1e-4 * scale)
    if kind != "rank_deficient" and np.linalg.matrix_rank(gram) == k:
      np.testing.assert_allclose(w, want_w, atol=2e-3)


@pytest.mark.parametrize("k", [2, 4])
def test_the_direction_decreases_every_objective_to_first_order(k):
  """d = sum w_k g_k: <g_i, d> >= ||d||^2 > 0 for every objective i, so a
  step along -d lowers every loss to first order."""
  for seed in range(5):
    g, gram = _gram("aligned", k, seed)
    w = np.asarray(popo.min_norm_weights(jnp.asarray(gram)), np.float64)
    d = w @ g
    assert np.dot(d, d) > 1e-3
    assert np.all(g @ d >= np.dot(d, d) * (1 - 1e-4))


def test_two_objectives_closed_form_by_hand():
  g1, g2 = np.array([1.0, 0.0]), np.array([0.0, 2.0])
  gram = np.stack([g1, g2]) @ np.stack([g1, g2]).T
  w = np.asarray(popo.min_norm_weights(jnp.asarray(gram)))
  # alpha = <g2 - g1, g2> / ||g1 - g2||^2 = 4 / 5.
  np.testing.assert_allclose(w, [0.8, 0.2], rtol=1e-6)
  # Opposite gradients: the min-norm point is 0 (Pareto-stationary).
  gram = np.array([[1.0, -1.0], [-1.0, 1.0]])
  w = np.asarray(popo.min_norm_weights(jnp.asarray(gram)))
  np.testing.assert_allclose(w, [0.5, 0.5])
  # Identical gradients: any weights; no NaN.
  w = np.asarray(popo.min_norm_weights(jnp.ones((2, 2))))
  assert np.isfinite(w).all() and w.sum() == pytest.approx(1.0)


def test_jit_and_vmap_agree_with_one_by_one():
  grams = np.stack([_gram("random", 4, s)[1] for s in range(6)])
  one = np.stack([np.asarray(popo.min_norm_weights(jnp.asarray(x)))
                  for x in grams])
  batched = np.asarray(jax.jit(jax.vmap(popo.min_norm_weights))(grams))
  np.testing.assert_allclose(batched, one, atol=1e-6)


def test_normalisations():
  g, gram = _gram("random", 3, 0)
  losses = np.array([2.0, 0.5, 1.0])
  norms = np.linalg.norm(g, axis=1)
  for mode, n in (("none", np.ones(3)), ("l2", norms), ("loss", losses),
                  ("loss+", losses * norms)):
    out, got_n = popo.normalize_gram(jnp.asarray(gram), mode,
                                     jnp.asarray(losses))
    np.testing.assert_allclose(got_n, n, rtol=1e-5)
    gn = g / n[:, None]
    np.testing.assert_allclose(out, gn @ gn.T, rtol=1e-5, atol=1e-6)
    # The weights on normalised gradients give the same direction as the
    # mapped weights on the raw ones.
    w = np.asarray(popo.min_norm_weights(out))
    raw = np.asarray(popo.scale_weights(jnp.asarray(w), got_n))
    assert raw.sum() == pytest.approx(1.0)
    d_norm, d_raw = w @ gn, raw @ g
    cos = d_norm @ d_raw / np.linalg.norm(d_norm) / np.linalg.norm(d_raw)
    assert cos == pytest.approx(1.0, abs=1e-5)
  with pytest.raises(ValueError, match="needs the losses"):
    popo.normalize_gram(jnp.asarray(gram), "loss")
  with pytest.raises(ValueError, match="unknown gradient normalisation"):
    popo.normalize_gram(jnp.asarray(gram), "max")

"""Reward weighting rules by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taiji_jax.rl import popo
from taiji_jax.rl import weighting


def test_popo_light_is_the_mean_coefficient_of_variation_by_hand():
  # Two groups of 3 rollouts, two rewards; one invalid rollout.
  r = np.array([[0.2, 1.0], [0.4, 1.0], [0.6, 1.0],
                [0.5, 0.0], [0.5, 2.0], [9.9, 9.9]], np.float32)
  valid = np.array([1, 1, 1, 1, 1, 0], np.float32)
  rule = weighting.make("popo_light")
  w = np.asarray(
      jax.jit(lambda w, r, v: rule(w, weighting.Signals(r, v, 3)))(
          jnp.asarray([0.5, 0.5]), jnp.asarray(r), jnp.asarray(valid)))
  cv = np.zeros(2)
  for k in range(2):
    per_group = []
    for rows in ([0, 1, 2], [3, 4]):
      x = r[rows, k].astype(np.float64)
      per_group.append(x.std() / (abs(x.mean()) + 1e-6))
    cv[k] = np.mean(per_group)
  np.testing.assert_allclose(w, cv / cv.sum(), rtol=1e-5)


def test_popo_light_keeps_the_weights_when_nothing_varies():
  r = jnp.ones((4, 2))
  w = weighting.popo_light(
      jnp.asarray([0.3, 0.7]), weighting.Signals(r, jnp.ones((4,)), 2))
  np.testing.assert_allclose(w, [0.3, 0.7])


def test_initial_weights_and_rule_names():
  np.testing.assert_allclose(
      weighting.initial_weights(["a", "b"], {"a": 1.0, "b": 3.0}),
      [0.25, 0.75])
  np.testing.assert_allclose(
      weighting.initial_weights(["a", "b"], {"a": 1.0}), [1.0, 0.0])
  with pytest.raises(ValueError, match="not among"):
    weighting.initial_weights(["a"], {"c": 1.0})
  with pytest.raises(ValueError, match=">= 0"):
    weighting.initial_weights(["a", "b"], [1.0, -1.0])
  with pytest.raises(ValueError, match="unknown reward weighting"):
    weighting.make("mgda_typo")
  with pytest.raises(ValueError, match="needs gradients"):
    weighting.make("popo", gradients="none")
  with pytest.raises(ValueError, match="mu > 0"):
    weighting.make("popo", mu=0.0)
  with pytest.raises(ValueError, match="normalisation"):
    weighting.make("mgda", normalization="l1")
  with pytest.raises(ValueError, match="min_weight must be"):
    weighting.make("popo", min_weight=0.5)
  with pytest.raises(ValueError, match="unknown weighting layers"):
    weighting.make("mgda", layers="last:0")
  with pytest.raises(ValueError, match="unknown weighting layers"):
    weighting.make("popo", layers="first:2")
  with pytest.raises(ValueError, match="gradients must be"):
    weighting.make("mgda", gradients="activations")
  assert weighting.make("fixed").gradients == "none"
  assert weighting.make("popo_light").gradients == "none"
  assert weighting.make("mgda", gradients="hidden").gradients == "hidden"


def _signals(gram):
  return weighting.Signals(jnp.zeros((4, 2)), jnp.ones(4), 2,
                           jnp.asarray(gram, jnp.float32))


def test_popo_is_an_exponentiated_gradient_step_by_hand():
  gram = np.array([[4.0, -1.0, 0.5], [-1.0, 1.0, 0.2], [0.5, 0.2, 2.0]])
  w0 = np.array([0.2, 0.5, 0.3])
  eta, mu = 2e-4, 1e-3
  w = weighting.popo(jnp.asarray(w0), _signals(gram), eta, mu)
  raw = w0 * np.exp(eta * gram.sum(1) / mu)
  np.testing.assert_allclose(w, raw / raw.sum(), rtol=1e-6)
  # The objective most aligned with the sum of gradients gains weight.
  assert np.argmax(np.asarray(w) / w0) == np.argmax(gram.sum(1))
  # eta = 0 keeps the weights; a huge step stays finite (log-space).
  np.testing.assert_allclose(
      weighting.popo(jnp.asarray(w0), _signals(gram), 0.0, mu), w0,
      rtol=1e-6)
  big = weighting.popo(jnp.asarray(w0), _signals(gram), 1e6, 1e-6)
  assert np.isfinite(big).all() and np.argmax(big) == 0
  # With K = 3 a floor of 0.4 would leave negative mass: an error.
  with pytest.raises(ValueError, match="< 1 / K"):
    weighting.floor(jnp.asarray(w0), 0.4)
  # A non-finite Gram matrix keeps the weights.
  nan = weighting.popo(jnp.asarray(w0), _signals(gram * np.nan), eta, mu)
  np.testing.assert_allclose(nan, w0, rtol=1e-6)


def test_mgda_rule_is_the_min_norm_point_of_the_normalised_gradients():
  rng = np.random.default_rng(0)
  g = rng.normal(size=(3, 7))
  g[2] *= 10.0  # one gradient much larger
  gram = g @ g.T
  w0 = jnp.full((3,), 1 / 3)
  raw = weighting.mgda(w0, _signals(gram), "none")
  np.testing.assert_allclose(raw, popo.min_norm_weights(jnp.asarray(gram)),
                             atol=1e-6)
  l2 = np.asarray(weighting.mgda(w0, _signals(gram), "l2"))
  n = np.linalg.norm(g, axis=1)
  unit = np.asarray(popo.min_norm_weights(jnp.asarray(gram / np.outer(n, n))))
  np.testing.assert_allclose(l2, (unit / n) / (unit / n).sum(), rtol=1e-5)
  # On raw gradients the large one gets little weight; normalised, the
  # direction is the min-norm point of the unit vectors.
  d = l2 @ g
  cos = (g @ d) / (n * np.linalg.norm(d))
  assert np.all(cos > 0)
  # An all-zero (Pareto-stationary everywhere) Gram matrix keeps weights.
  np.testing.assert_allclose(
      weighting.mgda(w0, _signals(np.zeros((3, 3))), "l2"), w0)


def test_floor_is_the_euclidean_projection_onto_the_floored_simplex():
  rng = np.random.default_rng(1)
  m = 0.05
  for _ in range(20):
    w = rng.dirichlet(np.ones(4) * 0.3)
    p = np.asarray(weighting.floor(jnp.asarray(w), m), np.float64)
    assert p.min() >= m - 1e-7 and p.sum() == pytest.approx(1.0, abs=1e-6)
    # KKT of min |p - w|^2 on {p >= m, sum p = 1}: p = max(w - theta, m)
    # for one theta, i.e. w - p is the same on the weights above the floor
    # and at most that where the floor binds.
    above = p > m + 1e-6
    theta = (w - p)[above]
    np.testing.assert_allclose(theta, theta[0], atol=1e-6)
    assert np.all((w - p)[~above] <= theta[0] + 1e-6)
    # Idempotent, and a feasible point is left where it is.
    np.testing.assert_allclose(weighting.floor(jnp.asarray(p), m), p,
                               atol=1e-6)
  np.testing.assert_allclose(
      weighting.floor(jnp.asarray([0.97, 0.02, 0.01]), 0.05),
      [0.9, 0.05, 0.05], atol=1e-6)


def test_floor_bounds_the_applied_weights_and_leaves_the_state_alone():
  gram = np.array([[4.0, -1.0], [-1.0, 0.5]])
  w0 = jnp.asarray([0.5, 0.5])
  free = weighting.make("popo", eta=1e-3, mu=1e-3)
  floored = weighting.make("popo", eta=1e-3, mu=1e-3, min_weight=0.2)
  s_free, s_floor = w0, w0
  for step in range(40):
    s_free = free(s_free, _signals(gram))
    s_floor = floored(s_floor, _signals(gram))
    # The state evolves exactly as without a floor, at every step.
    np.testing.assert_array_equal(s_floor, s_free)
    applied = np.asarray(floored.applied(s_floor))
    if np.asarray(s_free).min() > 0.2:  # the floor does not bind
      np.testing.assert_allclose(applied, s_free, atol=1e-6)
    else:
      assert applied.min() == pytest.approx(0.2, abs=1e-6), step
  # The run went below the floor (the test covered both branches).
  assert float(s_free.min()) < 0.2
  np.testing.assert_array_equal(free.applied(s_free), s_free)


def test_loss_normalisations_and_inconsistent_settings_are_rejected():
  for mode in ("loss", "loss+"):
    with pytest.raises(ValueError, match="exactly 0 at ratio 1"):
      weighting.make("mgda", normalization=mode)
    with pytest.raises(ValueError, match="exactly 0 at ratio 1"):
      weighting.make("popo", normalization=mode)
  with pytest.raises(ValueError, match="combine must be"):
    weighting.make("popo", combine="paper_typo")
  with pytest.raises(ValueError, match="fused per-reward gradients need"):
    weighting.make("mgda", gradients="hidden", fused=True)
  with pytest.raises(ValueError, match="fused per-reward gradients need"):
    weighting.make("popo", combine="rewards", fused=True)
  # The defaults: the consistent form for the gradient rules, fused where
  # it can be; the paper's reward scalarisation for fixed and popo_light.
  assert weighting.make("popo").combine == "objectives"
  assert weighting.make("popo").fused
  assert not weighting.make("popo", groups=2).fused
  assert not weighting.make("mgda", gradients="hidden").fused
  assert not weighting.make("mgda", layers="last:1", fused=False).fused
  assert weighting.make("fixed").combine == "rewards"
  assert weighting.make("popo_light").combine == "rewards"
  assert weighting.make("fixed", combine="objectives").combine == "objectives"

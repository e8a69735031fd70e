"""Reward weighting rules by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taiji_jax.rl import weighting


def test_popo_light_is_the_mean_coefficient_of_variation_by_hand():
  # Two groups of 3 rollouts, two rewards; one invalid rollout.
  r = np.array([[0.2, 1.0], [0.4, 1.0], [0.6, 1.0],
                [0.5, 0.0], [0.5, 2.0], [9.9, 9.9]], np.float32)
  valid = np.array([1, 1, 1, 1, 1, 0], np.float32)
  w = np.asarray(
      jax.jit(weighting.popo_light, static_argnums=3)(
          jnp.asarray([0.5, 0.5]), jnp.asarray(r), jnp.asarray(valid), 3))
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
      jnp.asarray([0.3, 0.7]), r, jnp.ones((4,)), 2)
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
    weighting.get("mgda_typo")

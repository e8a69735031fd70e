"""Reward weighting: how the K reward columns become one scalar per rollout.

A weighting rule is a pure function

  rule(weights_k, rewards_nk, valid_n, group_size) -> new weights_k

called inside the jitted RL step with the weights carried in the train state
(so a resumed run continues from the saved weights and they are logged every
step). The combined reward of rollout n is `sum_k w_k r_nk`. `fixed` keeps
the configured weights; the gradient-based Pareto rules (POPO, MGDA) live in
`rl/popo.py` and plug in here.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

Rule = Callable[[jax.Array, jax.Array, jax.Array, int], jax.Array]


def fixed(weights_k: jax.Array, rewards_nk: jax.Array, valid_n: jax.Array,
          group_size: int) -> jax.Array:
  """The weights as configured (hand-tuned scalarisation)."""
  del rewards_nk, valid_n, group_size
  return weights_k


RULES: dict[str, Rule] = {"fixed": fixed}


def get(name: str) -> Rule:
  if name not in RULES:
    raise ValueError(f"unknown reward weighting {name!r}; known: "
                     f"{sorted(RULES)}.")
  return RULES[name]


def initial_weights(names: Sequence[str], weights: dict | Sequence[float]
                   ) -> jnp.ndarray:
  """(K,) float32 starting weights, normalised to sum 1.

  Args:
    names: the reward names, in the order of the reward columns.
    weights: {name: weight} (missing names get 0) or one weight per name;
      non-negative with a positive sum.

  Raises:
    ValueError: unknown names, a wrong length or invalid values (named).
  """
  if isinstance(weights, dict):
    unknown = sorted(set(weights) - set(names))
    if unknown:
      raise ValueError(f"reward weights for {unknown}, which are not among "
                       f"the rewards {list(names)}.")
    values = [float(weights.get(n, 0.0)) for n in names]
  else:
    values = [float(w) for w in weights]
    if len(values) != len(names):
      raise ValueError(f"{len(values)} reward weights for {len(names)} "
                       f"rewards {list(names)}.")
  if any(not w >= 0 for w in values) or sum(values) <= 0:
    raise ValueError(f"reward weights {dict(zip(names, values))} must be "
                     ">= 0 with a positive sum.")
  total = sum(values)
  return jnp.asarray([w / total for w in values], jnp.float32)

"""Reward weighting: how the K reward columns become one scalar per rollout.

A weighting rule is a pure function

  rule(weights_k, rewards_nk, valid_n, group_size) -> new weights_k

called inside the jitted RL step with the weights carried in the train state
(so a resumed run continues from the saved weights and they are logged every
step). The combined reward of rollout n is `sum_k w_k r_nk`. `fixed` keeps
the configured weights; `popo_light` sets them from the rewards' spread in
the groups; the gradient-based Pareto rules (POPO, MGDA; solver in
`rl/popo.py`) need per-objective gradients and are not wired in yet.
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


def popo_light(weights_k: jax.Array,
               rewards_nk: jax.Array,
               valid_n: jax.Array,
               group_size: int,
               eps: float = 1e-6) -> jax.Array:
  """Taiji's POPO-light: weights proportional to each reward's coefficient
  of variation within the rollout groups (no extra gradients).

  cv_k = mean over groups of std_g(r_k) / (|mean_g(r_k)| + eps), over each
  group's valid rollouts (groups with fewer than 2 valid rollouts are left
  out); w = cv / sum(cv). A reward that varies more relative to its level
  carries more signal for the group-relative advantage. When no reward
  varies in any group the previous weights are kept.
  """
  g = group_size
  r_bgk = rewards_nk.reshape(-1, g, rewards_nk.shape[-1])
  v_bg1 = (valid_n.reshape(-1, g) > 0)[:, :, None]
  count_b1 = jnp.sum(v_bg1, axis=1)
  safe = jnp.where(v_bg1, r_bgk, 0.0)
  mean_bk = jnp.sum(safe, axis=1) / jnp.maximum(count_b1, 1)
  var_bk = jnp.sum(jnp.where(v_bg1, (r_bgk - mean_bk[:, None])**2, 0.0),
                   axis=1) / jnp.maximum(count_b1, 1)
  cv_bk = jnp.sqrt(var_bk) / (jnp.abs(mean_bk) + eps)
  used_b1 = (count_b1 >= 2).astype(rewards_nk.dtype)
  cv_k = jnp.sum(cv_bk * used_b1, axis=0) / jnp.maximum(jnp.sum(used_b1), 1)
  total = jnp.sum(cv_k)
  return jnp.where(total > 0, cv_k / jnp.where(total > 0, total, 1.0),
                   weights_k)


RULES: dict[str, Rule] = {"fixed": fixed, "popo_light": popo_light}


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

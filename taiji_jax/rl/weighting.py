"""Reward weighting: how the K reward columns become one scalar per rollout.

A weighting rule maps the state's current weights and this step's signals to
new weights, inside the jitted RL step (the weights live in the train state,
so a resumed run continues from the saved ones, and they are logged every
step). The combined reward of rollout n is `sum_k w_k r_nk`.

  fixed       the configured weights (hand-tuned scalarisation);
  popo_light  Taiji's industrial POPO: each reward's coefficient of variation
              within the rollout groups, normalised (no gradients);
  popo        Taiji's POPO (methods §1.2c; = Lu et al. 2025's gradient-based
              weight optimisation): the exponentiated-gradient step
              w <- normalize(w * exp(eta * I / mu)), I_k = <g_k, sum_j g_j>;
  mgda        the min-norm point of the convex hull of the K objective
              gradients (Sener & Koltun 2018; `popo.min_norm_weights`), on
              the parameters (MGDA) or on the final hidden states (MGDA-UB).

`popo` and `mgda` need the (K, K) Gram matrix G_ij = <g_i, g_j> of the
per-reward policy gradients at the step's parameters, which the train step
computes in one forward and one vmapped VJP (`rl/reward_gradients.py`);
`WeightRule.gradients` says with respect to what ("params" or "hidden"),
`layers` over which parameters, `groups` on how many of the batch's groups.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from taiji_jax.rl import popo as popo_lib

GRADIENTS = ("none", "params", "hidden")


class Signals(NamedTuple):
  """What a rule may look at.

  Attributes:
    rewards_nk: (N, K) rewards (finite; invalid rows hold anything finite).
    valid_n: (N,) > 0 at the rows that count.
    group_size: G (static).
    gram: (K, K) Gram matrix of the per-reward gradients (gradient rules).
    losses: (K,) the per-reward losses at the step's parameters.
  """
  rewards_nk: jax.Array
  valid_n: jax.Array
  group_size: int
  gram: jax.Array | None = None
  losses: jax.Array | None = None


def fixed(weights_k: jax.Array, s: Signals) -> jax.Array:
  """The weights as configured."""
  del s
  return weights_k


def popo_light(weights_k: jax.Array, s: Signals, eps: float = 1e-6
              ) -> jax.Array:
  """Weights proportional to each reward's coefficient of variation.

  cv_k = mean over groups of std_g(r_k) / (|mean_g(r_k)| + eps), over each
  group's valid rollouts (groups with fewer than 2 valid rollouts are left
  out); w = cv / sum(cv). A reward that varies more relative to its level
  carries more signal for the group-relative advantage. When no reward
  varies in any group the previous weights are kept.
  """
  g = s.group_size
  r_bgk = s.rewards_nk.reshape(-1, g, s.rewards_nk.shape[-1])
  v_bg1 = (s.valid_n.reshape(-1, g) > 0)[:, :, None]
  count_b1 = jnp.sum(v_bg1, axis=1)
  safe = jnp.where(v_bg1, r_bgk, 0.0)
  mean_bk = jnp.sum(safe, axis=1) / jnp.maximum(count_b1, 1)
  var_bk = jnp.sum(jnp.where(v_bg1, (r_bgk - mean_bk[:, None])**2, 0.0),
                   axis=1) / jnp.maximum(count_b1, 1)
  cv_bk = jnp.sqrt(var_bk) / (jnp.abs(mean_bk) + eps)
  used_b1 = (count_b1 >= 2).astype(s.rewards_nk.dtype)
  cv_k = jnp.sum(cv_bk * used_b1, axis=0) / jnp.maximum(jnp.sum(used_b1), 1)
  total = jnp.sum(cv_k)
  return jnp.where(total > 0, cv_k / jnp.where(total > 0, total, 1.0),
                   weights_k)


def alignment(gram: jax.Array) -> jax.Array:
  """(K,) POPO's gradient alignment I_k = <g_k, sum_j g_j> = sum_j G_kj."""
  return jnp.sum(gram, axis=-1)


def popo(weights_k: jax.Array,
         s: Signals,
         eta: float,
         mu: float,
         normalization: str = "none",
         min_weight: float = 0.0) -> jax.Array:
  """One exponentiated-gradient step on the simplex (mirror descent).

  w <- softmax(log w + eta * I / mu) = normalize(w * exp(eta * I / mu)),
  with I the alignment of the (optionally normalised, `popo.normalize_gram`)
  gradients. An objective whose gradient agrees with the others' sum gains
  weight. `min_weight` > 0 mixes the result with the uniform weights,
  w <- (1 - K min_weight) w + min_weight, so that no weight reaches 0 (a
  weight of exactly 0 could never grow back under a multiplicative update).
  A non-finite step keeps the previous weights.
  """
  gram, _ = popo_lib.normalize_gram(s.gram, normalization, s.losses)
  step = eta * alignment(gram) / mu
  logits = jnp.log(jnp.maximum(weights_k, 1e-30)) + step
  new = jax.nn.softmax(logits)
  k = weights_k.shape[0]
  if min_weight * k >= 1:
    raise ValueError(f"popo min_weight {min_weight} leaves no mass for {k} "
                     "rewards (it must be < 1 / K).")
  if min_weight:
    new = (1.0 - k * min_weight) * new + min_weight
  return jnp.where(jnp.all(jnp.isfinite(new)), new, weights_k)


def mgda(weights_k: jax.Array, s: Signals,
         normalization: str = "l2") -> jax.Array:
  """The min-norm weights of the (normalised) gradients, as weights on the
  raw gradients (`popo.scale_weights`); a non-finite or all-zero Gram matrix
  keeps the previous weights."""
  gram, n = popo_lib.normalize_gram(s.gram, normalization, s.losses)
  w = popo_lib.scale_weights(popo_lib.min_norm_weights(gram), n)
  ok = jnp.all(jnp.isfinite(w)) & (jnp.max(jnp.diagonal(s.gram)) > 0)
  return jnp.where(ok, w, weights_k)


@dataclasses.dataclass(frozen=True)
class WeightRule:
  """A configured rule: `rule(weights_k, signals) -> weights_k`.

  Attributes:
    name: the rule's name (`RULES`).
    fn: (weights_k, Signals) -> weights_k.
    gradients: "none", or the per-reward gradients the rule needs: w.r.t.
      the parameters ("params") or the final hidden states ("hidden", MGDA-
      UB: one backward through the LM head only).
    layers: which parameters' gradients (`reward_gradients.select_leaves`):
      "all", "last:N" (the last N blocks, the final norm and an untied LM
      head) or "re:<regex>" on the parameter paths.
    groups: rollout groups the gradients are taken on (0: all).
  """
  name: str
  fn: Callable[[jax.Array, Signals], jax.Array]
  gradients: str = "none"
  layers: str = "all"
  groups: int = 0

  def __post_init__(self):
    if self.gradients not in GRADIENTS:
      raise ValueError(f"weighting gradients must be one of {GRADIENTS}, got "
                       f"{self.gradients!r}.")
    if self.groups < 0:
      raise ValueError(f"weighting groups must be >= 0, got {self.groups}.")
    # The spec's form now, so a typo fails before any loading (the block
    # count is checked against the parameters in the first step).
    if not re.fullmatch(r"all|last:[1-9][0-9]*|re:.+", self.layers):
      raise ValueError(f"unknown weighting layers {self.layers!r}; use "
                       "'all', 'last:N' (N >= 1) or 're:<regex>'.")

  def __call__(self, weights_k: jax.Array, s: Signals) -> jax.Array:
    return self.fn(weights_k, s)


RULES: Sequence[str] = ("fixed", "popo_light", "popo", "mgda")


def make(name: str,
         *,
         gradients: str = "params",
         layers: str = "all",
         groups: int = 0,
         eta: float = 1e-4,
         mu: float = 1e-5,
         normalization: str = "",
         min_weight: float = 0.0) -> WeightRule:
  """The rule `name` with its settings (the gradient settings only matter
  for popo and mgda; `normalization` "" takes the rule's default: "none"
  for popo as in the paper, "l2" for mgda)."""
  if name not in RULES:
    raise ValueError(f"unknown reward weighting {name!r}; known: "
                     f"{list(RULES)}.")
  if normalization and normalization not in popo_lib.NORMALIZATIONS:
    raise ValueError(f"unknown gradient normalisation {normalization!r}; use "
                     f"one of {popo_lib.NORMALIZATIONS}.")
  if name == "fixed":
    return WeightRule(name, fixed)
  if name == "popo_light":
    return WeightRule(name, popo_light)
  if name == "popo":
    if not mu > 0 or not eta >= 0:
      raise ValueError(f"popo needs eta >= 0 and mu > 0, got eta={eta}, "
                       f"mu={mu}.")
    if not 0 <= min_weight < 0.5:
      raise ValueError(f"min_weight must be in [0, 0.5), got {min_weight}.")
    fn = functools.partial(popo, eta=eta, mu=mu,
                           normalization=normalization or "none",
                           min_weight=min_weight)
  else:
    fn = functools.partial(mgda, normalization=normalization or "l2")
  if gradients == "none":
    raise ValueError(f"weighting {name!r} needs gradients ('params' or "
                     "'hidden'), got 'none'.")
  return WeightRule(name, fn, gradients, layers, groups)


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

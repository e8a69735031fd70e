"""Reward weighting: how the K reward columns become one scalar per rollout.

A weighting rule maps the state's current weights and this step's signals to
new weights, inside the jitted RL step (the weights live in the train state,
so a resumed run continues from the saved ones, and they are logged every
step). `WeightRule.applied` turns the rule's state into the weights the step
applies: the state itself, or with `min_weight` > 0 its Euclidean projection
onto {w >= min_weight, sum w = 1} (`floor`). The floor bounds what is
applied; the state evolves untouched (a weight that reaches 0 in the
state stays representable and can grow back through the rule itself).

How the weights enter the loss is `WeightRule.combine` (`COMBINES`):

  objectives  the loss is sum_k w_k L_k + KL, with L_k the policy objective
              of reward k alone (its own group advantages), exactly the L_k
              whose gradient g_k the gradient rules measure; the step is
              then along sum_k w_k g_k (the default of popo and mgda);
  rewards     the paper's form (methods §1.2c): the rewards are weighted,
              r = sum_k w_k r_k, and r is normalised within its group. With
              "std" advantages this applies w_k sigma_k / sigma_r (per
              group) to g_k, not w_k: a reward with a small in-group spread
              is under-weighted relative to what the rule computed (logged
              as `combine/effective/<reward>`). With "center" or "none"
              advantages the two forms coincide. The default of fixed and
              popo_light, whose weights come from no gradient.

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

from taiji_jax import registry
from taiji_jax.rl import popo as popo_lib

GRADIENTS = ("none", "params", "hidden")
COMBINES = ("objectives", "rewards")
# Gradient normalisations the RL rules accept. Sener & Koltun's "loss" and
# "loss+" divide by the objective's value, and the policy surrogate at
# ratio 1 with group-centred advantages is exactly 0 (its gradient is not):
# those weights would be noise.
RL_NORMALIZATIONS = ("none", "l2")


class Signals(NamedTuple):
  """What a rule may look at.

  Attributes:
    rewards_nk: (N, K) rewards (finite; invalid rows hold anything finite).
    valid_n: (N,) > 0 at the rows that count.
    group_size: G (static).
    gram: (K, K) Gram matrix of the per-reward gradients (gradient rules).
  """
  rewards_nk: jax.Array
  valid_n: jax.Array
  group_size: int
  gram: jax.Array | None = None


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
         normalization: str = "none") -> jax.Array:
  """One exponentiated-gradient step on the simplex (mirror descent).

  w <- softmax(log w + eta * I / mu) = normalize(w * exp(eta * I / mu)),
  with I the alignment of the (optionally l2-normalised,
  `popo.normalize_gram`) gradients. An objective whose gradient agrees with
  the others' sum gains weight. Computed in log space, so a huge step stays
  finite; a non-finite step keeps the previous weights. (A floor on the
  applied weights is `WeightRule.min_weight`, outside this update.)
  """
  gram, _ = popo_lib.normalize_gram(s.gram, normalization)
  step = eta * alignment(gram) / mu
  logits = jnp.log(jnp.maximum(weights_k, 1e-30)) + step
  new = jax.nn.softmax(logits)
  return jnp.where(jnp.all(jnp.isfinite(new)), new, weights_k)


def mgda(weights_k: jax.Array, s: Signals,
         normalization: str = "l2") -> jax.Array:
  """The min-norm weights of the (normalised) gradients, as weights on the
  raw gradients (`popo.scale_weights`); a non-finite or all-zero Gram matrix
  keeps the previous weights."""
  gram, n = popo_lib.normalize_gram(s.gram, normalization)
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
    combine: how the weights enter the loss (`COMBINES`).
    min_weight: the floor of the applied weights (`floor`; 0: none).
    fused: take the per-reward gradients from the first minibatch's own
      backward (K + 1 stacked cotangents: the K objectives and the KL
      term; no separate pass), the Gram matrix then being that
      minibatch's. Only with gradients "params", combine "objectives" and
      groups 0; `make` turns it on there unless asked not to.
  """
  name: str
  fn: Callable[[jax.Array, Signals], jax.Array]
  gradients: str = "none"
  layers: str = "all"
  groups: int = 0
  combine: str = "rewards"
  min_weight: float = 0.0
  fused: bool = False

  def __post_init__(self):
    if self.combine not in COMBINES:
      raise ValueError(f"weighting combine must be one of {COMBINES}, got "
                       f"{self.combine!r}.")
    if not 0 <= self.min_weight < 0.5:
      raise ValueError(f"weighting min_weight must be in [0, 0.5), got "
                       f"{self.min_weight}.")
    if self.fused and not (self.gradients == "params" and
                           self.combine == "objectives" and not self.groups):
      raise ValueError(
          "fused per-reward gradients need gradients='params', "
          f"combine='objectives' and groups=0; got gradients="
          f"{self.gradients!r}, combine={self.combine!r}, groups="
          f"{self.groups}.")
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

  def applied(self, weights_k: jax.Array) -> jax.Array:
    """The weights the step applies for the rule's state `weights_k`."""
    return floor(weights_k, self.min_weight) if self.min_weight else (
        weights_k)


def floor(weights_k: jax.Array, min_weight: float) -> jax.Array:
  """Euclidean projection of `weights_k` onto {w >= m, sum w = 1}.

  w = m + P(weights - m), P the projection onto the simplex scaled to
  1 - K m (sort-based, Duchi et al. 2008). Weights already >= m that sum
  to 1 are returned unchanged; the result sums to 1 and is >= m.

  Raises:
    ValueError: K m >= 1 (no mass left above the floor).
  """
  w = jnp.asarray(weights_k, jnp.float32)
  k = w.shape[0]
  if min_weight * k >= 1:
    raise ValueError(f"min_weight {min_weight} leaves no mass for {k} "
                     "rewards (it must be < 1 / K).")
  mass = 1.0 - k * min_weight
  v = w - min_weight
  u = jnp.sort(v)[::-1]
  css = jnp.cumsum(u) - mass
  idx = jnp.arange(1, k + 1, dtype=w.dtype)
  rho = jnp.sum((u - css / idx) > 0)
  theta = css[rho - 1] / rho.astype(w.dtype)
  return min_weight + jnp.maximum(v - theta, 0.0)


def _popo_factory(eta: float, mu: float, normalization: str):
  if not mu > 0 or not eta >= 0:
    raise ValueError(f"popo needs eta >= 0 and mu > 0, got eta={eta}, "
                     f"mu={mu}.")
  return functools.partial(popo, eta=eta, mu=mu, normalization=normalization)


# Each rule: a factory of its update from (eta, mu, normalization), with
# whether it needs per-reward gradients, its default combine mode and
# gradient normalisation.
RULES = registry.Registry("reward weighting")
RULES.add("fixed", lambda **_: fixed, gradients=False, combine="rewards")
RULES.add("popo_light", lambda **_: popo_light, gradients=False,
          combine="rewards")
RULES.add("popo", _popo_factory, gradients=True, combine="objectives",
          normalization="none")
RULES.add("mgda",
          lambda normalization, **_: functools.partial(
              mgda, normalization=normalization),
          gradients=True, combine="objectives", normalization="l2")


def make(name: str,
         *,
         gradients: str = "params",
         layers: str = "all",
         groups: int = 0,
         eta: float = 1e-4,
         mu: float = 1e-5,
         normalization: str = "",
         min_weight: float = 0.0,
         combine: str = "auto",
         fused: str | bool = "auto") -> WeightRule:
  """The rule `name` with its settings.

  The gradient settings only matter for popo and mgda; `normalization` ""
  takes the rule's default ("none" for popo as in the paper, "l2" for
  mgda); `combine` "auto" is "objectives" for popo and mgda and "rewards"
  for fixed and popo_light (module docstring); `fused` "auto" fuses the
  per-reward gradients into the first minibatch's backward wherever
  `WeightRule.fused` allows it.
  """
  factory, spec = RULES.get(name), RULES.defaults(name)
  if normalization in ("loss", "loss+"):
    raise ValueError(
        f"gradient normalisation {normalization!r} divides by the policy "
        "loss, which is exactly 0 at ratio 1 with group-centred advantages "
        "(the GRPO surrogate's value carries no scale); use "
        f"{RL_NORMALIZATIONS}.")
  if normalization and normalization not in RL_NORMALIZATIONS:
    raise ValueError(f"unknown gradient normalisation {normalization!r}; use "
                     f"one of {RL_NORMALIZATIONS}.")
  if combine == "auto":
    combine = spec["combine"]
  if isinstance(fused, str) and fused.lower() in ("true", "false"):
    fused = fused.lower() == "true"  # a config string
  if fused not in ("auto", True, False):
    raise ValueError(f"weighting fused must be 'auto', True or False, got "
                     f"{fused!r}.")
  common = dict(combine=combine, min_weight=min_weight)
  fn = factory(
      eta=eta, mu=mu,
      normalization=normalization or spec.get("normalization", "none"))
  if not spec["gradients"]:
    return WeightRule(name, fn, **common)
  if gradients == "none":
    raise ValueError(f"weighting {name!r} needs gradients ('params' or "
                     "'hidden'), got 'none'.")
  if fused == "auto":
    fused = gradients == "params" and combine == "objectives" and not groups
  return WeightRule(name, fn, gradients, layers, groups, fused=bool(fused),
                    **common)


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

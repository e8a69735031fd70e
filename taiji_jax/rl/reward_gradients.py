"""Per-reward policy gradients and their Gram matrix, inside the RL step.

The gradient-based weighting rules (`weighting.popo`, `weighting.mgda`) need,
at the step's parameters, the gradient g_k of one policy objective per
reward: the RL objective (GRPO, DAPO, ...) with reward k's own
group-relative advantages and without the KL term (which every objective
shares and which would otherwise pull their gradients together). Then only
the (K, K) Gram matrix G_ij = <g_i, g_j> and the K losses leave this module.

`make_gram_fn(...)` returns the pure

  gram_fn(params, roll, rewards_nk, valid_n) -> (gram (K, K), losses (K,))

computed with `popo.objective_gradients`: one forward pass over the
rollouts and one VJP applied to K stacked cotangents with `jax.vmap`, not K
backward passes. With respect to

- "params": the parameters chosen by `layers` (`select_leaves`); the others
  enter as constants, so the backward pass stops at the lowest chosen layer
  and no gradient of an unchosen parameter is ever formed;
- "hidden" (MGDA-UB, Sener & Koltun 2018 §3.3): the final hidden states
  that predict the completion tokens. The backward pass is the LM head's
  only; the hidden states come from the rollout (`RolloutConfig.keep_hidden`)
  or, when it did not keep them, from one extra forward pass.

With sharded parameters or batches every contraction of the Gram matrix is
local plus a reduction that XLA inserts, so the result does not depend on
the mesh (`tests/test_popo_gradients.py`, `tests/test_rl_pareto_step.py`).
"""

from __future__ import annotations

import re
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from taiji_jax.rl import combine
from taiji_jax.rl import objectives as obj_lib
from taiji_jax.rl import popo
from taiji_jax.rl import rollout as rollout_lib
from taiji_jax.rl import weighting

_BLOCK = re.compile(r"\['blocks'\]\[(\d+)\]")


def select_leaves(params, layers: str) -> list[bool]:
  """Which leaves of `params` (in `jax.tree.leaves` order) are chosen.

  Args:
    params: the policy's parameter pytree.
    layers: "all"; "last:N": the last N decoder blocks, the final norm and
      an untied LM head (the embedding, used at the input too, is left
      out); "re:<regex>": the leaves whose `jax.tree_util.keystr` path
      matches (`re.search`).

  Raises:
    ValueError: an unknown spec, N out of range, or nothing chosen.
  """
  paths = [
      jax.tree_util.keystr(p)
      for p, _ in jax.tree_util.tree_leaves_with_path(params)
  ]
  if layers == "all":
    chosen = [True] * len(paths)
  elif layers.startswith("last:"):
    try:
      n = int(layers[len("last:"):])
    except ValueError:
      raise ValueError(f"weighting layers {layers!r}: N in 'last:N' must be "
                       "an integer.") from None
    blocks = [_BLOCK.search(p) for p in paths]
    num_blocks = 1 + max((int(m.group(1)) for m in blocks if m), default=-1)
    if not 1 <= n <= num_blocks:
      raise ValueError(f"weighting layers {layers!r}: the decoder has "
                       f"{num_blocks} blocks.")
    chosen = [(m is not None and int(m.group(1)) >= num_blocks - n) or
              "final_norm" in p or "lm_head" in p
              for p, m in zip(paths, blocks)]
  elif layers.startswith("re:"):
    pattern = re.compile(layers[len("re:"):])
    chosen = [pattern.search(p) is not None for p in paths]
  else:
    raise ValueError(f"unknown weighting layers {layers!r}; use 'all', "
                     "'last:N' or 're:<regex>'.")
  if not any(chosen):
    raise ValueError(f"weighting layers {layers!r} choose no parameter of "
                     f"{len(paths)} (e.g. {paths[:3]}).")
  return chosen


def chosen_subtree(tree, chosen: Sequence[bool]) -> list:
  """The leaves of `tree` (or of a K-stacked gradient of it) that
  `select_leaves` chose, in leaf order."""
  return [x for x, c in zip(jax.tree.leaves(tree), chosen) if c]


def make_gram_fn(graphdef,
                 rollout_cfg: rollout_lib.RolloutConfig,
                 level_offsets: Sequence[int],
                 *,
                 objective: str,
                 objective_cfg: obj_lib.ObjectiveConfig,
                 advantage_kind: str,
                 rule: weighting.WeightRule,
                 allowed_v: jax.Array | None = None):
  """`gram_fn(params, roll, rewards_nk, valid_n) -> (gram, losses)`.

  Args:
    graphdef: the policy's graphdef.
    rollout_cfg: the rollouts' settings.
    level_offsets: `Vocab.level_offsets`.
    objective: the RL objective's name (`objectives.OBJECTIVES`).
    objective_cfg: its settings (the KL term is dropped here).
    advantage_kind: the train step's advantage kind (std, center, none,
      gdpo), applied to each reward alone.
    rule: the weighting rule (`gradients`, `layers`, `groups`).
    allowed_v: (V,) rationale tokens (reasoning rollouts).
  """
  if rule.gradients not in ("params", "hidden"):
    raise ValueError(f"rule {rule.name!r} takes no gradients.")
  loss_fn = obj_lib.get(objective)
  g = rollout_cfg.group_size
  logprob_fn = rollout_lib.policy_logprobs(graphdef, rollout_cfg,
                                           level_offsets, allowed_v)
  head_fn = rollout_lib.policy_head(graphdef, rollout_cfg, level_offsets,
                                    allowed_v)

  def gram_fn(params, roll: rollout_lib.Rollout, rewards_nk: jax.Array,
              valid_n: jax.Array):
    n = roll.items.shape[0]
    rows = n if not rule.groups else min(n, rule.groups * g)
    sub = jax.tree.map(lambda x: x[:rows], roll)
    r_nk = rewards_nk[:rows]
    v_n = valid_n[:rows]
    adv_nk = combine.per_reward_advantages(r_nk, v_n, g, advantage_kind)
    heads = combine.objective_heads(loss_fn, objective_cfg, sub, adv_nk, r_nk,
                                    v_n, g, with_kl=False)

    if rule.gradients == "hidden":
      frozen = jax.lax.stop_gradient(params)
      if sub.hidden is not None:
        h_ncd = sub.hidden
      else:
        h_ncd = jax.lax.stop_gradient(
            rollout_lib.completion_hidden(
                nnx.merge(graphdef, frozen), sub.tokens, sub.attention,
                sub.think_mask.shape[1]))
      forward = lambda h: head_fn(frozen, h, sub)
      primal = h_ncd
    else:
      leaves, treedef = jax.tree_util.tree_flatten(params)
      chosen = select_leaves(params, rule.layers)

      def forward(picked):
        it = iter(picked)
        full = [
            next(it) if c else jax.lax.stop_gradient(x)
            for x, c in zip(leaves, chosen)
        ]
        return logprob_fn(jax.tree_util.tree_unflatten(treedef, full),
                          sub)[0]

      primal = [x for x, c in zip(leaves, chosen) if c]
    losses, grads, _ = popo.objective_gradients(forward, heads, primal)
    return popo.gram_matrix(grads), losses

  return gram_fn


def alignments(gram: jax.Array, weights_k: jax.Array) -> jax.Array:
  """(K,) a_k = <g_k, d> / ||d||^2 of each objective with the direction
  d = sum_j w_j g_j (0 where d = 0). For the min-norm weights a_k >= 1,
  with equality on the support (KKT)."""
  gw = gram @ weights_k
  dd = weights_k @ gw
  return jnp.where(dd > 0, gw / jnp.where(dd > 0, dd, 1.0), 0.0)


def gram_metrics(gram: jax.Array, names: Sequence[str],
                 weights_k: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-reward gradient norms, pairwise cosines, POPO's indicators I_k
  (`grads/popo_I/*`) and, given the applied weights, the alignments a_k
  with their direction (`grads/alignment/*`, `alignments`)."""
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  popo_i = weighting.alignment(gram)
  align = None if weights_k is None else alignments(gram, weights_k)
  out = {}
  for i, a in enumerate(names):
    out[f"grads/norm/{a}"] = norms[i]
    out[f"grads/popo_I/{a}"] = popo_i[i]
    if align is not None:
      out[f"grads/alignment/{a}"] = align[i]
    for j in range(i + 1, len(names)):
      denom = jnp.maximum(norms[i] * norms[j], 1e-30)
      out[f"grads/cos/{a}|{names[j]}"] = gram[i, j] / denom
  return out

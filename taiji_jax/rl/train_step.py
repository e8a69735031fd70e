"""The jitted RL update: (train state, rollout batch, rewards) -> new state.

`make_train_step(...)` returns the pure

  train_step(state, roll, rewards_nk) -> (state, metrics)

over a `rollout.Rollout` of B groups of G rollouts and its raw (N, K)
rewards. In order:

1. rows with a non-finite reward are masked out (never averaged, never in a
   group statistic, never in the loss);
2. the weighting rule (`rl/weighting.py`) gives the reward weights from the
   state's current ones and this batch; the gradient-based rules (popo,
   mgda) first get the Gram matrix of the per-reward policy gradients at
   the step's parameters, either from a separate pass over the batch
   (`rl/reward_gradients.py`: one forward, one vmapped VJP) or, with
   `WeightRule.fused`, from the first minibatch's own backward (K + 1
   stacked cotangents: the K objectives and the KL term; that minibatch's
   update is then sum_k w_k g_k + g_KL with no second backward). The
   applied weights are `WeightRule.applied` of the rule's state (the
   `min_weight` floor);
3. advantages, by `WeightRule.combine` (`rl/combine.py`): "objectives":
   each reward's own group-relative advantages, and the loss
   sum_k w_k L_k + KL; "rewards" (the paper's form): the advantages of the
   combined reward `rewards @ w` (or `gdpo`: per-reward normalisation,
   weighted sum, batch whitening), and the objective on them;
4. DAPO-style dynamic sampling (`keep_groups` > 0): the batch holds more
   groups than updated on; the first `keep_groups` groups whose (combined,
   or with "objectives" any) reward differs are kept, fixed shapes;
5. `epochs` passes over `num_minibatches` minibatches of whole groups
   (shuffled by a key folded from the step), one optax update each on the
   objective (`rl/objectives.py`); an update whose loss or gradients are not
   finite is skipped (the parameters and optimizer state stay as they were)
   and counted in `skipped`.

Logged every step: the applied weights (`weights/*`, and the rule's state
`weights_state/*` under a floor); with gradients, each reward's gradient
norm, the pairwise cosines, POPO's I_k and, with "objectives", the
alignment a_k = <g_k, d> / ||d||^2 with the applied direction d = sum_k
w_k g_k (`grads/*`); with "rewards" and "std" advantages, the weights the
step effectively applied to each g_k (`combine/effective/*`).

The state is {"params", "opt_state", "step" (RL steps), "reward_weights"}.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from taiji_jax.rl import advantages as adv_lib
from taiji_jax.rl import combine
from taiji_jax.rl import objectives as obj_lib
from taiji_jax.rl import popo
from taiji_jax.rl import reward_gradients
from taiji_jax.rl import rewards as rewards_lib
from taiji_jax.rl import rollout as rollout_lib
from taiji_jax.rl import weighting


def _masked_mean(x, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(mask > 0, x, 0.0)) / jnp.maximum(mask.sum(), 1.0)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(graphdef,
                    tx: optax.GradientTransformation,
                    rollout_cfg: rollout_lib.RolloutConfig,
                    level_offsets: Sequence[int],
                    reward_names: Sequence[str],
                    *,
                    objective: str,
                    objective_cfg: obj_lib.ObjectiveConfig,
                    weight_rule: weighting.WeightRule,
                    advantage: str = "auto",
                    num_minibatches: int = 1,
                    epochs: int = 1,
                    keep_groups: int = 0,
                    allowed_v: jax.Array | None = None,
                    seed: int = 0):
  """The pure train step (module docstring); jit it with donated state.

  Args:
    graphdef: the policy's graphdef.
    tx: the optimizer.
    rollout_cfg: the rollouts' settings (group size, temperature, ...).
    level_offsets: `Vocab.level_offsets`.
    reward_names: the reward columns' names (for the logs).
    objective: a name of `objectives.OBJECTIVES`.
    objective_cfg: its settings.
    weight_rule: a `weighting.WeightRule` (`weighting.make(name, ...)`).
    advantage: "auto" (the objective's default), "std", "center", "none"
      or "gdpo".
    num_minibatches: minibatches per pass (divides the updated groups).
    epochs: passes over the rollout batch.
    keep_groups: dynamic sampling: groups updated on (0: all).
    allowed_v: (V,) rationale tokens (reasoning rollouts).
    seed: the minibatch shuffling's seed.
  """
  loss_fn_obj = obj_lib.get(objective)
  kind = obj_lib.default_advantage(objective) if advantage == "auto" else (
      advantage)
  if kind not in ("std", "center", "none", "gdpo"):
    raise ValueError(f"unknown advantage {advantage!r}; use auto, std, "
                     "center, none or gdpo.")
  per_objective = weight_rule.combine == "objectives"
  if per_objective and kind == "gdpo":
    raise ValueError(
        "advantage 'gdpo' with combine='objectives': each objective already "
        "uses its own reward's group-normalised advantages (GDPO's "
        "per-reward normalisation); use advantage 'std' (or 'auto'), or "
        "combine='rewards' for GDPO's batch-whitened sum.")
  g = rollout_cfg.group_size
  logprob_fn = rollout_lib.policy_logprobs(graphdef, rollout_cfg,
                                           level_offsets, allowed_v)
  names = list(reward_names)
  with_kl = bool(objective_cfg.kl_coef)
  gram_fn = None
  if weight_rule.gradients != "none" and not weight_rule.fused:
    gram_fn = reward_gradients.make_gram_fn(
        graphdef,
        rollout_cfg,
        level_offsets,
        objective=objective,
        objective_cfg=objective_cfg,
        advantage_kind=kind,
        rule=weight_rule,
        allowed_v=allowed_v)

  def coefficients(weights_k):
    """The heads' weights: the K objectives', then the KL term's 1."""
    if with_kl:
      return jnp.concatenate([weights_k, jnp.ones((1,), weights_k.dtype)])
    return weights_k

  def objective_metrics(mb, weights_k, logp, entropy):
    """The objective's own logs (clip fraction, KL, ...) and the entropy, on
    the combined advantages; with "rewards" also the loss."""
    mb_roll, mb_adv, mb_rewards, mb_valid = mb
    if per_objective:
      mb_adv, mb_rewards = mb_adv @ weights_k, mb_rewards @ weights_k
    batch = rollout_lib.policy_batch(mb_roll, logp, mb_adv, mb_rewards,
                                     mb_valid, g)
    loss, metrics = loss_fn_obj(batch, objective_cfg)
    token_mask = mb_roll.loss_mask * mb_valid[:, None]
    return loss, dict(metrics, entropy=_masked_mean(entropy, token_mask))

  def heads_of(mb):
    """logp -> the K per-reward objectives (+ the KL term) of a minibatch."""
    mb_roll, mb_adv, mb_rewards, mb_valid = mb
    return combine.objective_heads(loss_fn_obj, objective_cfg, mb_roll,
                                   mb_adv, mb_rewards, mb_valid, g, with_kl)

  def minibatch_loss(mb, weights_k):
    """loss(params) -> (loss, metrics) of a minibatch under `weights_k`."""

    def loss_fn(p):
      logp, entropy = logprob_fn(p, mb[0])
      loss, metrics = objective_metrics(mb, weights_k, logp, entropy)
      if per_objective:
        loss = heads_of(mb)(logp) @ coefficients(weights_k)
      return loss, metrics

    return loss_fn

  def apply(params, opt_state, loss, grads, metrics):
    ok = jnp.isfinite(loss) & _all_finite(grads)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(
        lambda a, c: jnp.where(ok, a, c), new, old)
    metrics = dict(
        metrics,
        loss=jnp.where(ok, loss, 0.0),
        grad_norm=jnp.where(ok, optax.tree.norm(grads), 0.0),
        skipped=(~ok).astype(jnp.float32))
    return (keep(new_params, params), keep(new_opt, opt_state)), metrics

  def fused_update(params, opt_state, mb, state_w, signals):
    """The first minibatch's update, its per-reward gradients and weights
    from one forward and one VJP of K (+ KL) stacked cotangents."""
    heads = heads_of(mb)
    losses, grads_k, (logp, entropy) = popo.objective_gradients(
        lambda p: logprob_fn(p, mb[0]), lambda out: heads(out[0]), params)
    k = len(names)
    chosen = reward_gradients.select_leaves(params, weight_rule.layers)
    picked = [x[:k] for x in reward_gradients.chosen_subtree(grads_k, chosen)]
    gram = popo.gram_matrix(picked)
    new_state_w = weight_rule(state_w, signals._replace(gram=gram))
    weights_k = weight_rule.applied(new_state_w)
    coef = coefficients(weights_k)
    grads = jax.tree.map(lambda x: jnp.tensordot(coef, x, axes=1), grads_k)
    metrics = objective_metrics(mb, weights_k, logp, entropy)[1]
    carry, metrics = apply(params, opt_state, losses @ coef, grads, metrics)
    return carry, metrics, gram, new_state_w, weights_k

  def train_step(state, roll: rollout_lib.Rollout, rewards_nk: jax.Array):
    n = roll.items.shape[0]
    b = n // g
    finite_n = rewards_lib.finite_rows(rewards_nk)
    safe_nk = jnp.where(finite_n[:, None], rewards_nk, 0.0)
    valid_n = finite_n.astype(jnp.float32)
    signals = weighting.Signals(safe_nk, valid_n, g)
    gram = None
    if gram_fn is not None:
      gram, _ = gram_fn(state["params"], roll, safe_nk, valid_n)
      signals = signals._replace(gram=gram)
    state_w = weights_k = None
    if not weight_rule.fused:
      state_w = weight_rule(state["reward_weights"], signals)
      weights_k = weight_rule.applied(state_w)
    if per_objective:
      adv = combine.per_reward_advantages(safe_nk, valid_n, g, kind)
      informative_b = jnp.any(
          jax.vmap(lambda r: adv_lib.group_has_variance(r, valid_n, g),
                   in_axes=1, out_axes=1)(safe_nk), axis=1)
      data = (roll, adv, safe_nk, valid_n)
    else:
      reward_n = safe_nk @ weights_k
      if kind == "gdpo":
        adv = adv_lib.gdpo_advantages(safe_nk, valid_n, g, weights_k)
      else:
        adv = adv_lib.group_advantages(reward_n, valid_n, g, kind)
      informative_b = adv_lib.group_has_variance(reward_n, valid_n, g)
      data = (roll, adv, reward_n, valid_n)
    if keep_groups:
      idx_b, keep_b = adv_lib.pick_groups(informative_b, keep_groups)
      data = adv_lib.gather_groups(data, idx_b, g)
      data = data[:3] + (data[3] * jnp.repeat(keep_b, g).astype(jnp.float32),)
      b = keep_groups
    if b % num_minibatches:
      raise ValueError(f"{b} groups per update do not split into "
                       f"{num_minibatches} minibatches.")
    per = b // num_minibatches
    step_key = jax.random.fold_in(jax.random.key(seed), state["step"])
    orders = jnp.stack([
        jax.random.permutation(jax.random.fold_in(step_key, e), b)
        for e in range(epochs)
    ]).reshape(epochs * num_minibatches, per)

    def rows_of(groups_m):
      rows = (groups_m[:, None] * g + jnp.arange(g)[None]).reshape(-1)
      return jax.tree.map(lambda x: x[rows], data)

    params, opt_state = state["params"], state["opt_state"]
    first = None  # the fused update's metrics
    if weight_rule.fused:
      (params, opt_state), first, gram, state_w, weights_k = fused_update(
          params, opt_state, rows_of(orders[0]), state["reward_weights"],
          signals)
      orders = orders[1:]

    def update(carry, groups_m):
      (loss, metrics), grads = jax.value_and_grad(
          minibatch_loss(rows_of(groups_m), weights_k), has_aux=True)(
              carry[0])
      return apply(*carry, loss, grads, metrics)

    per_update = None
    if orders.shape[0]:
      (params, opt_state), per_update = jax.lax.scan(
          update, (params, opt_state), orders)
    if first is not None:
      first = jax.tree.map(lambda v: v[None], first)
      per_update = first if per_update is None else jax.tree.map(
          lambda a, c: jnp.concatenate([a, c]), first, per_update)
    metrics = {k: jnp.mean(v) for k, v in per_update.items()}
    metrics["skipped"] = jnp.sum(per_update["skipped"])
    metrics["updates"] = jnp.asarray(per_update["skipped"].shape[0],
                                     jnp.float32)
    reward_n = safe_nk @ weights_k
    adv_n = adv @ weights_k if per_objective else adv
    metrics.update(rewards_lib.reward_stats(rewards_nk, names))
    metrics["reward/combined/mean"] = _masked_mean(reward_n, finite_n)
    metrics["reward/nonfinite_rows"] = 1.0 - finite_n.mean()
    metrics["advantage/abs_mean"] = _masked_mean(jnp.abs(adv_n), finite_n)
    metrics["groups/zero_variance"] = 1.0 - informative_b.mean()
    metrics["answers/empty"] = jnp.mean(roll.items <= 0)
    metrics["answers/distinct_per_group"] = jnp.mean(
        _distinct_per_group(roll.items.reshape(-1, g)))
    if rollout_cfg.think:
      metrics["think/closed"] = roll.closed.mean()
      metrics["think/length"] = roll.think_length.mean()
    for k, name in enumerate(names):
      metrics[f"weights/{name}"] = weights_k[k]
      if weight_rule.min_weight:
        metrics[f"weights_state/{name}"] = state_w[k]
    if not per_objective and kind == "std" and len(names) > 1:
      eff = combine.effective_weights(safe_nk, valid_n, g, weights_k)
      for k, name in enumerate(names):
        metrics[f"combine/effective/{name}"] = eff[k]
    if gram is not None:
      # The alignments are with the applied direction only where the step
      # is along sum_k w_k g_k (combine="objectives").
      metrics.update(
          reward_gradients.gram_metrics(gram, names,
                                        weights_k if per_objective else None))
    new_state = {
        "params": params,
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "reward_weights": state_w,
    }
    return new_state, metrics

  return train_step


def _distinct_per_group(items_bg: jax.Array) -> jax.Array:
  """(B,) number of distinct items among each group's answers."""
  s = jnp.sort(items_bg, axis=1)
  return 1 + jnp.sum(s[:, 1:] != s[:, :-1], axis=1)


def init_state(params, tx: optax.GradientTransformation,
               weights_k: jax.Array) -> dict[str, Any]:
  """The RL train state of policy parameters `params`."""
  return {
      "params": params,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "reward_weights": jnp.asarray(weights_k, jnp.float32),
  }

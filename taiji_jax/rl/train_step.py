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
   the step's parameters (`rl/reward_gradients.py`: one forward, one
   vmapped VJP). The combined reward is `rewards @ w`, and the update below
   is one optimizer step per minibatch on the objective of that reward;
3. advantages: group-normalised (`rl/advantages.py`; the objective's
   default, or `gdpo`: per-reward normalisation);
4. DAPO-style dynamic sampling (`keep_groups` > 0): the batch holds more
   groups than updated on; the first `keep_groups` groups whose rewards
   differ are kept, fixed shapes;
5. `epochs` passes over `num_minibatches` minibatches of whole groups
   (shuffled by a key folded from the step), one optax update each on the
   objective (`rl/objectives.py`); an update whose loss or gradients are not
   finite is skipped (the parameters and optimizer state stay as they were)
   and counted in `skipped`.

The state is {"params", "opt_state", "step" (RL steps), "reward_weights"}.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from taiji_jax.rl import advantages as adv_lib
from taiji_jax.rl import objectives as obj_lib
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
  kind = obj_lib.DEFAULT_ADVANTAGE[objective] if advantage == "auto" else (
      advantage)
  if kind not in ("std", "center", "none", "gdpo"):
    raise ValueError(f"unknown advantage {advantage!r}; use auto, std, "
                     "center, none or gdpo.")
  g = rollout_cfg.group_size
  logprob_fn = rollout_lib.policy_logprobs(graphdef, rollout_cfg,
                                           level_offsets, allowed_v)
  names = list(reward_names)
  gram_fn = None
  if weight_rule.gradients != "none":
    gram_fn = reward_gradients.make_gram_fn(
        graphdef,
        rollout_cfg,
        level_offsets,
        objective=objective,
        objective_cfg=objective_cfg,
        advantage_kind=kind,
        rule=weight_rule,
        allowed_v=allowed_v)

  def train_step(state, roll: rollout_lib.Rollout, rewards_nk: jax.Array):
    n = roll.items.shape[0]
    b = n // g
    finite_n = rewards_lib.finite_rows(rewards_nk)
    safe_nk = jnp.where(finite_n[:, None], rewards_nk, 0.0)
    valid_n = finite_n.astype(jnp.float32)
    signals = weighting.Signals(safe_nk, valid_n, g)
    grad_metrics = {}
    if gram_fn is not None:
      gram, losses = gram_fn(state["params"], roll, safe_nk, valid_n)
      signals = signals._replace(gram=gram, losses=losses)
      grad_metrics = reward_gradients.gram_metrics(gram, names)
    weights_k = weight_rule(state["reward_weights"], signals)
    reward_n = safe_nk @ weights_k
    if kind == "gdpo":
      adv_n = adv_lib.gdpo_advantages(safe_nk, valid_n, g, weights_k)
    else:
      adv_n = adv_lib.group_advantages(reward_n, valid_n, g, kind)
    informative_b = adv_lib.group_has_variance(reward_n, valid_n, g)
    data = (roll, adv_n, reward_n, valid_n)
    if keep_groups:
      idx_b, keep_b = adv_lib.dynamic_sampling(reward_n, valid_n, g,
                                               keep_groups)
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

    def update(carry, groups_m):
      params, opt_state = carry
      rows = (groups_m[:, None] * g + jnp.arange(g)[None]).reshape(-1)
      mb_roll, mb_adv, mb_reward, mb_valid = jax.tree.map(
          lambda x: x[rows], data)

      def loss_fn(p):
        logp, entropy = logprob_fn(p, mb_roll)
        batch = rollout_lib.policy_batch(mb_roll, logp, mb_adv, mb_reward,
                                         mb_valid, g)
        loss, metrics = loss_fn_obj(batch, objective_cfg)
        token_mask = mb_roll.loss_mask * mb_valid[:, None]
        metrics = dict(metrics, entropy=_masked_mean(entropy, token_mask))
        return loss, metrics

      (loss, metrics), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(params)
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

    (params, opt_state), per_update = jax.lax.scan(
        update, (state["params"], state["opt_state"]), orders)
    metrics = {k: jnp.mean(v) for k, v in per_update.items()}
    metrics["skipped"] = jnp.sum(per_update["skipped"])
    metrics["updates"] = jnp.asarray(orders.shape[0], jnp.float32)
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
    metrics.update(grad_metrics)
    new_state = {
        "params": params,
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "reward_weights": weights_k,
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

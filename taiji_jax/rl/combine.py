"""How K reward columns become the loss of one RL update (pure functions).

Two forms (`weighting.COMBINES`), both given the same weights w:

- "objectives": loss = sum_k w_k L_k + KL, where L_k is the policy
  objective (GRPO, DAPO, ...) computed with reward k's own group-relative
  advantages (`per_reward_advantages`) and no KL term, and KL is the
  objective's KL-to-reference term, stated once and left out of the
  weighted part. L_k is exactly the loss whose gradient g_k the gradient
  rules measure (`reward_gradients`), so the step is along
  sum_k w_k g_k + g_KL, the direction the rule chose. For objectives that
  compare rollouts by reward (DPO, RSPO), L_k is the objective on reward k.
- "rewards": the paper's form, the objective on the weighted reward
  r = sum_k w_k r_k with one group normalisation of r.

`objective_heads` builds the function logp -> (K + 1,) [L_1..L_K, KL] that
both the loss and the fused per-reward gradients (`popo.objective_gradients`
on K + 1 cotangents) use. The KL part is the objective's loss at zero
advantage minus the same loss without the KL coefficient: the surrogate of
every advantage objective is exactly 0 at A = 0, and the pairwise ones do
not use the coefficient, so the difference is the KL term exactly, in the
objective's own aggregation (per sequence, per token or constant).

`effective_weights` is what the "rewards" form applies to g_k for "std"
advantages: in group b, A = (r - mean) / sigma_r = sum_k (w_k sigma_bk /
sigma_br) A_k, so w_k sigma_bk / sigma_br instead of w_k.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from taiji_jax.rl import advantages as adv_lib
from taiji_jax.rl import objectives as obj_lib
from taiji_jax.rl import rollout as rollout_lib


def per_reward_advantages(rewards_nk: jax.Array, valid_n: jax.Array,
                          group_size: int, kind: str) -> jax.Array:
  """(N, K) group-relative advantages of each reward alone (`kind` as in
  `advantages.group_advantages`; GDPO's per-reward normalisation is
  "std")."""
  kind = "std" if kind == "gdpo" else kind
  return jax.vmap(
      lambda r_n: adv_lib.group_advantages(r_n, valid_n, group_size, kind),
      in_axes=1,
      out_axes=1)(rewards_nk)


def without_kl(cfg: obj_lib.ObjectiveConfig) -> obj_lib.ObjectiveConfig:
  return dataclasses.replace(cfg, kl_coef=0.0)


def objective_heads(loss_fn: obj_lib.Objective,
                    cfg: obj_lib.ObjectiveConfig,
                    roll: rollout_lib.Rollout,
                    adv_nk: jax.Array,
                    rewards_nk: jax.Array,
                    valid_n: jax.Array,
                    group_size: int,
                    with_kl: bool = True
                   ) -> Callable[[jax.Array], jax.Array]:
  """`heads(logp (N, C)) -> (K [+ 1],)`: the K per-reward objectives
  (module docstring) and, with `with_kl`, the KL term last."""
  head_cfg = without_kl(cfg)

  def heads(logp_nc: jax.Array) -> jax.Array:

    def one(adv_n, r_n):
      batch = rollout_lib.policy_batch(roll, logp_nc, adv_n, r_n, valid_n,
                                       group_size)
      return loss_fn(batch, head_cfg)[0]

    per_k = jax.vmap(one, in_axes=(1, 1))(adv_nk, rewards_nk)
    if not with_kl:
      return per_k
    return jnp.concatenate([per_k, kl_term(loss_fn, cfg, roll, logp_nc,
                                           rewards_nk[:, 0], valid_n,
                                           group_size)[None]])

  return heads


def kl_term(loss_fn: obj_lib.Objective, cfg: obj_lib.ObjectiveConfig,
            roll: rollout_lib.Rollout, logp_nc: jax.Array,
            rewards_n: jax.Array, valid_n: jax.Array,
            group_size: int) -> jax.Array:
  """The objective's KL-to-reference term alone (module docstring); 0
  exactly when `cfg.kl_coef` is 0."""
  if not cfg.kl_coef:
    return jnp.zeros((), jnp.float32)
  batch = rollout_lib.policy_batch(roll, logp_nc, jnp.zeros_like(rewards_n),
                                   rewards_n, valid_n, group_size)
  return loss_fn(batch, cfg)[0] - loss_fn(batch, without_kl(cfg))[0]


def effective_weights(rewards_nk: jax.Array, valid_n: jax.Array,
                      group_size: int, weights_k: jax.Array,
                      eps: float = 1e-6) -> jax.Array:
  """(K,) the weights the "rewards" form applies to each g_k with "std"
  advantages: mean over the groups where the combined reward varies of
  w_k sigma_bk / (sigma_br + eps); w itself where no group varies."""
  g = group_size
  k = rewards_nk.shape[1]
  combined_n = rewards_nk @ weights_k
  valid_bg = (jnp.asarray(valid_n) > 0).reshape(-1, g)

  def std_b(x_n):
    dev = adv_lib.group_advantages(x_n, valid_n, g, "center").reshape(-1, g)
    cnt = jnp.maximum(jnp.sum(valid_bg, axis=1), 1)
    return jnp.sqrt(jnp.sum(jnp.where(valid_bg, dev * dev, 0.0), axis=1) /
                    cnt)

  sig_bk = jax.vmap(std_b, in_axes=1, out_axes=1)(rewards_nk)
  sig_b = std_b(combined_n)
  used_b = adv_lib.group_has_variance(combined_n, valid_n, g)
  ratio_bk = weights_k[None] * sig_bk / (sig_b[:, None] + eps)
  used = jnp.sum(used_b)
  mean_k = jnp.sum(jnp.where(used_b[:, None], ratio_bk, 0.0),
                   axis=0) / jnp.maximum(used, 1)
  return jnp.where(used > 0, mean_k, jnp.broadcast_to(weights_k, (k,)))

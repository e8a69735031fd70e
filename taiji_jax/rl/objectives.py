"""Policy objectives of the GRPO family, registered by name.

Every objective is a pure function

  fn(batch: PolicyBatch, cfg: ObjectiveConfig) -> (loss, metrics)

with a scalar float32 loss to *minimise* (the negated objective) and a dict
of scalar metrics. It is differentiable w.r.t. `batch.logp` (the caller
computes the log-probs from the parameters); `cfg` is static (closed over or
a static argument of `jax.jit`).

  grpo     DeepSeekMath's GRPO: clipped ratio, k3 KL to the reference,
           per-sample length normalisation;
  dr_grpo  Dr. GRPO (2503.20783): no length normalisation (constant width
           C) and centred advantages;
  dapo     DAPO (2503.14476): token-level mean, clip-higher (eps_high);
  ecpo     OneRec's early-clipped GRPO: the behaviour probability is
           raised so that the ratio never exceeds 1 + eps_high + delta,
           bounding the gradient of negative-advantage tokens;
  gbpo     OneRec-V2's Gradient-Bounded Policy Optimisation: no clipping,
           the denominator is adapted so the gradient stays bounded;
  dpo      DPO on self-generated pairs (OneRec's iterative preference
           alignment): best vs worst rollout of each group;
  rspo     our formulation of GR4AD's Ranking-Guided Softmax Preference
           Optimisation (see `rspo`).

Rows with `valid == 0` and tokens with `mask == 0` are excluded with
`jnp.where` before any arithmetic (their log-probs, rewards or advantages
may be NaN or inf). `valid` and `mask` are read as 0/1 (> 0 counts).
Exponentials of log-ratios are taken of values clamped at `MAX_LOG_RATIO`
(e^20 ~ 5e8): far beyond any clip range, it only keeps a wildly off-policy
token from overflowing to inf (and a NaN gradient); such tokens then get no
gradient through the ratio.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from taiji_jax import registry
from taiji_jax.rl import advantages as adv_lib

MAX_LOG_RATIO = 20.0
_NEG = -1e30  # a finite -inf for masked logsumexp terms

Metrics = dict[str, jax.Array]
Objective = Callable[["PolicyBatch", "ObjectiveConfig"], tuple[jax.Array,
                                                                Metrics]]


class PolicyBatch(NamedTuple):
  """N = B * G rollouts (a group's rows adjacent) of C completion tokens.

  Attributes:
    logp: (N, C) current-policy log-probs of the completion tokens (the
      differentiated input).
    old_logp: (N, C) behaviour-policy log-probs (rollout time), constant.
    ref_logp: (N, C) frozen reference policy (the SFT model).
    mask: (N, C) float 1 on sampled completion tokens, 0 else.
    advantages: (N,) per-sample advantage.
    rewards: (N,) the scalar (combined) reward; the orderings of DPO/RSPO.
    valid: (N,) float 1 for samples that count (0: dropped).
    group_size: G, static. A NamedTuple's fields are all pytree leaves, so
      build the batch inside the jitted function (or close over it) rather
      than passing it as a jit argument, which would trace G.
  """
  logp: jax.Array
  old_logp: jax.Array
  ref_logp: jax.Array
  mask: jax.Array
  advantages: jax.Array
  rewards: jax.Array
  valid: jax.Array
  group_size: int


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Static settings of an objective (`defaults(name)`: the paper's).

  Attributes:
    eps_low: the ratio is clipped below at 1 - eps_low.
    eps_high: and above at 1 + eps_high (DAPO's clip-higher: 0.28).
    kl_coef: beta of the per-token k3 KL to the reference (0: none).
    delta: ECPO's early-clip margin above 1 + eps_high.
    beta: the DPO / RSPO temperature.
  """
  eps_low: float = 0.2
  eps_high: float = 0.2
  kl_coef: float = 0.0
  delta: float = 0.1
  beta: float = 0.1

  def __post_init__(self):
    if not 0 <= self.eps_low < 1:
      raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}.")
    for name in ("eps_high", "kl_coef", "delta"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
    if not self.beta > 0:
      raise ValueError(f"beta must be > 0, got {self.beta}.")


class _Tokens(NamedTuple):
  """The batch with every excluded entry replaced by a finite 0."""
  logp: jax.Array  # (N, C)
  old_logp: jax.Array  # (N, C)
  ref_logp: jax.Array  # (N, C)
  tok: jax.Array  # (N, C) bool: masked token of a valid sample
  tok_f: jax.Array  # (N, C) float32 of tok
  valid: jax.Array  # (N,) bool
  valid_f: jax.Array  # (N,) float32
  adv: jax.Array  # (N,)
  rewards: jax.Array  # (N,)


def _clean(batch: PolicyBatch) -> _Tokens:
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  valid = f32(batch.valid) > 0
  tok = (f32(batch.mask) > 0) & valid[:, None]
  zero = lambda x: jnp.where(tok, f32(x), 0.0)
  return _Tokens(
      logp=zero(batch.logp),
      old_logp=zero(batch.old_logp),
      ref_logp=zero(batch.ref_logp),
      tok=tok,
      tok_f=tok.astype(jnp.float32),
      valid=valid,
      valid_f=valid.astype(jnp.float32),
      adv=jnp.where(valid, f32(batch.advantages), 0.0),
      rewards=jnp.where(valid, f32(batch.rewards), 0.0))


def _exp(log_x: jax.Array) -> jax.Array:
  return jnp.exp(jnp.minimum(log_x, MAX_LOG_RATIO))


def _k3(t: _Tokens) -> jax.Array:
  """(N, C) k3 estimate of KL(pi || ref): e^(ref - logp) - (ref - logp) - 1.

  Unbiased for samples of pi, always >= 0 (Schulman's k3; DeepSeekMath).
  """
  x = jnp.minimum(t.ref_logp - t.logp, MAX_LOG_RATIO)
  return jnp.exp(x) - x - 1.0


def _token_mean(x_nc: jax.Array, t: _Tokens) -> jax.Array:
  """Mean of x over the masked tokens of valid samples."""
  return jnp.sum(jnp.where(t.tok, x_nc, 0.0)) / jnp.maximum(
      jnp.sum(t.tok_f), 1.0)


def _clipped_surrogate(ratio_nc, adv_n, cfg):
  adv_nc = adv_n[:, None]
  clipped = jnp.clip(ratio_nc, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
  return jnp.minimum(ratio_nc * adv_nc, clipped * adv_nc)


def _with_kl(surrogate_nc, kl_nc, cfg):
  if cfg.kl_coef:
    return surrogate_nc - cfg.kl_coef * kl_nc
  return surrogate_nc


def _token_metrics(t: _Tokens, ratio_nc, clip_ratio_nc, kl_nc, cfg) -> Metrics:
  outside = ((clip_ratio_nc < 1.0 - cfg.eps_low) |
             (clip_ratio_nc > 1.0 + cfg.eps_high)).astype(jnp.float32)
  return {
      "clip_frac": _token_mean(outside, t),
      "kl": _token_mean(kl_nc, t),
      "ratio": _token_mean(ratio_nc, t),
  }


def _sequence_mean_loss(obj_nc: jax.Array, t: _Tokens) -> jax.Array:
  """GRPO's aggregation: - mean_i (1/|o_i|) sum_t obj (valid samples)."""
  len_n = jnp.maximum(jnp.sum(t.tok_f, axis=1), 1.0)
  per_n = jnp.sum(jnp.where(t.tok, obj_nc, 0.0), axis=1) / len_n
  return -jnp.sum(jnp.where(t.valid, per_n, 0.0)) / jnp.maximum(
      jnp.sum(t.valid_f), 1.0)


def _ratio(t: _Tokens) -> jax.Array:
  return _exp(t.logp - t.old_logp)


def grpo(batch: PolicyBatch, cfg: ObjectiveConfig) -> tuple[jax.Array,
                                                            Metrics]:
  """GRPO (DeepSeekMath, 2402.03300).

  obj_t = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) - kl_coef KL_t
  with rho = pi / pi_old and the k3 KL to the reference; each sample's
  tokens are averaged (1 / |o_i|), then the valid samples.
  """
  t = _clean(batch)
  ratio, kl = _ratio(t), _k3(t)
  obj = _with_kl(_clipped_surrogate(ratio, t.adv, cfg), kl, cfg)
  return _sequence_mean_loss(obj, t), _token_metrics(t, ratio, ratio, kl, cfg)


def dr_grpo(batch: PolicyBatch, cfg: ObjectiveConfig) -> tuple[jax.Array,
                                                               Metrics]:
  """Dr. GRPO (2503.20783): GRPO without the length bias.

  The per-sample 1 / |o_i| favours short correct and long wrong answers;
  Dr. GRPO divides every sample's token sum by the same constant, the
  static completion width C (and uses centred advantages, see
  `DEFAULT_ADVANTAGE`).
  """
  t = _clean(batch)
  ratio, kl = _ratio(t), _k3(t)
  obj = _with_kl(_clipped_surrogate(ratio, t.adv, cfg), kl, cfg)
  width = obj.shape[1]
  loss = -jnp.sum(jnp.where(t.tok, obj, 0.0)) / (
      jnp.maximum(jnp.sum(t.valid_f), 1.0) * width)
  return loss, _token_metrics(t, ratio, ratio, kl, cfg)


def dapo(batch: PolicyBatch, cfg: ObjectiveConfig) -> tuple[jax.Array,
                                                            Metrics]:
  """DAPO (2503.14476): token-level policy gradient with clip-higher.

  Every masked token of every valid sample weighs the same (long answers
  are not down-weighted); the asymmetric clip range comes from the config
  (`defaults("dapo")`: eps_high = 0.28). Dynamic sampling is
  `advantages.dynamic_sampling`, applied by the caller.
  """
  t = _clean(batch)
  ratio, kl = _ratio(t), _k3(t)
  obj = _with_kl(_clipped_surrogate(ratio, t.adv, cfg), kl, cfg)
  loss = -jnp.sum(jnp.where(t.tok, obj, 0.0)) / jnp.maximum(
      jnp.sum(t.tok_f), 1.0)
  return loss, _token_metrics(t, ratio, ratio, kl, cfg)


def ecpo(batch: PolicyBatch, cfg: ObjectiveConfig) -> tuple[jax.Array,
                                                            Metrics]:
  """Early-Clipped GRPO (OneRec technical report).

  For a negative advantage the clipped surrogate keeps the unclipped
  rho A, whose gradient grows with rho without bound. ECPO raises the
  behaviour probability first,

    log pi'_old = max(sg(log pi) - log(1 + eps_high + delta), log pi_old),

  so rho' = pi / pi'_old <= 1 + eps_high + delta, then applies the usual
  clipped surrogate to rho' (KL term and aggregation as `grpo`). OneRec
  states it for whole-sequence probabilities; this is the token-level
  version (per-token ratios, as in `grpo`), which for one-token completions
  is the same.

  Metrics: `clip_frac` counts rho' outside the clip range, `ratio` is the
  mean of the plain rho.
  """
  t = _clean(batch)
  log_old = jnp.maximum(
      jax.lax.stop_gradient(t.logp) -
      math.log(1.0 + cfg.eps_high + cfg.delta), t.old_logp)
  ratio_early = _exp(t.logp - log_old)
  kl = _k3(t)
  obj = _with_kl(_clipped_surrogate(ratio_early, t.adv, cfg), kl, cfg)
  return _sequence_mean_loss(obj, t), _token_metrics(t, _ratio(t),
                                                     ratio_early, kl, cfg)


def gbpo(batch: PolicyBatch, cfg: ObjectiveConfig) -> tuple[jax.Array,
                                                            Metrics]:
  """Gradient-Bounded Policy Optimisation (OneRec-V2).

  No clipping, so every token gets a gradient; instead the denominator of
  the ratio adapts (sg = stop_gradient, p = pi(token)):

    pi'_old = max(pi_old, sg(p))      if A >= 0,
    pi'_old = max(pi_old, 1 - sg(p))  if A < 0,

  obj_t = (p / pi'_old) A - kl_coef KL_t, aggregated as `grpo`. The
  gradient w.r.t. log p is (p / pi'_old) A: at most A for positive
  advantages, and for negative ones at most p / (1 - p) |A|, i.e. |A| p
  w.r.t. the logit (the bound of a binary cross-entropy), instead of the
  unbounded p / pi_old |A|. Computed in log space (log(1 - p) =
  log1p(-p)), so tiny probabilities do not underflow to 0 / 0.

  Metrics: `clip_frac` and `ratio` are of the plain rho = pi / pi_old (how
  far the update is off-policy; nothing is clipped).
  """
  t = _clean(batch)
  logp_sg = jnp.minimum(jax.lax.stop_gradient(t.logp), 0.0)
  log_not_p = jnp.log1p(-jnp.exp(logp_sg))  # -inf at p = 1: max() drops it
  positive = (t.adv >= 0)[:, None]
  log_old = jnp.maximum(t.old_logp, jnp.where(positive, logp_sg, log_not_p))
  bounded = _exp(t.logp - log_old)
  kl = _k3(t)
  obj = _with_kl(bounded * t.adv[:, None], kl, cfg)
  ratio = _ratio(t)
  return _sequence_mean_loss(obj, t), _token_metrics(t, ratio, ratio, kl, cfg)


def _group_size(batch: PolicyBatch) -> int:
  try:
    return int(batch.group_size)
  except TypeError as e:  # a tracer: the batch was a jit argument
    raise TypeError("PolicyBatch.group_size must be a static int; build the "
                    "batch inside the jitted function.") from e


def _sequence_logps(t: _Tokens, g: int) -> tuple[jax.Array, jax.Array]:
  """(B, G) sequence log-probs of the policy and of the reference."""
  l_bg = jnp.sum(t.logp, axis=1).reshape(-1, g)
  lr_bg = jnp.sum(t.ref_logp, axis=1).reshape(-1, g)
  return l_bg, lr_bg


def dpo(batch: PolicyBatch, cfg: ObjectiveConfig) -> tuple[jax.Array,
                                                           Metrics]:
  """DPO on self-generated pairs (OneRec's iterative preference alignment).

  In each group the chosen rollout is the valid one with the highest
  reward, the rejected one the valid one with the lowest (first index on
  ties); with l = sum_t log pi and lr = sum_t log ref over the completion,

    loss = mean_groups -log sigmoid(beta ((l_c - lr_c) - (l_r - lr_r)))

  over the groups whose valid rewards differ (0 when none do). Advantages
  are not used.

  Metrics: `dpo/accuracy` (share of pairs with a positive margin),
  `dpo/margin` (mean beta-scaled margin), `dpo/pairs` (pairs in the
  loss), `kl` (mean token k3 to the reference).
  """
  t = _clean(batch)
  g = _group_size(batch)
  l_bg, lr_bg = _sequence_logps(t, g)
  valid_bg = t.valid.reshape(-1, g)
  r_bg = t.rewards.reshape(-1, g)
  chosen_b = jnp.argmax(jnp.where(valid_bg, r_bg, -jnp.inf), axis=1)
  rejected_b = jnp.argmin(jnp.where(valid_bg, r_bg, jnp.inf), axis=1)
  pair_b = adv_lib.group_has_variance(t.rewards, t.valid, g, tol=0.0)
  h_bg = l_bg - lr_bg
  take = lambda x, i: jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]
  margin_b = cfg.beta * (take(h_bg, chosen_b) - take(h_bg, rejected_b))
  margin_b = jnp.where(pair_b, margin_b, 0.0)
  pairs = jnp.sum(pair_b.astype(jnp.float32))
  per_pair = lambda x: jnp.sum(jnp.where(pair_b, x, 0.0)) / jnp.maximum(
      pairs, 1.0)
  loss = per_pair(-jax.nn.log_sigmoid(margin_b))
  return loss, {
      "dpo/accuracy": per_pair((margin_b > 0).astype(jnp.float32)),
      "dpo/margin": per_pair(margin_b),
      "dpo/pairs": pairs,
      "kl": _token_mean(_k3(t), t),
  }


def rspo(batch: PolicyBatch, cfg: ObjectiveConfig) -> tuple[jax.Array,
                                                            Metrics]:
  """Ranking-guided softmax preference optimisation; OUR formulation.

  GR4AD's RSPO is not specified in full publicly; this is the formulation
  implemented here, within each group, over its valid rollouts:

  - h_i = l_i - lr_i (sequence log-ratio to the reference), q_i = lr_i;
  - rank_i: 1 + the number of rollouts with a higher reward (ties: lower
    index first); gains g_i = 2^rhat_i - 1 with rhat the reward min-max
    normalised in the group; discounts d_i = 1 / log2(1 + rank_i);
  - for each pair r_i > r_j the LambdaLoss weight M_ij = |g_i - g_j| |d_i
    - d_j| (how much swapping the pair would change the group's NDCG);
  - reference gating: c_ij = 1 if q_i >= q_j (the reference already orders
    the pair as the reward does) else 0, and the margin s_ij = beta ((l_i -
    l_j) - c_ij (q_i - q_j)): where the reference disagrees its ordering
    is not subtracted, so it is not baked into the margin;
  - per preferred rollout i (at least one worse j), S-DPO's softmax loss
    with the pair weights inside, w_ij = M_ij / sum_j M_ij:
      L_i = -log sigmoid(-logsumexp_j(log w_ij - s_ij));
  - group loss sum_i alpha_i L_i with alpha_i = sum_j M_ij / sum_i'j M_i'j.

  The loss is the mean over the groups that have a pair (0 if none; groups
  whose rewards are all equal have none). Pairs whose weight underflows to
  M = 0 are left out, which is their exact contribution (exp(log 0) = 0).
  Advantages are not used.

  Metrics: `rspo/pairs` (pairs in the loss), `rspo/gated` (share of them
  with c = 0), `kl` (mean token k3 to the reference).
  """
  t = _clean(batch)
  g = _group_size(batch)
  l_bg, q_bg = _sequence_logps(t, g)
  v_bg = t.valid.reshape(-1, g)
  r_bg = t.rewards.reshape(-1, g)
  both = v_bg[:, :, None] & v_bg[:, None, :]  # (B, G_i, G_j)
  r_i, r_j = r_bg[:, :, None], r_bg[:, None, :]
  idx = jnp.arange(g)
  before = (r_j > r_i) | ((r_j == r_i) & (idx[None, None, :] <
                                          idx[None, :, None]))
  rank_bg = 1.0 + jnp.sum((before & both).astype(jnp.float32), axis=2)
  hi_b = jnp.max(jnp.where(v_bg, r_bg, -jnp.inf), axis=1, keepdims=True)
  lo_b = jnp.min(jnp.where(v_bg, r_bg, jnp.inf), axis=1, keepdims=True)
  spread = jnp.where(v_bg, r_bg - lo_b, 0.0)
  scale = jnp.where(jnp.isfinite(hi_b - lo_b) & (hi_b > lo_b), hi_b - lo_b,
                    1.0)
  gain_bg = jnp.exp2(spread / scale) - 1.0
  disc_bg = 1.0 / jnp.log2(1.0 + rank_bg)
  m_bij = (jnp.abs(gain_bg[:, :, None] - gain_bg[:, None, :]) *
           jnp.abs(disc_bg[:, :, None] - disc_bg[:, None, :]))
  pair = both & (r_i > r_j) & (m_bij > 0)
  m_bij = jnp.where(pair, m_bij, 0.0)
  gate = q_bg[:, :, None] >= q_bg[:, None, :]
  dl = l_bg[:, :, None] - l_bg[:, None, :]
  dq = q_bg[:, :, None] - q_bg[:, None, :]
  s_bij = cfg.beta * (dl - jnp.where(gate, dq, 0.0))
  row_b_i = jnp.sum(m_bij, axis=2)  # sum_j M_ij
  has_i = jnp.any(pair, axis=2)
  w_bij = m_bij / jnp.where(has_i, row_b_i, 1.0)[:, :, None]
  log_w = jnp.log(jnp.where(pair, w_bij, 1.0))
  lse_bi = jax.nn.logsumexp(jnp.where(pair, log_w - s_bij, _NEG), axis=2)
  loss_bi = jnp.where(has_i, -jax.nn.log_sigmoid(-lse_bi), 0.0)
  total_b = jnp.sum(row_b_i, axis=1)
  has_b = jnp.any(pair, axis=(1, 2))
  alpha_bi = row_b_i / jnp.where(has_b, total_b, 1.0)[:, None]
  group_b = jnp.where(has_b, jnp.sum(alpha_bi * loss_bi, axis=1), 0.0)
  groups = jnp.sum(has_b.astype(jnp.float32))
  loss = jnp.sum(group_b) / jnp.maximum(groups, 1.0)
  pairs = jnp.sum(pair.astype(jnp.float32))
  gated = jnp.sum((pair & ~gate).astype(jnp.float32)) / jnp.maximum(pairs, 1.0)
  return loss, {
      "rspo/pairs": pairs,
      "rspo/gated": gated,
      "kl": _token_mean(_k3(t), t),
  }


# Every objective with its paper defaults (`defaults`) and the
# `advantages.group_advantages` kind it is meant for (`default_advantage`).
OBJECTIVES = registry.Registry("objective")
OBJECTIVES.add("grpo", grpo, advantage="std",
               config=ObjectiveConfig(eps_low=0.2, eps_high=0.2, kl_coef=0.04))
OBJECTIVES.add("dr_grpo", dr_grpo, advantage="center",
               config=ObjectiveConfig(eps_low=0.2, eps_high=0.2, kl_coef=0.0))
OBJECTIVES.add("dapo", dapo, advantage="std",
               config=ObjectiveConfig(eps_low=0.2, eps_high=0.28, kl_coef=0.0))
OBJECTIVES.add("ecpo", ecpo, advantage="std",
               config=ObjectiveConfig(eps_low=0.2, eps_high=0.2, kl_coef=0.0,
                                      delta=0.1))
OBJECTIVES.add("gbpo", gbpo, advantage="std",
               config=ObjectiveConfig(kl_coef=0.0))
OBJECTIVES.add("dpo", dpo, advantage="none", config=ObjectiveConfig(beta=0.1))
OBJECTIVES.add("rspo", rspo, advantage="none",
               config=ObjectiveConfig(beta=0.1))


def get(name: str) -> Objective:
  """The objective registered as `name`."""
  return OBJECTIVES.get(name)


def default_advantage(name: str) -> str:
  """The advantage kind objective `name` is meant for."""
  return OBJECTIVES.defaults(name)["advantage"]


def defaults(name: str) -> ObjectiveConfig:
  """The paper defaults of objective `name` (see the module docstring):
  GRPO eps 0.2 / 0.2 with kl_coef 0.04 (DeepSeekMath); Dr. GRPO 0.2 / 0.2
  without KL; DAPO eps_low 0.2, eps_high 0.28, no KL; ECPO eps 0.2, delta
  0.1, no KL; GBPO no KL; DPO and RSPO beta 0.1."""
  return OBJECTIVES.defaults(name)["config"]

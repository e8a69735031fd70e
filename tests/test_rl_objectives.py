"""RL advantages and policy objectives: hand computations and a toy bandit.

Every objective's loss is checked against a plain-numpy loop written from
its formula (not from the jax code), its gradient against a hand-derived
closed form or finite differences of that loop, and each one must raise the
expected reward of a tiny two-token bandit policy.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from taiji_jax.rl import advantages as adv_lib
from taiji_jax.rl import objectives as obj_lib

NAMES = ("grpo", "dr_grpo", "dapo", "ecpo", "gbpo", "dpo", "rspo")
TOKEN_NAMES = ("grpo", "dr_grpo", "dapo", "ecpo", "gbpo")


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def _batch(logp, old, ref, mask, adv, rewards, valid, g):
  f = lambda x: jnp.asarray(np.asarray(x), jnp.float32)
  return obj_lib.PolicyBatch(
      logp=f(logp),
      old_logp=f(old),
      ref_logp=f(ref),
      mask=f(mask),
      advantages=f(adv),
      rewards=f(rewards),
      valid=f(valid),
      group_size=g)


# ---------------------------------------------------------------------------
# The tiny token batch: N = 4, G = 2, C = 3.
#
# Branches exercised (eps 0.2 / 0.2 unless said):
#   row 0 (A = +1):   t0 rho = e^.3 = 1.35 > 1.2: clipped; t2 masked (rho e).
#   row 1 (A = -1):   t0 rho = e^-.4 = .67 < .8: clipped; t1 unclipped.
#   row 2 (A = +.5):  t0 rho = e^.2 = 1.22: clipped at eps_high .2, not at
#                     DAPO's .28; t1 rho = .74, A > 0: unclipped.
#   row 3 (A = -.7):  t1 rho = e^.5 = 1.65, A < 0: unclipped (ECPO: early-
#                     clipped to 1.3); t2 masked.
# GBPO: A >= 0 rows hit both max(p_old, p) branches, A < 0 rows both
# max(p_old, 1 - p) branches.
# ---------------------------------------------------------------------------
LOGP = np.array([[-1.0, -0.5, -2.0], [-0.6, -1.2, -0.7], [-2.0, -0.1, -0.9],
                 [-0.6, -1.5, -0.4]])
LOG_RATIO = np.array([[0.3, -0.05, 1.0], [-0.4, 0.1, 0.0], [0.2, -0.3, 0.05],
                      [0.0, 0.5, -0.25]])
OLD = LOGP - LOG_RATIO
REF = LOGP + np.array([[0.2, -0.1, 0.5], [0.3, 0.0, -0.2], [-0.4, 0.1, 0.2],
                       [0.1, 0.2, -0.3]])
MASK = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]], np.float64)
ADV = np.array([1.0, -1.0, 0.5, -0.7])
REWARDS = np.array([1.0, 0.0, 0.8, 0.2])
VALIDS = (np.ones(4), np.array([1.0, 1.0, 0.0, 1.0]))


def _np_token_loss(name, logp, old, ref, mask, adv, valid, cfg, logp_sg=None):
  """The token objectives' losses as explicit loops over (sample, token)."""
  logp_sg = logp if logp_sg is None else logp_sg
  n, c = logp.shape
  lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
  per_sample, token_sum, token_count = [], 0.0, 0.0
  for i in range(n):
    total, length = 0.0, 0.0
    for t in range(c):
      if not (valid[i] > 0 and mask[i, t] > 0):
        continue
      a = adv[i]
      if name == "ecpo":
        log_old = max(logp_sg[i, t] - math.log(hi + cfg.delta), old[i, t])
        rho = math.exp(logp[i, t] - log_old)
      else:
        rho = math.exp(logp[i, t] - old[i, t])
      if name == "gbpo":
        p, p_sg, p_old = (math.exp(logp[i, t]), math.exp(logp_sg[i, t]),
                          math.exp(old[i, t]))
        denom = max(p_old, p_sg) if a >= 0 else max(p_old, 1.0 - p_sg)
        surrogate = p / denom * a
      else:
        surrogate = min(rho * a, min(max(rho, lo), hi) * a)
      x = ref[i, t] - logp[i, t]
      kl = math.exp(x) - x - 1.0
      obj = surrogate - cfg.kl_coef * kl
      total += obj
      length += 1.0
    per_sample.append((total, length))
    token_sum += total
    token_count += length
  n_valid = max(sum(1.0 for v in valid if v > 0), 1.0)
  if name == "dapo":
    return -token_sum / max(token_count, 1.0)
  if name == "dr_grpo":
    return -token_sum / (n_valid * c)
  # grpo, ecpo, gbpo: per-sample length normalisation.
  loss = 0.0
  for i, (total, length) in enumerate(per_sample):
    if valid[i] > 0:
      loss -= total / max(length, 1.0)
  return loss / n_valid


def _jit(name, batch, cfg):
  """The jitted objective on `batch` (group_size is static: it is closed
  over, only the arrays are arguments)."""
  fn = obj_lib.get(name)
  return jax.jit(lambda lp: fn(batch._replace(logp=lp), cfg))(batch.logp)


def _jax_loss(name, batch, cfg):
  return float(_jit(name, batch, cfg)[0])


def _grad_logp(name, batch, cfg):
  fn = obj_lib.get(name)
  return np.asarray(
      jax.jit(jax.grad(lambda lp: fn(batch._replace(logp=lp), cfg)[0]))(
          batch.logp))


@pytest.mark.parametrize("valid", VALIDS, ids=["all_valid", "one_invalid"])
@pytest.mark.parametrize("name", TOKEN_NAMES)
def test_token_objective_loss_matches_hand_computation(name, valid):
  cfg = obj_lib.ObjectiveConfig(
      eps_low=0.2,
      eps_high=0.28 if name == "dapo" else 0.2,
      kl_coef=0.1,
      delta=0.1)
  batch = _batch(LOGP, OLD, REF, MASK, ADV, REWARDS, valid, 2)
  expected = _np_token_loss(name, LOGP, OLD, REF, MASK, ADV, valid, cfg)
  np.testing.assert_allclose(_jax_loss(name, batch, cfg), expected, rtol=1e-5)


def test_clipping_branches_change_the_loss():
  """The tiny batch really is clipped: DAPO's wider eps_high and ECPO's early
  clip give different losses than plain GRPO on it."""
  base = obj_lib.ObjectiveConfig(kl_coef=0.0)
  batch = _batch(LOGP, OLD, REF, MASK, ADV, REWARDS, VALIDS[0], 2)
  wide = obj_lib.ObjectiveConfig(eps_high=0.28, kl_coef=0.0)
  assert abs(_jax_loss("dapo", batch, base) -
             _jax_loss("dapo", batch, wide)) > 1e-3
  assert abs(_jax_loss("grpo", batch, base) -
             _jax_loss("ecpo", batch, base)) > 1e-3
  no_clip = obj_lib.ObjectiveConfig(eps_low=0.9, eps_high=100.0)
  assert abs(_jax_loss("grpo", batch, base) -
             _jax_loss("grpo", batch, no_clip)) > 1e-3


def test_grpo_metrics_by_hand():
  cfg = obj_lib.ObjectiveConfig(kl_coef=0.0)
  batch = _batch(LOGP, OLD, REF, MASK, ADV, REWARDS, VALIDS[1], 2)
  _, metrics = _jit("grpo", batch, cfg)
  rhos, kls, outside = [], [], 0
  for i in range(4):
    for t in range(3):
      if VALIDS[1][i] > 0 and MASK[i, t] > 0:
        rho = math.exp(LOG_RATIO[i, t])
        x = REF[i, t] - LOGP[i, t]
        rhos.append(rho)
        kls.append(math.exp(x) - x - 1)
        outside += rho < 0.8 or rho > 1.2
  np.testing.assert_allclose(metrics["ratio"], np.mean(rhos), rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], np.mean(kls), rtol=1e-5)
  np.testing.assert_allclose(metrics["clip_frac"], outside / len(rhos))
  assert outside == 3  # rows 0 t0, 1 t0 and 3 t1


@pytest.mark.parametrize("valid", VALIDS, ids=["all_valid", "one_invalid"])
def test_grpo_gradient_at_ratio_one(valid):
  """At rho = 1: dL/dlogp_t = -(A_i - beta (1 - e^(ref - logp))) /
  (|o_i| n_valid) on masked tokens of valid samples, 0 elsewhere."""
  beta = 0.1
  cfg = obj_lib.ObjectiveConfig(kl_coef=beta)
  batch = _batch(LOGP, LOGP, REF, MASK, ADV, REWARDS, valid, 2)
  n_valid = valid.sum()
  expected = np.zeros_like(LOGP)
  for i in range(4):
    length = MASK[i].sum()
    for t in range(3):
      if valid[i] and MASK[i, t]:
        dkl = 1.0 - math.exp(REF[i, t] - LOGP[i, t])  # d k3 / d logp
        expected[i, t] = -(ADV[i] - beta * dkl) / (length * n_valid)
  np.testing.assert_allclose(
      _grad_logp("grpo", batch, cfg), expected, rtol=1e-5, atol=1e-7)


def test_dapo_gradient_is_token_normalised():
  """dL/dlogp_t = -rho A / n_tokens where the unclipped branch is active,
  0 on clipped tokens (no KL), n_tokens over all valid samples."""
  cfg = obj_lib.defaults("dapo")
  valid = VALIDS[1]
  batch = _batch(LOGP, OLD, REF, MASK, ADV, REWARDS, valid, 2)
  n_tokens = sum(MASK[i].sum() for i in range(4) if valid[i])
  expected = np.zeros_like(LOGP)
  for i in range(4):
    for t in range(3):
      if not (valid[i] and MASK[i, t]):
        continue
      rho, a = math.exp(LOG_RATIO[i, t]), ADV[i]
      clipped = (a > 0 and rho > 1.28) or (a < 0 and rho < 0.8)
      expected[i, t] = 0.0 if clipped else -rho * a / n_tokens
  np.testing.assert_allclose(
      _grad_logp("dapo", batch, cfg), expected, rtol=1e-5, atol=1e-7)
  # Row 2 t0 (rho 1.22) gets a gradient under clip-higher, not under 0.2.
  assert expected[0, 0] == 0.0 and expected[1, 0] == 0.0
  assert _grad_logp("grpo", batch, obj_lib.ObjectiveConfig())[2, 0] == 0.0


def test_gbpo_gradient_is_bounded():
  """dL/dlogp_t = -(p / pi'_old) A / (|o_i| n); the ratio never exceeds 1
  for A >= 0 and p / (1 - p) for A < 0."""
  cfg = obj_lib.defaults("gbpo")
  batch = _batch(LOGP, OLD, REF, MASK, ADV, REWARDS, VALIDS[0], 2)
  expected = np.zeros_like(LOGP)
  branches = set()
  for i in range(4):
    for t in range(3):
      if not MASK[i, t]:
        continue
      p, p_old, a = math.exp(LOGP[i, t]), math.exp(OLD[i, t]), ADV[i]
      if a >= 0:
        denom = max(p_old, p)
        branches.add(("pos", denom == p))
        assert p / denom <= 1.0
      else:
        denom = max(p_old, 1.0 - p)
        branches.add(("neg", denom == 1.0 - p))
        assert p / denom <= p / (1.0 - p) + 1e-12
      expected[i, t] = -(p / denom) * a / (MASK[i].sum() * 4)
  assert len(branches) == 4  # every branch of the max is exercised
  np.testing.assert_allclose(
      _grad_logp("gbpo", batch, cfg), expected, rtol=1e-5, atol=1e-7)
  # Unlike GRPO's unclipped rho A: row 3 t1 has rho = 1.65 and A < 0.
  grpo_grad = _grad_logp("grpo", batch, obj_lib.ObjectiveConfig())
  assert abs(expected[3, 1]) < abs(grpo_grad[3, 1])


def test_ecpo_gradient_matches_finite_differences():
  """Finite differences of the numpy loss with sg(logp) held fixed (the
  meaning of the stop-gradient), and the early clip bounds the gradient of
  row 3 t1 (A < 0, rho = 1.65) at (1 + eps_high + delta) |A|."""
  cfg = obj_lib.ObjectiveConfig(kl_coef=0.05, delta=0.1)
  batch = _batch(LOGP, OLD, REF, MASK, ADV, REWARDS, VALIDS[0], 2)
  grad = _grad_logp("ecpo", batch, cfg)
  h = 1e-5
  fd = np.zeros_like(LOGP)
  for i in range(4):
    for t in range(3):
      up, down = LOGP.copy(), LOGP.copy()
      up[i, t] += h
      down[i, t] -= h
      f = lambda lp: _np_token_loss("ecpo", lp, OLD, REF, MASK, ADV, VALIDS[0],
                                    cfg, logp_sg=LOGP)
      fd[i, t] = (f(up) - f(down)) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)
  x = REF[3, 1] - LOGP[3, 1]
  bounded = -(1.3 * ADV[3] - 0.05 * (1 - math.exp(x))) / (2 * 4)
  np.testing.assert_allclose(grad[3, 1], bounded, rtol=1e-5)


# ---------------------------------------------------------------------------
# Preference objectives.
# ---------------------------------------------------------------------------
def _pref_batch(seed, rewards, valid, g, c=3):
  rng = np.random.default_rng(seed)
  n = len(rewards)
  logp = -rng.uniform(0.1, 2.0, (n, c))
  ref = -rng.uniform(0.1, 2.0, (n, c))
  mask = np.ones((n, c))
  mask[0, -1] = 0.0
  mask[n - 1, 0] = 0.0
  return logp, ref, mask, np.asarray(rewards, float), np.asarray(valid, float)


def _np_seq(x, mask, i):
  return sum(x[i, t] for t in range(x.shape[1]) if mask[i, t])


# Group 0: tie at the top (first index is chosen); group 1: all equal;
# group 2: the invalid row has the highest reward (ignored).
DPO_REWARDS = [0.9, 0.2, 0.9, 0.7, 0.7, 0.7, 5.0, 0.1, 0.4]
DPO_VALID = [1, 1, 1, 1, 1, 1, 0, 1, 1]


def _np_dpo(logp, ref, mask, rewards, valid, g, beta):
  losses, margins, grads = [], [], np.zeros_like(logp)
  pairs = []
  for b in range(len(rewards) // g):
    rows = [b * g + k for k in range(g) if valid[b * g + k]]
    if len(rows) < 2:
      continue
    best = max(rewards[r] for r in rows)
    worst = min(rewards[r] for r in rows)
    if best == worst:
      continue
    chosen = next(r for r in rows if rewards[r] == best)
    rejected = next(r for r in rows if rewards[r] == worst)
    h = lambda r: _np_seq(logp, mask, r) - _np_seq(ref, mask, r)
    margin = beta * (h(chosen) - h(rejected))
    losses.append(-_log_sigmoid(margin))
    margins.append(margin)
    pairs.append((chosen, rejected, margin))
  for chosen, rejected, margin in pairs:
    # d/dlogp_t of -log sigmoid(m): -beta sigmoid(-m) on chosen tokens,
    # +beta sigmoid(-m) on rejected tokens; divided by the number of pairs.
    coef = beta * _sigmoid(-margin) / len(pairs)
    grads[chosen] -= coef * mask[chosen]
    grads[rejected] += coef * mask[rejected]
  return np.mean(losses), margins, grads


def test_dpo_loss_and_gradient_by_hand():
  g, beta = 3, 0.1
  logp, ref, mask, rewards, valid = _pref_batch(0, DPO_REWARDS, DPO_VALID, g)
  batch = _batch(logp, logp, ref, mask, np.zeros(9), rewards, valid, g)
  cfg = obj_lib.ObjectiveConfig(beta=beta)
  loss, metrics = _jit("dpo", batch, cfg)
  expected, margins, grads = _np_dpo(logp, ref, mask, rewards, valid, g, beta)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["dpo/pairs"], 2)
  np.testing.assert_allclose(metrics["dpo/margin"], np.mean(margins),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["dpo/accuracy"],
                             np.mean([m > 0 for m in margins]))
  np.testing.assert_allclose(
      _grad_logp("dpo", batch, cfg), grads, rtol=1e-5, atol=1e-8)
  # Chosen of group 0 is row 0 (first of the tied best), rejected row 1.
  assert np.all(grads[0, :2] < 0) and np.all(grads[1] > 0)
  assert np.all(grads[2] == 0) and np.all(grads[3:7] == 0)


def test_dpo_without_pairs_is_zero():
  logp, ref, mask, _, _ = _pref_batch(1, [0.5] * 4, [1] * 4, 2)
  batch = _batch(logp, logp, ref, mask, np.zeros(4), [0.5] * 4,
                 [1, 1, 0, 1], 2)
  cfg = obj_lib.defaults("dpo")
  loss, metrics = _jit("dpo", batch, cfg)
  assert float(loss) == 0.0 and float(metrics["dpo/pairs"]) == 0.0
  assert np.all(np.isfinite(_grad_logp("dpo", batch, cfg)))


# Group 0: a tie; group 1: all equal (no pairs); group 2: an invalid row
# with a NaN reward; group 3: one valid row only.
RSPO_REWARDS = [0.3, 1.0, 0.3, 0.0, 0.5, 0.5, 0.5, 0.5, 0.2, np.nan, 0.8, 0.5,
                0.9, 0.1, 0.4, 0.6]
RSPO_VALID = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0]


def _np_rspo(logp, ref, mask, rewards, valid, g, beta):
  """(loss, pairs, gated) of our RSPO formulation, as loops."""
  group_losses, pairs, gated = [], 0, 0
  for b in range(len(rewards) // g):
    rows = [b * g + k for k in range(g) if valid[b * g + k]]
    if len(rows) < 2:
      continue
    r = {i: rewards[i] for i in rows}
    hi, lo = max(r.values()), min(r.values())
    if hi == lo:
      continue
    ranked = sorted(rows, key=lambda i: (-r[i], i))
    rank = {i: k + 1 for k, i in enumerate(ranked)}
    gain = {i: 2.0**((r[i] - lo) / (hi - lo)) - 1.0 for i in rows}
    disc = {i: 1.0 / math.log2(1.0 + rank[i]) for i in rows}
    l = {i: _np_seq(logp, mask, i) for i in rows}
    q = {i: _np_seq(ref, mask, i) for i in rows}
    per_i = []
    for i in rows:
      terms = []
      for j in rows:
        if r[i] > r[j]:
          m = abs(gain[i] - gain[j]) * abs(disc[i] - disc[j])
          c = 1.0 if q[i] >= q[j] else 0.0
          s = beta * ((l[i] - l[j]) - c * (q[i] - q[j]))
          terms.append((m, s))
          pairs += 1
          gated += c == 0.0
      if terms:
        total = sum(m for m, _ in terms)
        inner = sum(m / total * math.exp(-s) for m, s in terms)
        per_i.append((total, -_log_sigmoid(-math.log(inner))))
    norm = sum(t for t, _ in per_i)
    group_losses.append(sum(t / norm * loss for t, loss in per_i))
  loss = np.mean(group_losses) if group_losses else 0.0
  return loss, pairs, gated


def test_rspo_loss_and_gradient_by_hand():
  g, beta = 4, 0.5
  logp, ref, mask, rewards, valid = _pref_batch(2, RSPO_REWARDS, RSPO_VALID, g)
  # Make the reference disagree with the reward on some pairs for sure.
  ref[1] -= 1.0
  logp_bad = logp.copy()
  logp_bad[9] = np.nan  # the invalid row: must not leak
  ref_bad = ref.copy()
  ref_bad[9] = np.nan
  batch = _batch(logp_bad, logp_bad, ref_bad, mask, np.zeros(16), rewards,
                 valid, g)
  cfg = obj_lib.ObjectiveConfig(beta=beta)
  loss, metrics = _jit("rspo", batch, cfg)
  expected, pairs, gated = _np_rspo(logp, ref, mask, rewards, valid, g, beta)
  assert pairs == 5 + 3 and 0 < gated < pairs
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["rspo/pairs"], pairs)
  np.testing.assert_allclose(metrics["rspo/gated"], gated / pairs, rtol=1e-6)
  grad = _grad_logp("rspo", batch, cfg)
  assert np.all(np.isfinite(grad)) and np.all(grad[9] == 0)
  h = 1e-5
  fd = np.zeros_like(logp)
  for i in range(16):
    for t in range(3):
      up, down = logp.copy(), logp.copy()
      up[i, t] += h
      down[i, t] -= h
      f = lambda lp: _np_rspo(lp, ref, mask, rewards, valid, g, beta)[0]
      fd[i, t] = (f(up) - f(down)) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)
  # Rows in no pair (all-equal group, lone valid row) get no gradient.
  assert np.all(grad[4:8] == 0) and np.all(grad[12:] == 0)


def test_rspo_gating_switches_off_a_disagreeing_reference():
  """One pair (r_0 > r_1): when the reference agrees (q_0 >= q_1) the margin
  is beta (h_0 - h_1); when it disagrees, beta (l_0 - l_1)."""
  beta = 1.0
  logp = np.array([[-1.0], [-2.0]])
  mask = np.ones((2, 1))
  cfg = obj_lib.ObjectiveConfig(beta=beta)
  for ref, margin in (([[-0.5], [-3.0]], (-1 + 0.5) - (-2 + 3.0)),
                      ([[-3.0], [-0.5]], -1.0 + 2.0)):
    batch = _batch(logp, logp, ref, mask, np.zeros(2), [1.0, 0.0], [1, 1], 2)
    loss, metrics = _jit("rspo", batch, cfg)
    # One pair, weight 1: L = -log sigmoid(-log e^-s) = -log sigmoid(s).
    np.testing.assert_allclose(loss, -_log_sigmoid(beta * margin), rtol=1e-6)
    assert float(metrics["rspo/gated"]) == (ref[0][0] < ref[1][0])


# ---------------------------------------------------------------------------
# Advantages.
# ---------------------------------------------------------------------------
ADV_REWARDS = np.array([1.0, 2.0, 4.0, 3.0, 3.0, 3.0, 0.0, 5.0, np.nan,
                        7.0, np.inf, -np.inf])
ADV_VALID = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0], np.float32)


def _np_group_adv(rewards, valid, g, kind, eps=1e-6):
  out = np.zeros(len(rewards))
  for b in range(len(rewards) // g):
    rows = [b * g + k for k in range(g) if valid[b * g + k]]
    vals = [rewards[r] for r in rows]
    if not rows:
      continue
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean)**2 for v in vals) / len(vals))
    for r in rows:
      out[r] = {"std": (rewards[r] - mean) / (std + eps),
                "center": rewards[r] - mean,
                "none": rewards[r]}[kind]
  return out


@pytest.mark.parametrize("kind", ["std", "center", "none"])
def test_group_advantages_by_hand(kind):
  adv = adv_lib.group_advantages(
      jnp.asarray(ADV_REWARDS, jnp.float32), ADV_VALID, 3, kind)
  expected = _np_group_adv(ADV_REWARDS, ADV_VALID, 3, kind)
  np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(adv))
  assert np.all(np.asarray(adv)[ADV_VALID == 0] == 0)


@pytest.mark.parametrize("kind", ["std", "center"])
def test_all_equal_and_single_valid_groups_are_exactly_zero(kind):
  rewards = jnp.array([0.1, 0.1, 0.1, 1e6 + 0.3, 1e6 + 0.3, 1e6 + 0.3, 0.7,
                       0.2, 0.9])
  adv = adv_lib.group_advantages(rewards, jnp.array([1] * 6 + [0, 1, 0]), 3,
                                 kind)
  assert np.all(np.asarray(adv) == 0.0)


def test_nan_at_invalid_row_never_leaks_into_values_or_gradients():
  rewards = jnp.asarray(ADV_REWARDS, jnp.float32)
  for kind in ("std", "center", "none"):
    grad = jax.jit(jax.grad(lambda r, k=kind: jnp.sum(
        adv_lib.group_advantages(r, ADV_VALID, 3, k)**2)))(rewards)
    assert np.all(np.isfinite(grad)), kind
    assert np.all(np.asarray(grad)[ADV_VALID == 0] == 0)
  grad = jax.jit(jax.grad(lambda r: jnp.sum(adv_lib.gdpo_advantages(
      jnp.stack([r, 2 * r], 1), ADV_VALID, 3, jnp.array([1.0, 0.5]))**3)))(
          rewards)
  assert np.all(np.isfinite(grad))
  # Through a policy loss: advantages from NaN rewards, grad w.r.t. logp.
  n = len(ADV_REWARDS)
  adv = adv_lib.group_advantages(rewards, ADV_VALID, 3)
  logp = -jnp.ones((n, 2))
  batch = obj_lib.PolicyBatch(logp, logp, logp, jnp.ones((n, 2)), adv,
                              rewards, jnp.asarray(ADV_VALID), 3)
  for name in NAMES:
    g = _grad_logp(name, batch, obj_lib.defaults(name))
    assert np.all(np.isfinite(g)), name


def test_gdpo_advantages_by_hand():
  g = 3
  rewards = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 3.0],
                      [0.5, 1.0], [np.nan, 2.0]])
  valid = np.array([1, 1, 1, 1, 1, 0], np.float32)
  weights = np.array([1.0, 0.5])
  eps = 1e-6
  per_k = np.stack(
      [_np_group_adv(rewards[:, k], valid, g, "std", eps) for k in range(2)],
      1)
  combined = [sum(weights[k] * per_k[i, k] for k in range(2))
              for i in range(6) if valid[i]]
  mean = np.mean(combined)
  std = np.sqrt(np.mean([(x - mean)**2 for x in combined]))
  expected = np.zeros(6)
  expected[valid > 0] = [(x - mean) / (std + eps) for x in combined]
  adv = adv_lib.gdpo_advantages(
      jnp.asarray(rewards, jnp.float32), valid, g, jnp.asarray(weights))
  np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
  # GDPO tells (1, 0) and (0, 1) apart from summed-then-normalised GRPO
  # only through the weights; its whitening gives a unit-std batch.
  np.testing.assert_allclose(np.std(np.asarray(adv)[valid > 0]), 1.0,
                             rtol=1e-4)


def test_group_has_variance():
  rewards = jnp.array([1.0, 1.0, 0.0, 1.0, 2.0, np.nan, 3.0, 3.0, 5.0, 5.0])
  valid = jnp.array([1, 1, 1, 1, 1, 0, 1, 0, 1, 1])
  np.testing.assert_array_equal(
      adv_lib.group_has_variance(rewards, valid, 2),
      [False, True, False, False, False])


def test_dynamic_sampling_orders_informative_groups_first():
  # Groups (G = 2): 0 flat, 1 varied, 2 flat, 3 varied, 4 varied.
  rewards = jnp.array([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 0.3, 0.1, 5.0, 4.0])
  valid = jnp.ones(10)
  idx, keep = jax.jit(
      adv_lib.dynamic_sampling, static_argnums=(2, 3))(rewards, valid, 2, 4)
  np.testing.assert_array_equal(idx, [1, 3, 4, 0])
  np.testing.assert_array_equal(keep, [True, True, True, False])
  idx, keep = adv_lib.dynamic_sampling(rewards, valid, 2, 2)
  np.testing.assert_array_equal(idx, [1, 3])
  assert np.all(keep)
  with pytest.raises(ValueError, match="num_groups"):
    adv_lib.dynamic_sampling(rewards, valid, 2, 6)


def test_gather_groups():
  tree = {
      "a": jnp.arange(6),
      "b": (jnp.arange(12).reshape(6, 2),),
      "scalar": jnp.float32(3.0),
  }
  out = adv_lib.gather_groups(tree, jnp.array([2, 0]), 2)
  np.testing.assert_array_equal(out["a"], [4, 5, 0, 1])
  np.testing.assert_array_equal(out["b"][0],
                                [[8, 9], [10, 11], [0, 1], [2, 3]])
  assert float(out["scalar"]) == 3.0


# ---------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------
def test_registry_and_defaults():
  assert set(obj_lib.OBJECTIVES) == set(NAMES)
  with pytest.raises(ValueError, match="'ppo'.*dapo"):
    obj_lib.get("ppo")
  with pytest.raises(ValueError, match="ppo"):
    obj_lib.defaults("ppo")
  assert obj_lib.defaults("grpo").kl_coef == 0.04
  assert obj_lib.defaults("dapo").eps_high == 0.28
  assert obj_lib.defaults("ecpo").delta == 0.1
  assert obj_lib.defaults("dpo").beta == 0.1
  assert obj_lib.default_advantage("dr_grpo") == "center"
  assert obj_lib.default_advantage("rspo") == "none"
  with pytest.raises(ValueError, match="beta"):
    obj_lib.ObjectiveConfig(beta=0.0)


# ---------------------------------------------------------------------------
# Robustness: NaN rows, all-equal groups, all-masked samples.
# ---------------------------------------------------------------------------
def test_every_objective_is_finite_on_a_hostile_batch():
  g, n, c = 3, 9, 3
  rng = np.random.default_rng(5)
  logp = -rng.uniform(0.1, 2.0, (n, c))
  old = logp + rng.normal(0, 0.3, (n, c))
  ref = -rng.uniform(0.1, 2.0, (n, c))
  mask = np.ones((n, c))
  rewards = np.array([0.1, np.nan, 0.9, 0.5, 0.5, 0.5, 0.2, 0.8, 0.4])
  valid = np.array([1, 0, 1, 1, 1, 1, 1, 1, 1], float)
  for x in (logp, old, ref):
    x[1] = np.nan  # the invalid row
  mask[7] = 0.0  # a valid sample with no token in the loss
  for x in (logp, old, ref):
    x[7] = -np.inf
  mask[0, 2] = 0.0
  logp[0, 2], old[0, 2], ref[0, 2] = -np.inf, np.inf, np.nan
  adv = np.array(adv_lib.group_advantages(
      jnp.asarray(rewards, jnp.float32), valid, g))
  adv[1] = np.nan
  batch = _batch(logp, old, ref, mask, adv, rewards, valid, g)
  for name in NAMES:
    cfg = dataclasses.replace(obj_lib.defaults(name), kl_coef=0.1)
    fn = obj_lib.get(name)
    (loss, metrics), grad = jax.jit(jax.value_and_grad(
        lambda lp, f=fn, cf=cfg: f(batch._replace(logp=lp), cf),
        has_aux=True))(batch.logp)
    assert np.isfinite(float(loss)), name
    assert np.all(np.isfinite(np.asarray(grad))), name
    assert np.all(np.asarray(grad)[[1, 7]] == 0), name
    for key, value in metrics.items():
      assert np.isfinite(float(value)), (name, key)


# ---------------------------------------------------------------------------
# A toy bandit: every objective learns.
#
# 3 prompts; a completion is an item a in {0..4} and, unless a == 0 (which
# stops), a second token b in {0..4} from a second table. The reward
# R1[p, a] + [a != 0] R2[p, b] is fixed; the expected reward under the
# softmax policy is exact.
# ---------------------------------------------------------------------------
P, K, G = 3, 5, 8
R1 = np.array([[0.0, 0.2, 1.0, 0.4, 0.6], [0.1, 0.8, 0.3, 0.0, 0.5],
               [0.2, 0.5, 0.0, 0.7, 0.9]], np.float32)
R2 = np.array([[0.1, 0.0, 0.3, 0.5, 0.2], [0.4, 0.1, 0.0, 0.2, 0.3],
               [0.0, 0.25, 0.45, 0.1, 0.35]], np.float32)


def _expected_reward(params):
  pi1 = jax.nn.softmax(params["first"], -1)
  pi2 = jax.nn.softmax(params["second"], -1)
  second = jnp.sum(pi2 * R2, -1, keepdims=True)
  per_item = R1 + jnp.where(jnp.arange(K) != 0, second, 0.0)
  return jnp.mean(jnp.sum(pi1 * per_item, -1))


def _best_reward():
  per_item = R1 + np.where(np.arange(K) != 0, R2.max(-1, keepdims=True), 0.0)
  return per_item.max(-1).mean()


def _completion_logp(params, prompt_n, a_n, b_n):
  lp1 = jax.nn.log_softmax(params["first"][prompt_n], -1)
  lp2 = jax.nn.log_softmax(params["second"][prompt_n], -1)
  take = lambda lp, x: jnp.take_along_axis(lp, x[:, None], 1)[:, 0]
  return jnp.stack([take(lp1, a_n), take(lp2, b_n)], 1)


def _bandit_run(name, steps=40, inner=2):
  fn, cfg = obj_lib.get(name), obj_lib.defaults(name)
  kind = obj_lib.default_advantage(name)
  tx = optax.adam(0.1)
  init = {"first": jnp.zeros((P, K)), "second": jnp.zeros((P, K))}
  prompt_n = jnp.repeat(jnp.arange(P), G)

  def step(carry, key):
    params, opt_state = carry
    k1, k2 = jax.random.split(key)
    a_n = jax.random.categorical(k1, params["first"][prompt_n])
    b_n = jax.random.categorical(k2, params["second"][prompt_n])
    mask = jnp.stack([jnp.ones_like(a_n), (a_n != 0)], 1).astype(jnp.float32)
    reward_n = (jnp.asarray(R1)[prompt_n, a_n] +
                jnp.where(a_n != 0, jnp.asarray(R2)[prompt_n, b_n], 0.0))
    valid_n = jnp.ones_like(reward_n)
    old = jax.lax.stop_gradient(_completion_logp(params, prompt_n, a_n, b_n))
    ref = _completion_logp(init, prompt_n, a_n, b_n)
    adv = adv_lib.group_advantages(reward_n, valid_n, G, kind)

    def loss_fn(p):
      batch = obj_lib.PolicyBatch(
          _completion_logp(p, prompt_n, a_n, b_n), old, ref, mask, adv,
          reward_n, valid_n, G)
      return fn(batch, cfg)[0]

    for _ in range(inner):  # the second update is off-policy (rho != 1)
      grads = jax.grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    return (params, opt_state), _expected_reward(params)

  keys = jax.random.split(jax.random.key(0), steps)
  run = jax.jit(lambda: jax.lax.scan(step, (init, tx.init(init)), keys))
  _, curve = run()
  return float(_expected_reward(init)), np.asarray(curve)


@pytest.mark.parametrize("name", NAMES)
def test_toy_bandit_expected_reward_increases(name):
  start, curve = _bandit_run(name)
  gain = curve[-1] - start
  assert gain > 0.5 * (_best_reward() - start), (name, start, curve[-1])


def test_traced_group_size_is_a_clear_error():
  logp, ref, mask, rewards, valid = _pref_batch(0, DPO_REWARDS, DPO_VALID, 3)
  batch = _batch(logp, logp, ref, mask, np.zeros(9), rewards, valid, 3)
  with pytest.raises(TypeError, match="static int"):
    jax.jit(lambda b: obj_lib.dpo(b, obj_lib.defaults("dpo")))(batch)


def test_effective_weights_of_the_reward_scalarisation_by_hand():
  """The paper's form normalises the weighted reward in its group: with
  in-group spreads 0.03 (semantic) and 0.2 (preference), equal weights
  apply w_k sigma_k / sigma_r, not w_k (issue 15's example)."""
  from taiji_jax.rl import combine
  rng = np.random.default_rng(0)
  g, groups = 8, 5
  sem = 0.5 + 0.03 * rng.standard_normal((groups, g))
  pref = 0.5 + 0.2 * rng.standard_normal((groups, g))
  r = jnp.asarray(np.stack([sem.ravel(), pref.ravel()], 1), jnp.float32)
  w = jnp.asarray([0.5, 0.5])
  got = np.asarray(combine.effective_weights(r, jnp.ones(g * groups), g, w))
  want = []
  for b in range(groups):
    s_k = np.array([sem[b].std(), pref[b].std()])
    s_r = (0.5 * sem[b] + 0.5 * pref[b]).std()
    want.append(0.5 * s_k / (s_r + 1e-6))
  np.testing.assert_allclose(got, np.mean(want, 0), rtol=1e-4)
  assert got[0] < 0.5 * got[1] / 3  # the low-spread reward is under-weighted
  # The combined advantage is exactly sum_k eff_bk A_bk in each group.
  a_r = adv_lib.group_advantages(r @ w, jnp.ones(g * groups), g, "std")
  a_k = combine.per_reward_advantages(r, jnp.ones(g * groups), g, "std")
  sig = lambda x: x.reshape(groups, g).std(1)
  eff_bk = np.stack([0.5 * sig(np.asarray(r[:, k])) for k in range(2)], 1) / (
      sig(np.asarray(r @ w)) + 1e-6)[:, None]
  recon = np.sum(np.repeat(eff_bk, g, 0) * np.asarray(a_k), 1)
  np.testing.assert_allclose(recon, a_r, rtol=1e-3, atol=1e-4)

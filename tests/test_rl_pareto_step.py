"""The gradient-based weighting rules inside the RL train step.

Rollouts of a random tiny decoder over random semantic IDs, three synthetic
rewards of the answer (its id, its id mod 5, a sine of it) that pull in
different directions. The Gram matrix the step forms from one forward and a
vmapped VJP is checked against K separate `jax.grad` calls; the POPO and
MGDA weights against their formulas and the min-norm conditions; the whole
step on an 8-device (data x fsdp) mesh against one device.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from taiji_jax import sharding
from taiji_jax.rl import combine
from taiji_jax.rl import objectives
from taiji_jax.rl import popo
from taiji_jax.rl import reward_gradients
from taiji_jax.rl import rewards as rewards_lib
from taiji_jax.rl import rollout as rollout_lib
from taiji_jax.rl import train_step as step_lib
from taiji_jax.rl import weighting
from taiji_jax.testing import decoders
from taiji_jax.testing import sids as sid_testing
from taiji_jax.train import train_state

SIZES = (5, 4, 3)
OFFSETS = (8, 13, 17)
V = 40
G = 4
B = 4
NAMES = ("id", "mod5", "sine")


@pytest.fixture(scope="module")
def setup():
  model = decoders.random_decoder(V, seed=3, std=0.3)
  graphdef, params = nnx.split(model)
  ids = sid_testing.random_semantic_ids(37, SIZES, seed=1)
  rng = np.random.default_rng(4)
  data = {
      "prompts": jnp.asarray(rng.integers(20, V, (B, 5)), jnp.int32),
      "seen": jnp.zeros((B, 1), jnp.int32),
      "targets": jnp.ones((B,), jnp.int32),
      "users": jnp.arange(B, dtype=jnp.int32),
      "pref_histories": jnp.zeros((B, 1), jnp.int32),
  }
  cfg = rollout_lib.RolloutConfig(group_size=G, keep_hidden=True)
  fn = rollout_lib.make_rollout_fn(
      graphdef, cfg, ids.trie, ids.paths, OFFSETS,
      rewards_lib.make_reward_fn(["format"]), pad_id=0)
  roll, _ = jax.jit(fn)(params, params, {}, data, jax.random.key(0))
  items = roll.items.astype(jnp.float32)
  rewards = jnp.stack(
      [items / 37.0, (roll.items % 5) / 4.0, jnp.sin(items)], 1)
  return graphdef, params, cfg, roll, rewards


def _objective_loss(logp, roll, adv_n, r_n, name="grpo"):
  cfg = objectives.defaults(name)
  cfg = type(cfg)(**{**cfg.__dict__, "kl_coef": 0.0})
  batch = objectives.PolicyBatch(
      logp=logp, old_logp=roll.old_logp, ref_logp=roll.ref_logp,
      mask=roll.loss_mask, advantages=adv_n, rewards=r_n,
      valid=jnp.ones(roll.items.shape), group_size=G)
  return objectives.get(name)(batch, cfg)[0]


def _gram_fn(setup, rule, objective="grpo"):
  graphdef, _, cfg, _, _ = setup
  return jax.jit(
      reward_gradients.make_gram_fn(
          graphdef, cfg, OFFSETS, objective=objective,
          objective_cfg=objectives.defaults(objective),
          advantage_kind=objectives.default_advantage(objective),
          rule=rule))


@pytest.mark.parametrize("layers", ["all", "last:1", "re:mlp"])
def test_gram_over_parameters_equals_separate_gradients(setup, layers):
  graphdef, params, cfg, roll, rewards = setup
  rule = weighting.make("mgda", layers=layers)
  gram, losses = _gram_fn(setup, rule)(params, roll, rewards,
                                       jnp.ones(B * G))
  adv = combine.per_reward_advantages(rewards, jnp.ones(B * G), G,
                                               "std")
  logprob = rollout_lib.policy_logprobs(graphdef, cfg, OFFSETS)
  chosen = reward_gradients.select_leaves(params, layers)
  flat = []
  for k in range(3):
    loss_k = lambda p: _objective_loss(logprob(p, roll)[0], roll, adv[:, k],
                                       rewards[:, k])
    np.testing.assert_allclose(losses[k], loss_k(params), rtol=1e-5,
                               atol=1e-7)
    grads = jax.tree.leaves(jax.jit(jax.grad(loss_k))(params))
    flat.append(
        np.concatenate([
            np.asarray(g).ravel() for g, c in zip(grads, chosen) if c]))
  flat = np.stack(flat)
  want = flat @ flat.T
  np.testing.assert_allclose(gram, want, rtol=2e-4,
                             atol=1e-6 * np.abs(want).max())
  # The rewards do conflict on this batch: some gradient pair disagrees.
  assert np.abs(want).max() > 0


def test_mgda_ub_gram_over_hidden_states(setup):
  graphdef, params, cfg, roll, rewards = setup
  rule = weighting.make("mgda", gradients="hidden")
  gram, _ = _gram_fn(setup, rule)(params, roll, rewards, jnp.ones(B * G))
  # The rollout kept the behaviour policy's hidden states; recomputing them
  # gives the same states and the same Gram matrix.
  model = nnx.merge(graphdef, params)
  h = rollout_lib.completion_hidden(model, roll.tokens, roll.attention,
                                    roll.think_mask.shape[1])
  np.testing.assert_allclose(roll.hidden, h, rtol=1e-5, atol=1e-6)
  gram2, _ = _gram_fn(setup, rule)(params, roll._replace(hidden=None),
                                   rewards, jnp.ones(B * G))
  np.testing.assert_allclose(gram2, gram, rtol=1e-4, atol=1e-9)
  adv = combine.per_reward_advantages(rewards, jnp.ones(B * G), G,
                                               "std")
  head = rollout_lib.policy_head(graphdef, cfg, OFFSETS)
  flat = np.stack([
      np.asarray(
          jax.jit(jax.grad(lambda x: _objective_loss(
              head(params, x, roll), roll, adv[:, k], rewards[:, k])))(h)
      ).ravel() for k in range(3)
  ])
  np.testing.assert_allclose(gram, flat @ flat.T, rtol=1e-4,
                             atol=1e-6 * np.abs(flat @ flat.T).max())


def test_gradients_on_a_subset_of_groups(setup):
  _, params, _, roll, rewards = setup
  valid = jnp.ones(B * G)
  part = weighting.make("mgda", groups=2)
  gram, _ = _gram_fn(setup, part)(params, roll, rewards, valid)
  first = jax.tree.map(lambda x: x[:2 * G], roll)
  want, _ = _gram_fn(setup, weighting.make("mgda"))(params, first,
                                                    rewards[:2 * G],
                                                    valid[:2 * G])
  np.testing.assert_allclose(gram, want, rtol=1e-5, atol=1e-9)


def test_select_leaves_specs(setup):
  _, params, _, _, _ = setup
  paths = [jax.tree_util.keystr(p)
           for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  last = reward_gradients.select_leaves(params, "last:1")
  picked = {p for p, c in zip(paths, last) if c}
  assert picked and all("[1]" in p or "final_norm" in p for p in picked)
  assert not any("embed" in p for p in picked)
  assert all(reward_gradients.select_leaves(params, "last:2")[i]
             for i, p in enumerate(paths) if "blocks" in p)
  with pytest.raises(ValueError, match="has 2 blocks"):
    reward_gradients.select_leaves(params, "last:3")
  with pytest.raises(ValueError, match="choose no parameter"):
    reward_gradients.select_leaves(params, "re:nothing_like_this")
  with pytest.raises(ValueError, match="unknown weighting layers"):
    reward_gradients.select_leaves(params, "first:1")


def _step(setup, rule, objective="grpo", tx=None):
  graphdef, params, cfg, _, _ = setup
  tx = tx or optax.adam(1e-2)
  step = step_lib.make_train_step(
      graphdef, tx, cfg, OFFSETS, NAMES, objective=objective,
      objective_cfg=objectives.defaults(objective), weight_rule=rule,
      num_minibatches=2)
  w0 = weighting.initial_weights(NAMES, [0.5, 0.3, 0.2])
  return jax.jit(step), step_lib.init_state(params, tx, w0)


def test_popo_step_applies_the_exponentiated_gradient_update(setup):
  _, params, _, roll, rewards = setup
  eta, mu = 1e-3, 1e-3
  rule = weighting.make("popo", eta=eta, mu=mu, fused=False)
  step, state = _step(setup, rule)
  new, m = step(state, roll, rewards)
  gram, _ = _gram_fn(setup, rule)(params, roll, rewards, jnp.ones(B * G))
  w0 = np.asarray([0.5, 0.3, 0.2], np.float64)
  raw = w0 * np.exp(eta * np.asarray(gram, np.float64).sum(1) / mu)
  np.testing.assert_allclose(new["reward_weights"], raw / raw.sum(),
                             rtol=1e-4)
  for k, name in enumerate(NAMES):
    assert m[f"grads/popo_I/{name}"] == pytest.approx(
        float(gram[k].sum()), rel=1e-4)
  assert m["skipped"] == 0


def test_mgda_step_weights_give_a_common_descent_direction(setup):
  """With raw gradients, d = sum_k w_k g_k satisfies <g_k, d> >= |d|^2 > 0
  for every k: to first order the step (along -d) lowers every reward's
  policy loss, i.e. raises every reward."""
  _, params, _, roll, rewards = setup
  rule = weighting.make("mgda", normalization="none", fused=False)
  step, state = _step(setup, rule)
  new, _ = step(state, roll, rewards)
  w = np.asarray(new["reward_weights"], np.float64)
  gram = np.asarray(
      _gram_fn(setup, rule)(params, roll, rewards, jnp.ones(B * G))[0],
      np.float64)
  np.testing.assert_allclose(w, popo.min_norm_weights(jnp.asarray(gram)),
                             atol=1e-5)
  d2 = w @ gram @ w
  assert d2 > 0
  assert np.all(gram @ w >= d2 * (1 - 1e-3)), (gram @ w, d2)
  # The default (l2-normalised) weights: each gradient's share of the
  # direction is inversely proportional to its norm.
  step, state = _step(setup, weighting.make("mgda", fused=False))
  new, _ = step(state, roll, rewards)
  norms = np.sqrt(np.diagonal(gram))
  unit = gram / np.outer(norms, norms)
  want = np.asarray(popo.min_norm_weights(jnp.asarray(unit))) / norms
  np.testing.assert_allclose(new["reward_weights"], want / want.sum(),
                             rtol=1e-3, atol=1e-5)


def _reference_gradients(setup, kl_coef=0.0):
  """K separate `jax.grad`s of the per-reward objectives (and of the KL
  term) at the setup's parameters: [(K,) stacked leaves], [KL leaves]."""
  graphdef, params, cfg, roll, rewards = setup
  adv = combine.per_reward_advantages(rewards, jnp.ones(B * G), G, "std")
  logprob = rollout_lib.policy_logprobs(graphdef, cfg, OFFSETS)
  per_k = []
  for k in range(3):
    loss_k = lambda p, k=k: _objective_loss(logprob(p, roll)[0], roll,
                                            adv[:, k], rewards[:, k])
    per_k.append(jax.tree.leaves(jax.jit(jax.grad(loss_k))(params)))
  ocfg = objectives.ObjectiveConfig(kl_coef=kl_coef)

  def kl_loss(p):
    batch = objectives.PolicyBatch(
        logp=logprob(p, roll)[0], old_logp=roll.old_logp,
        ref_logp=roll.ref_logp, mask=roll.loss_mask,
        advantages=jnp.zeros(B * G), rewards=rewards[:, 0],
        valid=jnp.ones(B * G), group_size=G)
    return objectives.grpo(batch, ocfg)[0]

  kl = jax.tree.leaves(jax.jit(jax.grad(kl_loss))(params))
  return [np.stack(x) for x in zip(*per_k)], kl


def _flat_gram(stacked):
  flat = np.concatenate([np.asarray(x, np.float64).reshape(3, -1)
                         for x in stacked], 1)
  return flat @ flat.T


@pytest.mark.parametrize("name,fused,kl_coef", [
    ("mgda", True, 0.0),
    ("mgda", False, 0.0),
    ("popo", True, 0.0),
    ("popo", False, 0.0),
    ("mgda", True, 0.04),
])
def test_sgd_step_is_minus_lr_times_the_weighted_objective_gradients(
    setup, name, fused, kl_coef):
  """The acceptance test of the consistent formulation: with plain SGD, one
  update on the whole batch moves the parameters by exactly
  -lr (sum_k w_k g_k + g_KL), g_k the per-reward objectives' gradients the
  rule measured, w the logged (applied) weights."""
  graphdef, params, cfg, roll, rewards = setup
  lr = 0.5
  rule = {
      "mgda": lambda: weighting.make("mgda", normalization="none",
                                     fused=fused),
      "popo": lambda: weighting.make("popo", eta=1e-3, mu=1e-3, fused=fused),
  }[name]()
  assert rule.fused == fused and rule.combine == "objectives"
  ocfg = objectives.ObjectiveConfig(eps_low=0.2, eps_high=0.2,
                                    kl_coef=kl_coef)
  tx = optax.sgd(lr)
  step = jax.jit(step_lib.make_train_step(
      graphdef, tx, cfg, OFFSETS, NAMES, objective="grpo",
      objective_cfg=ocfg, weight_rule=rule, num_minibatches=1))
  w0 = weighting.initial_weights(NAMES, [0.5, 0.3, 0.2])
  new, m = step(step_lib.init_state(params, tx, w0), roll, rewards)
  assert m["skipped"] == 0 and m["updates"] == 1
  stacked, kl = _reference_gradients(setup, kl_coef)
  gram = _flat_gram(stacked)
  w = np.asarray([m[f"weights/{n}"] for n in NAMES], np.float64)
  if name == "mgda":
    np.testing.assert_allclose(
        w, popo.min_norm_weights(jnp.asarray(gram, jnp.float32)), atol=1e-4)
  else:
    raw = np.asarray(w0) * np.exp(1e-3 * gram.sum(1) / 1e-3)
    np.testing.assert_allclose(w, raw / raw.sum(), rtol=1e-4)
  for before, after, g_k, g_kl in zip(jax.tree.leaves(params),
                                      jax.tree.leaves(new["params"]),
                                      stacked, kl):
    want = -lr * (np.tensordot(w, np.asarray(g_k, np.float64), 1) +
                  np.asarray(g_kl, np.float64))
    got = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-3,
                               atol=1e-6 + 1e-4 * np.abs(want).max())
  if kl_coef:  # the KL term moved the parameters too
    assert max(np.abs(np.asarray(x)).max() for x in kl) > 0
  # The logged Gram statistics are those of the reference gradients.
  norms = np.sqrt(np.diagonal(gram))
  for k, n in enumerate(NAMES):
    assert m[f"grads/norm/{n}"] == pytest.approx(norms[k], rel=1e-3)
    assert m[f"grads/alignment/{n}"] == pytest.approx(
        (gram @ w)[k] / (w @ gram @ w), rel=1e-3)


def test_mgda_alignments_on_the_applied_step_are_equal_on_the_support(setup):
  """For the min-norm weights the logged a_k = <g_k, d> / |d|^2 with the
  applied direction d are 1 on the support and >= 1 off it (KKT), here
  for an interior solution of two rewards and for all three."""
  graphdef, params, cfg, roll, rewards = setup
  tx = optax.sgd(0.1)
  for cols in ((0, 2), (0, 1, 2)):
    names = [NAMES[c] for c in cols]
    step = jax.jit(step_lib.make_train_step(
        graphdef, tx, cfg, OFFSETS, names, objective="grpo",
        objective_cfg=objectives.defaults("grpo"),
        weight_rule=weighting.make("mgda", normalization="none"),
        num_minibatches=1))
    w0 = weighting.initial_weights(names, [1.0] * len(cols))
    _, m = step(step_lib.init_state(params, tx, w0), roll,
                rewards[:, jnp.asarray(cols)])
    w = np.asarray([m[f"weights/{n}"] for n in names])
    a = np.asarray([m[f"grads/alignment/{n}"] for n in names])
    support = w > 1e-4
    assert np.all(a >= 1 - 1e-3), (w, a)
    np.testing.assert_allclose(a[support], 1.0, atol=2e-3)
    if len(cols) == 2:
      assert support.all(), w  # interior: both rewards carry weight


def test_paper_combine_logs_its_effective_weights(setup):
  """combine="rewards" (the paper's form) keeps the old update: the
  objective on the group-normalised weighted reward; its step's effective
  per-reward weights are logged, and no alignment claims a direction it
  does not take."""
  graphdef, params, cfg, roll, rewards = setup
  tx = optax.sgd(0.1)
  rule = weighting.make("mgda", normalization="none", combine="rewards")
  step = jax.jit(step_lib.make_train_step(
      graphdef, tx, cfg, OFFSETS, NAMES, objective="grpo",
      objective_cfg=objectives.defaults("grpo"), weight_rule=rule,
      num_minibatches=1))
  w0 = weighting.initial_weights(NAMES, [1.0] * 3)
  _, m = step(step_lib.init_state(params, tx, w0), roll, rewards)
  w = jnp.asarray([m[f"weights/{n}"] for n in NAMES])
  eff = combine.effective_weights(rewards, jnp.ones(B * G), G, w)
  for k, n in enumerate(NAMES):
    assert m[f"combine/effective/{n}"] == pytest.approx(float(eff[k]),
                                                        rel=1e-5)
    assert f"grads/alignment/{n}" not in m
  with pytest.raises(ValueError, match="advantage 'gdpo' with combine"):
    step_lib.make_train_step(
        graphdef, tx, cfg, OFFSETS, NAMES, objective="grpo",
        objective_cfg=objectives.defaults("grpo"),
        weight_rule=weighting.make("mgda"), advantage="gdpo")


# popo stands for every rule on parameter gradients (mgda shares its Gram
# matrix), mgda_ub for the hidden-state ones; the fixed rule's sharded step
# is in tests/test_rl_rollout.py.
@pytest.mark.parametrize("rule", ["popo", "mgda_ub"])
def test_sharded_step_matches_one_device(setup, rule):
  """Rollouts over a data x fsdp = 2 x 4 mesh, parameters and optimizer
  state sharded as the trainer shards them: the same weights, Gram matrix
  and update as on one device. (Plain SGD: Adam's first step is about
  lr * sign(g), which magnifies rounding where g is ~0.)"""
  _, params, _, roll, rewards = setup
  make = {
      "popo": lambda: weighting.make("popo", eta=1e-3, mu=1e-3),
      "mgda_ub": lambda: weighting.make("mgda", gradients="hidden"),
  }[rule]
  sgd = optax.sgd(0.1)
  step, state = _step(setup, make(), tx=sgd)
  want, want_m = step(state, roll, rewards)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  rules = sharding.DEFAULT_RULES
  _, fresh = _step(setup, make(), tx=sgd)
  shardings = sharding.tree_shardings(jax.eval_shape(lambda: fresh), mesh,
                                      rules)
  placed_state = jax.device_put(fresh, shardings)
  assert any(len(x.sharding.device_set) == 8 and
             not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(placed_state["params"]))
  put = train_state.batch_putter(mesh, rules)
  placed = jax.tree.map(
      lambda x: put({"x": np.asarray(x)})["x"] if x.ndim else x, roll)
  with sharding.use_mesh(mesh, rules):
    got, got_m = step(placed_state, placed, rewards)
  np.testing.assert_allclose(got["reward_weights"], want["reward_weights"],
                             rtol=1e-4, atol=1e-6)
  for key in want_m:
    if key.startswith("grads/"):
      assert got_m[key] == pytest.approx(float(want_m[key]), rel=1e-3,
                                         abs=1e-7), key
  for a, c in zip(jax.tree.leaves(got["params"]),
                  jax.tree.leaves(want["params"])):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)

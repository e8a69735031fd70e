"""RL rollouts: layout, masks and log-probs against direct computations.

A random tiny decoder over a 40-token vocabulary (specials 0..7, SID tokens
of the (5, 4, 3) levels from 8, 13 and 17, text pieces 20..39) and 37
random items. The behaviour log-probs the rollout stores are recomputed
here from the model's step-by-step logits (the cached decoding path), so a
misaligned position, a wrong mask or a wrong renormalisation shows up.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from taiji_jax import sharding
from taiji_jax.generate import constrained
from taiji_jax.generate import recommend
from taiji_jax.rl import objectives
from taiji_jax.rl import rewards as rewards_lib
from taiji_jax.rl import rollout as rollout_lib
from taiji_jax.rl import train_step as step_lib
from taiji_jax.rl import weighting
from taiji_jax.testing import decoders
from taiji_jax.testing import sids as sid_testing
from taiji_jax.train import train_state

PAD, THINK, THINK_END, ANSWER = 0, 4, 5, 6
SIZES = (5, 4, 3)
OFFSETS = (8, 13, 17)
V = 40
G = 3
MARKERS = dict(think_id=THINK, think_end_id=THINK_END, answer_id=ANSWER)


@pytest.fixture(scope="module")
def sids():
  return sid_testing.random_semantic_ids(37, SIZES, seed=0)


@pytest.fixture(scope="module")
def model():
  return decoders.random_decoder(V)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(2)
  b, t = 4, 6
  prompts = np.zeros((b, t), np.int32)
  for row, n in enumerate((6, 3, 5, 2)):
    prompts[row, t - n:] = rng.integers(20, V, n)
  seen = np.zeros((b, 5), np.int32)
  seen[0, :3] = (1, 2, 3)
  seen[2, :1] = (7,)
  return {
      "prompts": jnp.asarray(prompts),
      "seen": jnp.asarray(seen),
      "targets": jnp.asarray([4, 5, 6, 8], jnp.int32),
      "users": jnp.arange(1, b + 1, dtype=jnp.int32),
      "pref_histories": jnp.asarray(seen),
  }


def _rollout(model, sids, batch, **cfg):
  graphdef, params = nnx.split(model)
  # A rationale may use three text pieces and the stop token only, so that
  # the random model closes its thought early on some rows, not on others.
  allowed = np.zeros(V, bool)
  allowed[[THINK_END, 20, 21, 22]] = True
  fn = rollout_lib.make_rollout_fn(
      graphdef,
      rollout_lib.RolloutConfig(group_size=G, **cfg),
      sids.trie,
      sids.paths,
      OFFSETS,
      rewards_lib.make_reward_fn(["hit", "format"]),
      pad_id=PAD,
      markers=MARKERS,
      allowed_v=jnp.asarray(allowed))
  roll, rewards = jax.jit(fn)(params, params, {}, batch, jax.random.key(3))
  return roll, rewards, allowed


def _step_logits(model, tokens, attention, t_prompt):
  """Logits before every completion token, from the cached decode path."""
  n, s = tokens.shape
  cache = model.init_cache(n, s)
  logits, cache = model.decode_step(
      tokens[:, :t_prompt], cache, attention_mask_bt=attention[:, :t_prompt])
  out = [logits[:, -1]]
  for j in range(t_prompt, s - 1):
    logits, cache = model.decode_step(
        tokens[:, j:j + 1], cache, attention_mask_bt=attention[:, j:j + 1])
    # A masked slot reads nothing new: the next real token is predicted
    # from the last real position.
    keep = attention[:, j]
    out.append(jnp.where(keep[:, None], logits[:, 0], out[-1]))
  return jnp.stack(out, 1)  # (N, C, V)


def _direct_logp(logits_cv, token, allowed_mask, temperature):
  z = logits_cv / temperature
  z = np.where(allowed_mask, z, -np.inf)
  z = z - np.logaddexp.reduce(z[allowed_mask])
  return z[token]


@pytest.mark.parametrize("renormalise", [True, False])
def test_plain_rollout_logprobs_match_the_cached_decoder(
    model, sids, batch, renormalise):
  roll, rewards, _ = _rollout(
      model, sids, batch, temperature=0.7, renormalise=renormalise)
  n = 4 * G
  levels = len(SIZES)
  assert roll.tokens.shape == (n, 6 + levels)
  assert roll.loss_mask.shape == (n, levels)
  # Every answer is a real item, never one the user has seen.
  items = np.asarray(roll.items)
  assert (items > 0).all()
  seen = np.repeat(np.asarray(batch["seen"]), G, 0)
  assert not any(items[i] in seen[i][seen[i] > 0] for i in range(n))
  # The SID tokens spell the item.
  codes = np.asarray(roll.tokens[:, -levels:]) - np.asarray(OFFSETS)
  assert (np.asarray(sids.codes)[items] == codes).all()
  np.testing.assert_array_equal(roll.old_logp, roll.ref_logp)
  logits = np.asarray(
      _step_logits(model, roll.tokens, roll.attention, 6)).astype(np.float64)
  masks = [np.asarray(m) for m in roll.sid_masks]
  for i in range(n):
    for l in range(levels):
      allowed = np.zeros(V, bool)
      if renormalise:
        allowed[OFFSETS[l]:OFFSETS[l] + SIZES[l]] = masks[l][i]
      else:
        allowed[:] = True
      token = int(roll.tokens[i, 6 + l])
      assert allowed[token]
      want = _direct_logp(logits[i, l], token, allowed, 0.7)
      np.testing.assert_allclose(roll.old_logp[i, l], want, atol=2e-5)
  # The allowed set at each level is the trie's children, minus subtrees
  # whose items are all seen: the constrained decoder's own masks.
  want_masks = constrained.allowed_masks(sids.trie, jnp.asarray(codes),
                                         jnp.asarray(seen), sids.paths)
  for got, want in zip(roll.sid_masks, want_masks):
    np.testing.assert_array_equal(got, want)
  # hit: the sampled item is the target; format: always kept without
  # reasoning.
  targets = np.repeat(np.asarray(batch["targets"]), G)
  np.testing.assert_array_equal(rewards[:, 0], (items == targets) * 1.0)
  np.testing.assert_array_equal(rewards[:, 1], 1.0)


def test_full_softmax_scores_equal_the_samplers_scores(model, sids, batch):
  """renormalise=False: the summed log-probs are `sample_items`' scores
  (temperature-1 log-likelihood of the SID) for the same key."""
  roll, _, _ = _rollout(model, sids, batch, renormalise=False)
  _, sample_key = jax.random.split(jax.random.key(3))
  prompts = jnp.repeat(batch["prompts"], G, 0)
  seen = jnp.repeat(batch["seen"], G, 0)
  decoded = recommend.sample_items(
      model,
      prompts,
      sids.trie,
      OFFSETS,
      sample_key,
      pad_id=PAD,
      exclude_bh=seen,
      paths=sids.paths)
  np.testing.assert_array_equal(decoded.items[:, 0], roll.items)
  np.testing.assert_allclose(
      roll.old_logp.sum(1), decoded.scores[:, 0], rtol=1e-5, atol=1e-5)


def test_reasoning_rollout_layout_and_logprobs(model, sids, batch):
  max_think = 5
  roll, rewards, allowed = _rollout(
      model, sids, batch, think=True, max_think=max_think)
  n, levels = 4 * G, len(SIZES)
  t_prompt = 6 + 1  # the prompt and <think>
  c = max_think + 2 + levels
  assert roll.tokens.shape == (n, t_prompt + c)
  assert (np.asarray(roll.tokens[:, t_prompt - 1]) == THINK).all()
  tokens = np.asarray(roll.tokens)
  loss_mask = np.asarray(roll.loss_mask)
  closed = np.asarray(roll.closed)
  length = np.asarray(roll.think_length)
  assert closed.any() and not closed.all() and (length > 0).any()
  logits = np.asarray(_step_logits(model, roll.tokens, roll.attention,
                                   t_prompt)).astype(np.float64)
  for i in range(n):
    fed = length[i] + closed[i]
    body = tokens[i, t_prompt:t_prompt + max_think]
    # Rationale: text pieces (and its own </think>), then padding.
    assert all(allowed[tok] for tok in body[:fed])
    assert (body[fed:] == PAD).all()
    if closed[i]:
      assert body[fed - 1] == THINK_END
    tail = tokens[i, t_prompt + max_think:t_prompt + max_think + 2]
    assert tuple(tail) == ((PAD if closed[i] else THINK_END), ANSWER)
    # Loss on the sampled tokens only: the rationale and the SID.
    want_mask = np.zeros(c)
    want_mask[:fed] = 1
    want_mask[-levels:] = 1
    np.testing.assert_array_equal(loss_mask[i], want_mask)
    for j in range(fed):
      want = _direct_logp(logits[i, j], body[j], allowed, 1.0)
      np.testing.assert_allclose(roll.old_logp[i, j], want, atol=2e-5)
    for l in range(levels):
      mask = np.zeros(V, bool)
      mask[OFFSETS[l]:OFFSETS[l] + SIZES[l]] = np.asarray(roll.sid_masks[l][i])
      token = tokens[i, -levels + l]
      want = _direct_logp(logits[i, c - levels + l], token, mask, 1.0)
      np.testing.assert_allclose(roll.old_logp[i, c - levels + l], want,
                                 atol=2e-5)
  # format = the model closed its rationale itself.
  np.testing.assert_array_equal(rewards[:, 1], closed * 1.0)


def test_allowed_masks_follow_the_trie_along_given_codes(sids):
  all_codes = np.asarray(sids.codes)[1:]
  # Row 1 ends in a last-level code that no item has under its prefix.
  used = {tuple(c) for c in all_codes.tolist()}
  leave = [(c, f) for c in all_codes.tolist() for f in range(SIZES[2])
           if (c[0], c[1], f) not in used]
  assert leave, "the fixture's trie has no missing last-level edge"
  (prefix, free) = leave[0]
  codes = np.stack([all_codes[0], [prefix[0], prefix[1], free]])
  masks = [np.asarray(m) for m in
           constrained.allowed_masks(sids.trie, jnp.asarray(codes))]
  for row in range(2):
    for l in range(len(SIZES)):
      # The allowed set is exactly the codes items have under the prefix.
      want = {c[l] for c in all_codes.tolist()
              if tuple(c[:l]) == tuple(codes[row, :l])}
      assert set(np.flatnonzero(masks[l][row])) == want
  assert masks[2][0, codes[0, 2]] and not masks[2][1, codes[1, 2]]


def _train_step(model,
                objective="grpo",
                minibatches=1,
                lr=1e-2,
                group_size=G,
                names=("hit", "format")):
  graphdef, params = nnx.split(model)
  tx = optax.adam(lr)
  step = step_lib.make_train_step(
      graphdef,
      tx,
      rollout_lib.RolloutConfig(group_size=group_size),
      OFFSETS,
      names,
      objective=objective,
      objective_cfg=objectives.defaults(objective),
      weight_rule=weighting.make("fixed"),
      num_minibatches=minibatches)
  weights = jnp.full((len(names),), 1.0 / len(names))
  return jax.jit(step), step_lib.init_state(params, tx, weights)


def test_first_update_is_on_policy_and_moves_the_parameters(
    model, sids, batch):
  roll, _, _ = _rollout(model, sids, batch)
  # A reward with spread in every group (the item id), so the update is
  # not zero.
  rewards = jnp.stack([roll.items / 37.0, jnp.zeros_like(roll.items)], 1)
  step, state = _train_step(model)
  before = jax.tree.map(np.asarray, state["params"])
  new, metrics = step(state, roll, rewards)
  # One minibatch: the update's log-probs are the rollout's, exactly.
  assert metrics["ratio"] == pytest.approx(1.0, abs=1e-6)
  assert metrics["clip_frac"] == 0.0 and metrics["skipped"] == 0
  assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)
  assert metrics["groups/zero_variance"] < 1.0
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(),
                       new["params"], before)
  assert max(jax.tree.leaves(moved)) > 0
  assert int(new["step"]) == 1


def test_non_finite_rewards_are_masked_and_a_nan_loss_is_skipped(
    model, sids, batch):
  roll, _, _ = _rollout(model, sids, batch)
  n = roll.items.shape[0]
  rewards = jnp.stack([roll.items / 37.0, jnp.zeros(n)], 1)
  # NaN and inf rewards on two rows: masked, the update stays finite.
  bad = rewards.at[0, 0].set(jnp.nan).at[4, 1].set(jnp.inf)
  step, state = _train_step(model)
  new, metrics = step(state, roll, bad)
  assert metrics["reward/nonfinite_rows"] == pytest.approx(2 / n)
  assert metrics["reward/hit/nonfinite"] == pytest.approx(1 / n)
  assert metrics["skipped"] == 0
  assert all(np.isfinite(np.asarray(x)).all()
             for x in jax.tree.leaves(new["params"]))
  # A NaN inside the loss (here: behaviour log-probs) skips the update: the
  # parameters and optimizer state are kept, bit for bit.
  step, state = _train_step(model)
  before = jax.tree.map(np.asarray, state)
  poisoned = roll._replace(old_logp=roll.old_logp.at[1, 0].set(jnp.nan))
  new, metrics = step(state, poisoned, rewards)
  assert metrics["skipped"] == 1
  for a, b in zip(jax.tree.leaves(new["params"]),
                  jax.tree.leaves(before["params"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(new["opt_state"]),
                  jax.tree.leaves(before["opt_state"])):
    np.testing.assert_array_equal(a, b)


def test_all_equal_groups_give_no_policy_gradient(model, sids, batch):
  roll, _, _ = _rollout(model, sids, batch)
  n = roll.items.shape[0]
  rewards = jnp.ones((n, 2))
  step, state = _train_step(model, objective="dapo")  # no KL term
  before = jax.tree.map(np.asarray, state["params"])
  new, metrics = step(state, roll, rewards)
  assert metrics["groups/zero_variance"] == 1.0
  assert metrics["advantage/abs_mean"] == 0.0
  assert metrics["grad_norm"] == 0.0
  for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)


def test_sharded_train_step_matches_one_device(model, sids):
  """The rollout batch split over an 8-device data axis, parameters
  replicated: the same update as on one device."""
  rng = np.random.default_rng(5)
  b = 8
  prompts = rng.integers(20, V, (b, 4)).astype(np.int32)
  data = {
      "prompts": jnp.asarray(prompts),
      "seen": jnp.zeros((b, 2), jnp.int32),
      "targets": jnp.asarray(rng.integers(1, 38, b), jnp.int32),
      "users": jnp.arange(b, dtype=jnp.int32),
      "pref_histories": jnp.zeros((b, 2), jnp.int32),
  }
  roll, _, _ = _rollout(model, sids, data)
  rewards = jnp.stack([roll.items / 37.0, roll.items % 3 / 2.0], 1)
  step, state = _train_step(model, minibatches=2)
  want, want_m = step(state, roll, rewards)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert mesh.shape["data"] == 8
  rules = sharding.DEFAULT_RULES
  put = train_state.batch_putter(mesh, rules)
  placed = jax.tree.map(
      lambda x: put({"x": np.asarray(x)})["x"] if x.ndim else x, roll)
  assert len(placed.tokens.sharding.device_set) == 8
  _, state = _train_step(model, minibatches=2)
  with sharding.use_mesh(mesh, rules):
    got, got_m = step(state, placed, rewards)
  for a, c in zip(jax.tree.leaves(got["params"]),
                  jax.tree.leaves(want["params"])):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
  assert got_m["loss"] == pytest.approx(float(want_m["loss"]), rel=1e-5,
                                        abs=1e-7)


@pytest.mark.parametrize(
    "objective", ["grpo", "dr_grpo", "dapo", "ecpo", "gbpo", "dpo", "rspo"])
def test_each_objective_raises_a_toy_reward_through_the_whole_stack(
    model, sids, objective):
  """Rollouts from the decoder, renormalised log-probs, the jitted update:
  the toy reward (an item's id / 37, so high ids are better) goes up."""
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(7)
  b = 8
  data = {
      "prompts": jnp.asarray(rng.integers(20, V, (b, 4)), jnp.int32),
      "seen": jnp.zeros((b, 1), jnp.int32),
      "targets": jnp.ones((b,), jnp.int32),
      "users": jnp.arange(b, dtype=jnp.int32),
      "pref_histories": jnp.zeros((b, 1), jnp.int32),
  }

  def toy(sasrec_graphdef=None):
    del sasrec_graphdef
    return lambda tables, inputs: inputs.items / 37.0

  with rewards_lib.REWARDS.temporarily("toy_item_id", toy):
    reward_fn = rewards_lib.make_reward_fn(["toy_item_id"])
  rollout = jax.jit(
      rollout_lib.make_rollout_fn(
          graphdef,
          rollout_lib.RolloutConfig(group_size=4),
          sids.trie,
          sids.paths,
          OFFSETS,
          reward_fn,
          pad_id=PAD))
  step, state = _train_step(
      model, objective=objective, lr=3e-2, group_size=4,
      names=("toy_item_id",))
  means = []
  for i in range(30):
    roll, rewards = rollout(state["params"], params, {}, data,
                            jax.random.key(i))
    means.append(float(rewards.mean()))
    state, metrics = step(state, roll, rewards)
    assert metrics["skipped"] == 0
  first, last = np.mean(means[:4]), np.mean(means[-4:])
  # At least a fifth of the way from the start (~0.71) to the best item
  # (measured: 0.81 for Dr. GRPO, which settles on item 30, to 0.96 for
  # GRPO).
  assert last - first > (1.0 - first) / 5, (first, last, means)


def test_a_user_who_has_seen_every_item_gets_an_empty_answer(model, sids):
  """No item left to recommend: item 0, no loss tokens, zero rewards, and
  the update stays finite."""
  b = 2
  seen = np.zeros((b, 37), np.int32)
  seen[0] = np.arange(1, 38)  # user 0 has seen the whole catalogue
  data = {
      "prompts": jnp.asarray([[21, 22, 23], [24, 25, 26]], jnp.int32),
      "seen": jnp.asarray(seen),
      "targets": jnp.asarray([3, 4], jnp.int32),
      "users": jnp.arange(b, dtype=jnp.int32),
      "pref_histories": jnp.asarray(seen),
  }
  roll, rewards, _ = _rollout(model, sids, data)
  empty = np.arange(b * G) < G
  np.testing.assert_array_equal(np.asarray(roll.items) == 0, empty)
  assert (np.asarray(roll.loss_mask)[empty] == 0).all()
  assert (np.asarray(roll.loss_mask)[~empty] == 1).all()
  assert np.isfinite(np.asarray(roll.old_logp)).all()
  np.testing.assert_array_equal(np.asarray(rewards)[empty], 0.0)
  step, state = _train_step(model)
  new, metrics = step(state, roll, rewards)
  assert metrics["answers/empty"] == pytest.approx(0.5)
  assert metrics["skipped"] == 0
  assert all(np.isfinite(np.asarray(x)).all()
             for x in jax.tree.leaves(new["params"]))

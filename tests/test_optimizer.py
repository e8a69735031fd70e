"""The optimizer from config: frozen layers and patterns change nothing of
what they freeze, keep no optimizer moments for it, and train the rest."""

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from taiji_jax.models import decoder as decoder_lib
from taiji_jax.sidlm import task
from taiji_jax.train import optimizer


def _config(**train):
  return ml_collections.ConfigDict({
      "train": dict(lr=1e-2, warmup_steps=1, schedule="constant",
                    grad_clip=1.0, b1=0.9, b2=0.98, weight_decay=0.01,
                    **train)
  })


def _steps(config, steps=2, **model):
  cfg = decoder_lib.DecoderConfig.tiny(vocab_size=40, max_seq_len=16, **model)
  tx = optimizer.from_config(config, 10)
  graphdef, init = task.state_init_fn(cfg, tx, seed=0)
  state = init()
  before = jax.tree.map(np.asarray, state["params"])
  step = jax.jit(task.make_train_step(graphdef, tx, pad_id=0))
  rng = np.random.default_rng(0)
  for _ in range(steps):
    tokens = jnp.asarray(rng.integers(1, 40, (4, 12)), jnp.int32)
    state, _ = step(state, {"tokens": tokens, "loss_mask": tokens > 10})
  changed = {
      optimizer.param_path(path): not np.array_equal(a, np.asarray(b))
      for (path, a), b in zip(
          jax.tree_util.tree_flatten_with_path(before)[0],
          jax.tree.leaves(state["params"]))
  }
  return changed, state


def _moments(state):
  return sum(x.size for x in jax.tree.leaves(state["opt_state"]))


def test_frozen_lower_layers_do_not_move_and_keep_no_moments():
  every, full = _steps(_config())
  assert all(every.values())
  changed, state = _steps(_config(freeze_layers=1))
  frozen = {p for p in changed if p.startswith("blocks/0/")}
  assert frozen and not any(changed[p] for p in frozen)
  assert all(v for p, v in changed.items() if p not in frozen)
  frozen_size = sum(
      np.size(x) for path, x in jax.tree_util.tree_flatten_with_path(
          state["params"])[0]
      if optimizer.param_path(path).startswith("blocks/0/"))
  # AdamW keeps two moments per trained parameter, none per frozen one.
  assert _moments(full) - _moments(state) == 2 * frozen_size


def test_freeze_patterns_fix_the_embedding():
  changed, _ = _steps(_config(freeze=("^embed",)))
  assert "embed" in changed and not changed["embed"]
  assert any(v for p, v in changed.items() if p.startswith("blocks/"))


def test_new_rows_train_at_their_own_learning_rate():
  """`new_rows_lr_scale` = 3 from id 30: the updates of embedding rows >= 30
  are exactly 3x the unscaled ones; every other update is equal."""
  cfg = decoder_lib.DecoderConfig.tiny(vocab_size=40, max_seq_len=16)
  params = nnx.state(decoder_lib.Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  grads = jax.tree.map(
      lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
  updates = {}
  for scale in (1.0, 3.0):
    tx = optimizer.from_config(_config(new_rows_lr_scale=scale), 10, 30)
    opt = tx.init(params)
    for _ in range(2):  # the first step's learning rate is 0 (warmup)
      u, opt = tx.update(grads, opt, params)
    updates[scale] = jax.tree.map(np.asarray, u)
  plain, scaled = updates[1.0], updates[3.0]
  e1, e3 = plain["embed"][...], scaled["embed"][...]
  assert np.abs(e1[30:]).min() > 0
  np.testing.assert_allclose(e3[30:], 3 * e1[30:], rtol=1e-6)
  np.testing.assert_array_equal(e3[:30], e1[:30])
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(scaled)):
    if a.shape != e1.shape:
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="pretrained vocabulary"):
    optimizer.from_config(_config(new_rows_lr_scale=3.0), 10)
  with pytest.raises(ValueError, match="> 0"):
    optimizer.from_config(_config(new_rows_lr_scale=0.0), 10, 30)


@pytest.mark.parametrize("train, match", [
    (dict(freeze=("blocks/9/",)), "match no parameter"),
    (dict(freeze_layers=5), "match no parameter"),
    (dict(freeze=("(",)), "not a regular expression"),
    (dict(freeze_layers=-1), ">= 0"),
])
def test_bad_freeze_settings_are_named(train, match):
  with pytest.raises(ValueError, match=match):
    _steps(_config(**train), steps=1)


def test_lora_trains_only_its_updates_and_the_embedding():
  model = dict(lora_rank=3, lora_targets=("q", "v", "down"))
  _, full = _steps(_config(), **model)
  changed, state = _steps(_config(train_only=("lora_", "^embed")), **model)
  lora = {p for p in changed if "/lora_" in p}
  assert len(lora) == 2 * 3 * 2  # A and B of 3 targets in 2 blocks
  assert all(changed[p] for p in lora) and changed["embed"]
  assert not any(v for p, v in changed.items()
                 if p not in lora and p != "embed")
  trained = sum(
      np.size(x) for path, x in jax.tree_util.tree_flatten_with_path(
          state["params"])[0]
      if "/lora_" in optimizer.param_path(path) or
      optimizer.param_path(path) == "embed")
  total = sum(np.size(x) for x in jax.tree.leaves(state["params"]))
  assert _moments(full) - _moments(state) == 2 * (total - trained)


def test_a_lora_model_starts_as_the_model_without_it():
  base = decoder_lib.DecoderConfig.tiny(vocab_size=40, max_seq_len=16)
  tokens = jnp.asarray(np.arange(12).reshape(2, 6) % 40)
  plain = decoder_lib.Decoder(base, rngs=nnx.Rngs(0))(tokens)
  for targets in (("q", "v"), ("k", "o", "gate", "up", "down")):
    cfg = decoder_lib.DecoderConfig.tiny(
        vocab_size=40, max_seq_len=16, lora_rank=4, lora_targets=targets)
    np.testing.assert_array_equal(
        decoder_lib.Decoder(cfg, rngs=nnx.Rngs(0))(tokens), plain)
  with pytest.raises(ValueError, match="lora_targets"):
    decoder_lib.DecoderConfig.tiny(lora_rank=2, lora_targets=("qq",))


@pytest.mark.parametrize("train", [dict(freeze_layers=1),
                                   dict(train_only=("lora_", "^embed"))])
def test_frozen_states_shard_and_step_on_a_mesh(train):
  """The trainer's path: abstract state -> shardings -> sharded init on a
  (data, fsdp) mesh; the frozen parameters' empty moment slots included."""
  from taiji_jax import sharding  # pylint: disable=g-import-not-at-top
  from taiji_jax.train import train_state  # pylint: disable=g-import-not-at-top
  cfg = decoder_lib.DecoderConfig.tiny(vocab_size=40, max_seq_len=16,
                                       lora_rank=2)
  tx = optimizer.from_config(_config(**train), 10)
  graphdef, init = task.state_init_fn(cfg, tx, seed=0)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  state, shardings = train_state.init_sharded(init, mesh,
                                              sharding.DEFAULT_RULES)
  step = task.jit_train_step(task.make_train_step(graphdef, tx, pad_id=0),
                             shardings, mesh)
  tokens = np.random.default_rng(0).integers(1, 40, (8, 12)).astype(np.int32)
  with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
    state, metrics = step(state, {"tokens": tokens, "loss_mask": tokens > 10})
  assert np.isfinite(float(metrics["loss"]))

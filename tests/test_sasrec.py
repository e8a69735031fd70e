"""SASRec model: shapes, causality, padding, loss, scores, sharded training."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from taiji_jax import sharding
from taiji_jax.models import sasrec
from taiji_jax.stages import artifacts
from taiji_jax.stages import sasrec as sasrec_stage

NUM_ITEMS = 47  # 48 table rows: divisible by a 2-way tensor axis.


def _model(seed=0, **overrides):
  cfg = sasrec.SASRecConfig.tiny(NUM_ITEMS)
  if overrides:
    cfg = sasrec.SASRecConfig(**{**cfg.__dict__, **overrides})
  return sasrec.SASRec(cfg, rngs=nnx.Rngs(params=seed))


@nnx.jit(static_argnames=("deterministic",))
def _apply(model, x, deterministic=True, rngs=None):
  return model(x, deterministic=deterministic, rngs=rngs)


def _histories(rng, b, t, min_len=1):
  out = np.zeros((b, t), np.int32)
  for row in range(b):
    n = rng.integers(min_len, t + 1)
    out[row, t - n:] = rng.integers(1, NUM_ITEMS + 1, n)
  return jnp.asarray(out)


def test_logit_shapes_and_dtype():
  model = _model()
  x = _histories(np.random.default_rng(0), 3, 11)
  logits = _apply(model, x)
  chex.assert_shape(logits, (3, 11, NUM_ITEMS + 1))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)


def test_causal_future_items_do_not_change_past_logits():
  model = _model()
  x = _histories(np.random.default_rng(1), 2, 11, min_len=11)
  y = x.at[:, 7:].set((x[:, 7:] % NUM_ITEMS) + 1)
  a, b = _apply(model, x), _apply(model, y)
  np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-5)
  assert not np.allclose(a[:, 7:], b[:, 7:], atol=1e-3)


def test_left_padding_and_window_length_do_not_change_last_position():
  """Right alignment: the same 5 items give the same prediction whether the
  window is 11 or 5 long and whatever the padding."""
  model = _model()
  items = jnp.asarray([[3, 9, 27, 4, 11]], jnp.int32)
  long = jnp.zeros((1, 11), jnp.int32).at[:, 6:].set(items)
  np.testing.assert_allclose(
      _apply(model, items)[:, -1], _apply(model, long)[:, -1], atol=1e-5)


def test_too_long_sequence_is_an_error():
  with pytest.raises(ValueError, match="exceeds max_len"):
    _model()(jnp.ones((1, 12), jnp.int32))


def test_config_validation():
  with pytest.raises(ValueError, match="divisible"):
    sasrec.SASRecConfig(num_items=5, embed_dim=10, num_heads=3)
  with pytest.raises(ValueError, match="dropout"):
    sasrec.SASRecConfig(num_items=5, dropout=1.0)


def test_loss_matches_manual_cross_entropy_and_ignores_padding():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
  targets = jnp.asarray([[0, 2, 5], [1, 0, 3]], jnp.int32)
  loss, count = sasrec.next_item_loss(logits, targets)
  manual = []
  for b, t in [(0, 1), (0, 2), (1, 0), (1, 2)]:
    row = np.asarray(logits[b, t, 1:])  # column 0 (padding) excluded
    logz = np.log(np.exp(row - row.max()).sum()) + row.max()
    manual.append(logz - row[targets[b, t] - 1])
  assert int(count) == 4
  np.testing.assert_allclose(loss, np.mean(manual), rtol=1e-6)


def test_score_all_items_and_candidates_agree_with_logits():
  model = _model()
  x = _histories(np.random.default_rng(3), 4, 11)
  last = _apply(model, x)[:, -1]
  np.testing.assert_allclose(sasrec.score(model, x), last, atol=1e-5)
  cands = jnp.asarray([5, 1, 40])
  np.testing.assert_allclose(
      sasrec.score(model, x, cands), last[:, cands], atol=1e-5)
  np.testing.assert_allclose(model.score(x, cands), last[:, cands], atol=1e-5)
  per_user = jnp.asarray(np.random.default_rng(4).integers(1, 48, (4, 6)))
  np.testing.assert_allclose(
      sasrec.score(model, x, per_user),
      jnp.take_along_axis(last, per_user, 1),
      atol=1e-5)


def test_dropout_is_stochastic_only_in_training():
  model = _model()
  x = _histories(np.random.default_rng(5), 2, 11)
  a = _apply(model, x, False, nnx.Rngs(dropout=0))
  b = _apply(model, x, False, nnx.Rngs(dropout=1))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(_apply(model, x), _apply(model, x))


def test_parameter_count_of_default_config_by_eval_shape():
  cfg = sasrec.SASRecConfig(num_items=1682)
  abstract = nnx.eval_shape(lambda: sasrec.SASRec(cfg, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  d, m, l = 64, 256, 2
  block = (3 * d * d + 3 * d) + (d * d + d) + (d * m + m + m * d + d) + 4 * d
  expected = 1683 * d + 50 * d + l * block + 2 * d
  assert count == expected


def _trainer_config(mesh):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.max_len = 11
  c.model = ml_collections.ConfigDict(
      dict(
          embed_dim=14,
          num_layers=2,
          num_heads=2,
          mlp_dim=22,
          dropout=0.1,
          attn_dropout=0.1))
  c.train = ml_collections.ConfigDict(
      dict(
          lr=1e-2,
          schedule="constant",
          warmup_steps=1,
          b1=0.9,
          b2=0.98,
          weight_decay=0.01,
          grad_clip=1.0))
  c.eval = ml_collections.ConfigDict(dict(ks=(5, 10), mask_history=True))
  c.mesh = ml_collections.ConfigDict(mesh)
  c.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]
  return c


def _setup(mesh_shape, devices):
  config = _trainer_config(mesh_shape)
  mesh = sharding.make_mesh(mesh_shape, devices)
  cfg = artifacts.sasrec_model_config(config, NUM_ITEMS)
  return sasrec_stage.build(config, cfg, total_steps=10, mesh=mesh)


def _batch(seed=0, b=8):
  x = np.asarray(_histories(np.random.default_rng(seed), b, 12, min_len=2))
  return {"inputs": x[:, :-1], "targets": x[:, 1:]}


def test_sharded_train_step_matches_single_device():
  assert len(jax.devices()) == 8, "conftest must provide 8 fake devices"
  single = _setup({"data": 1}, jax.devices()[:1])
  multi = _setup({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
  # Parameters really are partitioned on the 2x2x2 mesh.
  spec = multi.state["params"]["item_embed"].get_value().sharding.spec
  assert spec == jax.sharding.PartitionSpec("tensor", "fsdp"), spec
  chex.assert_trees_all_close(
      jax.device_get(single.state["params"]),
      jax.device_get(multi.state["params"]))
  key = jax.random.key(7)
  s_state, m_state = single.state, multi.state
  for step in range(2):
    batch = _batch(step)
    s_state, s_metrics = single.train_step(s_state, single.put_batch(batch),
                                           key)
    with sharding.use_mesh(multi.mesh):
      m_state, m_metrics = multi.train_step(m_state, multi.put_batch(batch),
                                            key)
    np.testing.assert_allclose(s_metrics["loss"], m_metrics["loss"], rtol=1e-5)
  chex.assert_trees_all_close(
      jax.device_get(s_state["params"]),
      jax.device_get(m_state["params"]),
      atol=2e-5)
  assert int(m_state["step"]) == 2


def test_train_step_compiles_once_and_learns():
  setup = _setup({"data": 1}, jax.devices()[:1])
  state = setup.state
  batch = setup.put_batch(_batch(0, b=16))
  key = jax.random.key(0)
  losses = []
  for _ in range(30):
    state, metrics = setup.train_step(state, batch, key)
    losses.append(float(metrics["loss"]))
  assert setup.train_step._cache_size() == 1  # pylint: disable=protected-access
  assert losses[-1] < 0.7 * losses[0], losses


def test_sharding_rules_drop_non_dividing_axes():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  spec = sharding.logical_to_spec(("vocab", "embed"), (1683, 64), mesh)
  assert spec == jax.sharding.PartitionSpec(None, "fsdp")
  spec = sharding.logical_to_spec(("batch", None), (16, 3), mesh)
  assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh({"data": 4, "fsdp": 4})
  with pytest.raises(ValueError, match="not in"):
    sharding.make_mesh({"model": 8})

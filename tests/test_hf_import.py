"""Hugging Face checkpoint import: parity, sharded loading, errors, vocab.

The parity tests load the tiny random Qwen2 and Llama checkpoints under
tests/data and compare with the logits transformers computed for them
(`experiments/reference/make_hf_decoder_reference.py`); when torch and
transformers are importable they are also compared live. Everything else
writes variants of those checkpoints (shards, bfloat16, broken files) into
tmp_path.
"""

import dataclasses
import functools
import hashlib
import json
import pathlib
import shutil

import chex
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from safetensors import numpy as safetensors_np

from taiji_jax import sharding
from taiji_jax.models import decoder
from taiji_jax.models import hf_import

DATA = pathlib.Path(__file__).parent / "data"
NAMES = ("qwen2", "llama")
TOL = 1e-4  # max |logit difference| against transformers, float32.


def _dir(name):
  return DATA / f"hf_tiny_{name}"


@functools.cache
def _reference(name):
  ref = np.load(DATA / f"hf_tiny_{name}_logits.npz")
  out = {k: ref[k] for k in ref.files if k != "versions"}
  out["versions"] = json.loads(str(ref["versions"]))
  return out


@functools.cache
def _loaded(name):
  return hf_import.load_hf_checkpoint(_dir(name))


@functools.cache
def _tensors(name):
  return safetensors_np.load_file(str(_dir(name) / "model.safetensors"))


@nnx.jit
def _forward(model, tokens, positions=None, mask=None):
  return model(tokens, positions, mask)


def _max_diff(got, want, mask=None):
  diff = np.abs(np.asarray(got, np.float64) - want)
  if mask is not None:
    diff = np.where(np.asarray(mask)[..., None] > 0, diff, 0.0)
  return float(diff.max())


def _write_checkpoint(directory, tensors, name="qwen2", config=None):
  """A checkpoint directory: `name`'s config.json (or `config`) + tensors."""
  directory.mkdir(parents=True)
  if config is None:
    shutil.copy(_dir(name) / "config.json", directory / "config.json")
  else:
    (directory / "config.json").write_text(json.dumps(config))
  safetensors_np.save_file(
      tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
  return directory


def _params(model):
  return jax.device_get(nnx.state(model, nnx.Param))


# ------------------------------------------------------------- parity ---


@pytest.mark.parametrize("name", NAMES)
def test_reference_files_match_the_checkpoints(name):
  ref = _reference(name)
  digest = hashlib.sha256(
      (_dir(name) / "model.safetensors").read_bytes()).hexdigest()
  assert ref["versions"]["model_safetensors_sha256"] == digest
  assert ref["logits"].shape == (3, 11, 101)
  assert ref["padded_logits"].shape == ref["logits"].shape
  assert ref["padded_mask"].sum(1).tolist() == [11, 8, 4]
  # Logits far from uniform, so a 1e-4 tolerance is a real constraint.
  assert ref["logits"].std() > 0.5
  size = sum(f.stat().st_size for f in _dir(name).iterdir())
  assert size < 200_000, size


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
  ref = _reference(name)
  _, model = _loaded(name)
  diff = _max_diff(_forward(model, ref["tokens"]), ref["logits"])
  assert diff <= TOL, f"{name}: max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_matches_transformers_and_unpadded_rows(name):
  ref = _reference(name)
  _, model = _loaded(name)
  mask = ref["padded_mask"]
  got = np.asarray(_forward(model, ref["padded_tokens"], None, mask))
  diff = _max_diff(got, ref["padded_logits"], mask)
  assert diff <= TOL, f"{name}: padded max |logit diff| {diff:.2e}"
  for row in range(mask.shape[0]):
    real = mask[row] > 0
    alone = _forward(model, ref["padded_tokens"][row][real][None])
    np.testing.assert_allclose(got[row][real], alone[0], atol=1e-5)


def test_the_reference_catches_rope_mistakes():
  """Getting theta or the llama3 scaling wrong fails the parity check."""
  for name, wrong in (("qwen2", dict(rope_theta=10_000.0)),
                      ("llama", dict(rope_scaling=None))):
    ref = _reference(name)
    _, model = hf_import.load_hf_checkpoint(_dir(name), **wrong)
    assert _max_diff(_forward(model, ref["tokens"]), ref["logits"]) > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_live_against_transformers(name):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(_dir(name)), attn_implementation="eager").eval()
  rng = np.random.default_rng(7)
  tokens = rng.integers(0, 101, (2, 13)).astype(np.int32)
  mask = (np.arange(13)[None] >= np.array([[0], [5]])).astype(np.int32)
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  with torch.no_grad():
    want = hf(
        input_ids=torch.from_numpy(tokens).long(),
        attention_mask=torch.from_numpy(mask).long(),
        position_ids=torch.from_numpy(positions).long()).logits.numpy()
  _, model = _loaded(name)
  got = _forward(model, tokens, None, mask)
  assert _max_diff(got, want, mask) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_config_from_transformers_5_and_4_formats(name):
  cfg, model = _loaded(name)
  assert model.cfg == cfg
  if name == "qwen2":
    assert (cfg.rope_theta, cfg.rope_scaling) == (1e6, None)
    assert cfg.tie_embeddings and cfg.attention_bias and model.lm_head is None
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 8)
  else:
    assert cfg.rope_theta == 1e4 and cfg.rope_scaling == decoder.RopeScaling(
        "llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=32)
    assert not cfg.tie_embeddings and not cfg.attention_bias
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 1, 16)
  # transformers 5 writes `rope_parameters`; 4 wrote top-level keys.
  v5 = json.loads((_dir(name) / "config.json").read_text())
  rope = dict(v5.pop("rope_parameters"))
  v4 = {**v5, "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}
  assert decoder.DecoderConfig.from_hf_config(v4) == cfg


@pytest.mark.parametrize(
    "cfg", [
        decoder.DecoderConfig.tiny(),
        decoder.DecoderConfig.tiny(tie_embeddings=False, attention_bias=False),
        decoder.DecoderConfig.qwen2_0_5b(),
        decoder.DecoderConfig.llama_1b(tie_embeddings=False),
    ],
    ids=["tiny", "tiny-untied", "qwen2-0.5b", "llama-1b"])
def test_layout_covers_every_parameter_with_its_shape(cfg):
  """Shapes only (eval_shape), so full-size layouts are checked too."""
  params = dict(
      nnx.to_flat_state(nnx.state(decoder.abstract_decoder(cfg), nnx.Param)))
  layout = hf_import.hf_layout(cfg)
  assert {spec.path for spec in layout.values()} == set(params)
  for name, spec in layout.items():
    hf = jax.ShapeDtypeStruct(spec.hf_shape, np.float32)
    converted = jax.eval_shape(spec.convert, hf)
    assert converted.shape == params[spec.path].get_value().shape, name


def test_weights_go_where_hf_uses_them():
  """Row r of HF q_proj is head r // H, dim r % H; o_proj columns alike."""
  cfg, model = _loaded("llama")
  t = _tensors("llama")
  h = cfg.head_dim
  attn = model.blocks[1].attn
  q = t["model.layers.1.self_attn.q_proj.weight"]  # (N * H, D)
  o = t["model.layers.1.self_attn.o_proj.weight"]  # (D, N * H)
  for r in (0, h - 1, h, 3 * h + 5):
    np.testing.assert_array_equal(attn.w_q[...][:, r // h, r % h], q[r])
    np.testing.assert_array_equal(attn.w_o[...][r // h, r % h], o[:, r])
  np.testing.assert_array_equal(model.lm_head[...], t["lm_head.weight"].T)
  np.testing.assert_array_equal(model.blocks[0].mlp.w_down[...],
                                t["model.layers.0.mlp.down_proj.weight"].T)


# ---------------------------------------------------------- sharding ---


@pytest.mark.parametrize("name", NAMES)
def test_sharded_load_gives_the_same_logits(name):
  assert len(jax.devices()) == 8, "conftest must provide 8 fake devices"
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, model = hf_import.load_hf_checkpoint(_dir(name), mesh=mesh)
  w_q = model.blocks[0].attn.w_q[...]  # (32, 4, H): embed x heads.
  assert w_q.sharding.spec == P("fsdp", "tensor", None), w_q.sharding.spec
  assert w_q.addressable_shards[0].data.shape == (16, 2, w_q.shape[2])
  assert model.embed[...].sharding.spec == P(None, "fsdp")  # 101 rows.
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert param.get_value().sharding.mesh == mesh, path
  chex.assert_trees_all_equal(_params(model), _params(_loaded(name)[1]))
  ref = _reference(name)
  with sharding.use_mesh(mesh):
    got = _forward(model, ref["tokens"])
  assert len(got.sharding.device_set) == 8
  assert _max_diff(got, ref["logits"]) <= TOL


# ----------------------------------------------------- file variants ---


def _write_two_shards(directory, name="llama"):
  """The checkpoint in two shards and an index, as transformers writes it."""
  tensors = _tensors(name)
  shards = {
      "model-00001-of-00002.safetensors": {},
      "model-00002-of-00002.safetensors": {}
  }
  weight_map = {}
  for key, value in tensors.items():
    second = key.startswith(("model.layers.1.", "model.norm", "lm_head"))
    file = sorted(shards)[int(second)]
    shards[file][key] = value
    weight_map[key] = file
  directory.mkdir(parents=True)
  shutil.copy(_dir(name) / "config.json", directory / "config.json")
  for file, part in shards.items():
    safetensors_np.save_file(part, str(directory / file))
  index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
  (directory / hf_import.INDEX_FILE).write_text(json.dumps(index))
  return directory, weight_map


def test_two_shard_checkpoint_with_index_loads_the_same(tmp_path):
  directory, _ = _write_two_shards(tmp_path / "m")
  cfg, model = hf_import.load_hf_checkpoint(directory)
  assert cfg == _loaded("llama")[0]
  chex.assert_trees_all_equal(_params(model), _params(_loaded("llama")[1]))


def test_index_problems_are_named(tmp_path):
  directory, weight_map = _write_two_shards(tmp_path / "m")
  index_path = directory / hf_import.INDEX_FILE
  second = directory / "model-00002-of-00002.safetensors"

  def write_index(weight_map):
    index_path.write_text(json.dumps({"weight_map": weight_map}))

  key = "model.layers.0.mlp.up_proj.weight"
  write_index({**weight_map, key: second.name})
  with pytest.raises(hf_import.CheckpointError) as e:
    hf_import.load_hf_checkpoint(directory)
  assert str(index_path) in str(e.value) and repr(key) in str(e.value)

  write_index({**weight_map, key: "model-00003-of-00003.safetensors"})
  with pytest.raises(
      hf_import.CheckpointError,
      match=r"index\.json names files .*model-00003-of-00003"):
    hf_import.load_hf_checkpoint(directory)

  index_path.write_text("{\"metadata\": {}}")
  with pytest.raises(hf_import.CheckpointError, match="weight_map"):
    hf_import.load_hf_checkpoint(directory)

  # A tensor stored twice.
  write_index(weight_map)
  first = directory / "model-00001-of-00002.safetensors"
  tensors = safetensors_np.load_file(str(first))
  copy = dict(tensors, **{"model.norm.weight": np.ones(32, np.float32)})
  safetensors_np.save_file(copy, str(first))
  with pytest.raises(
      hf_import.CheckpointError,
      match=r"'model\.norm\.weight' is stored in both .*00001-of-00002"):
    hf_import.load_hf_checkpoint(directory)
  safetensors_np.save_file(tensors, str(first))

  # A mis-shaped tensor in the second shard is named with that file.
  tensors = safetensors_np.load_file(str(second))
  bad = "model.layers.1.mlp.down_proj.weight"
  tensors[bad] = tensors[bad][:, :-1]
  safetensors_np.save_file(tensors, str(second))
  with pytest.raises(hf_import.CheckpointError) as e:
    hf_import.load_hf_checkpoint(directory)
  assert f"{bad!r} in {second} has shape (32, 47)" in str(e.value)
  assert "needs (32, 48)" in str(e.value)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  tensors = dict(_tensors("qwen2"))
  del tensors["model.layers.1.self_attn.k_proj.bias"]
  tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
  directory = _write_checkpoint(tmp_path / "m", tensors)
  with pytest.raises(hf_import.CheckpointError) as e:
    hf_import.load_hf_checkpoint(directory)
  message = str(e.value)
  assert str(directory / "model.safetensors") in message
  assert "missing tensors ['model.layers.1.self_attn.k_proj.bias']" in message
  assert "unexpected tensors ['model.layers.2.mlp.up_proj.weight']" in message


def test_wrong_shape_is_named(tmp_path):
  tensors = dict(_tensors("qwen2"))
  key = "model.layers.0.self_attn.q_proj.weight"
  tensors[key] = np.zeros((32, 31), np.float32)
  directory = _write_checkpoint(tmp_path / "m", tensors)
  with pytest.raises(hf_import.CheckpointError) as e:
    hf_import.load_hf_checkpoint(directory)
  message = str(e.value)
  assert str(directory / "model.safetensors") in message
  assert f"{key!r} has shape (32, 31), the config needs (32, 32)" in message


def test_missing_and_broken_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
    hf_import.load_hf_checkpoint(tmp_path / "absent")
  directory = _write_checkpoint(tmp_path / "m", _tensors("qwen2"))
  (directory / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"/m: missing config\.json"):
    hf_import.load_hf_checkpoint(directory)
  config = json.loads((_dir("qwen2") / "config.json").read_text())
  (directory / "config.json").write_text(
      json.dumps({
          **config, "model_type": "gemma"
      }))
  with pytest.raises(NotImplementedError, match=r"config\.json: .*'gemma'"):
    hf_import.load_hf_checkpoint(directory)
  del config["hidden_size"]
  (directory / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_import.CheckpointError, match="'hidden_size'"):
    hf_import.load_hf_checkpoint(directory)
  shutil.copy(_dir("qwen2") / "config.json", directory / "config.json")
  (directory / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(
      hf_import.CheckpointError,
      match=r"m/model\.safetensors: cannot read safetensors"):
    hf_import.load_hf_checkpoint(directory)
  (directory / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"missing model\.safetensors"):
    hf_import.load_hf_checkpoint(directory)


def test_tied_checkpoint_may_store_lm_head_and_rope_buffers(tmp_path):
  tensors = dict(_tensors("qwen2"))
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(
      4, np.float32)
  _, model = hf_import.load_hf_checkpoint(
      _write_checkpoint(tmp_path / "m", tensors))
  chex.assert_trees_all_equal(_params(model), _params(_loaded("qwen2")[1]))


def test_bfloat16_checkpoint_and_dtype_override(tmp_path):
  tensors = {k: v.astype(jnp.bfloat16) for k, v in _tensors("llama").items()}
  directory = _write_checkpoint(tmp_path / "m", tensors, name="llama")
  cfg, model = hf_import.load_hf_checkpoint(directory)
  assert cfg.param_dtype == "float32"
  np.testing.assert_array_equal(
      model.embed[...], tensors["model.embed_tokens.weight"].astype(np.float32))
  cfg, model = hf_import.load_hf_checkpoint(directory, dtype="bfloat16")
  assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")
  assert model.blocks[0].attn.w_q[...].dtype == jnp.bfloat16
  ref = _reference("llama")
  logits = _forward(model, ref["tokens"])
  assert logits.dtype == np.float32
  # bfloat16 weights and activations: close to the float32 reference only.
  assert _max_diff(logits, ref["logits"]) < 0.3


# -------------------------------------------------------- vocabulary ---

EXTRA = 400  # New rows: enough for per-dimension statistics.


@functools.cache
def _extended(name, method):
  cfg, model = _loaded(name)
  return hf_import.extend_vocab(
      model, cfg, cfg.vocab_size + EXTRA, method=method, key=jax.random.key(3))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method", ["mean", "normal"])
def test_extend_vocab_keeps_old_token_logits(name, method):
  cfg, model = _loaded(name)
  new_cfg, grown = _extended(name, method)
  v = cfg.vocab_size
  assert new_cfg == grown.cfg
  assert new_cfg.vocab_size == v + EXTRA
  assert dataclasses.replace(new_cfg, vocab_size=v) == cfg
  assert grown.embed[...].shape == (v + EXTRA, cfg.hidden_size)
  if not cfg.tie_embeddings:
    assert grown.lm_head[...].shape == (cfg.hidden_size, v + EXTRA)
  np.testing.assert_array_equal(grown.embed[...][:v], model.embed[...])
  tokens = _reference(name)["tokens"]
  old, new = _forward(model, tokens), _forward(grown, tokens)
  assert new.shape == old.shape[:2] + (v + EXTRA,)
  # Equal up to float32 summation order: XLA's CPU matmul may block a wider
  # output differently (a CI run saw 7e-7), so no bit-for-bit claim.
  np.testing.assert_allclose(new[..., :v], old, rtol=0, atol=1e-5)
  # In units of the old logits' spread at each position:
  z = (new[..., v:] - old.mean(-1, keepdims=True)) / old.std(-1, keepdims=True)
  if method == "mean":
    # New tokens start at the average logit of the old ones, apart from
    # the noise (std noise_scale = 0.01 of the old spread).
    assert np.abs(z.mean(-1)).max() < 3e-3
    assert 0.007 < z.std() < 0.013, z.std()
  else:
    assert z.std() > 0.1


@pytest.mark.parametrize("name", NAMES)
def test_extend_vocab_mean_rows_have_the_intended_statistics(name):
  cfg, model = _loaded(name)
  _, grown = _extended(name, "mean")
  v = cfg.vocab_size
  tables = [(model.embed[...], grown.embed[...])]
  if not cfg.tie_embeddings:
    tables.append((model.lm_head[...].T, grown.lm_head[...].T))
  for old, new in tables:
    old, rows = np.asarray(old), np.asarray(new)[v:]
    np.testing.assert_allclose(rows.mean(0), old.mean(0), atol=5e-3)
    ratio = rows.std(0) / (0.01 * old.std(0))  # noise_scale 0.01.
    assert 0.75 < ratio.min() and ratio.max() < 1.25, ratio
    assert len(np.unique(rows, axis=0)) == EXTRA  # Distinct new tokens.


def test_extend_vocab_normal_rows_and_keys():
  cfg, _ = _loaded("llama")
  _, grown = _extended("llama", "normal")
  v = cfg.vocab_size
  for rows in (grown.embed[...][v:], grown.lm_head[...][:, v:]):
    assert abs(float(rows.mean())) < 3e-3
    np.testing.assert_allclose(float(rows.std()), cfg.init_std, rtol=0.05)
  _, again = hf_import.extend_vocab(
      _loaded("llama")[1],
      cfg,
      v + EXTRA,
      method="normal",
      key=jax.random.key(3))
  np.testing.assert_array_equal(again.embed[...], grown.embed[...])
  _, other = hf_import.extend_vocab(
      _loaded("llama")[1],
      cfg,
      v + EXTRA,
      method="normal",
      key=jax.random.key(4))
  assert not np.allclose(other.embed[...][v:], grown.embed[...][v:])


def test_extend_vocab_errors_and_no_op():
  cfg, model = _loaded("qwen2")
  assert hf_import.extend_vocab(model, cfg, cfg.vocab_size) == (cfg, model)
  with pytest.raises(ValueError, match="only adds tokens"):
    hf_import.extend_vocab(model, cfg, cfg.vocab_size - 1)
  with pytest.raises(ValueError, match="'zeros'"):
    hf_import.extend_vocab(model, cfg, cfg.vocab_size + 1, method="zeros")
  with pytest.raises(ValueError, match="decoder's config"):
    hf_import.extend_vocab(model, _loaded("llama")[0], 200)


def test_extend_vocab_reshards_the_grown_table():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg, model = hf_import.load_hf_checkpoint(_dir("qwen2"), mesh=mesh)
  assert model.embed[...].sharding.spec == P(None, "fsdp")  # 101 rows.
  _, grown = hf_import.extend_vocab(model, cfg, 128)  # Now divides 2.
  assert grown.embed[...].sharding.spec == P("tensor", "fsdp")
  assert (grown.blocks[0].attn.w_q.get_value()
          is model.blocks[0].attn.w_q.get_value())  # Shared, not copied.
  tokens = _reference("qwen2")["tokens"]
  with sharding.use_mesh(mesh):
    old, new = _forward(model, tokens), _forward(grown, tokens)
  # Not bit-equal: the vocab axis is now split, so XLA partitions the head
  # matmul differently.
  np.testing.assert_allclose(new[..., :101], old, rtol=0, atol=1e-6)

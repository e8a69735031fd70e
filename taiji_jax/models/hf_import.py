"""Hugging Face Llama / Qwen2 checkpoints -> `decoder.Decoder`, and SID rows.

`load_hf_checkpoint(directory)` reads a directory as transformers'
`save_pretrained` writes it, `config.json` plus `model.safetensors` or
shards listed in `model.safetensors.index.json`, into a `Decoder` whose
logits match `LlamaForCausalLM` / `Qwen2ForCausalLM` (checked to 1e-4 on
tiny random models by tests/test_hf_import.py, against logits that
`experiments/reference/make_hf_decoder_reference.py` recorded).

HF Linear weights are (out, in) with the heads flattened into `out`; ours
are (in, out) with the heads split, e.g. q_proj (N*H, D) -> w_q (D, N, H)
and o_proj (D, N*H) -> w_o (N, H, D). Every tensor name and shape is
checked from the file headers before any data is read, and one error lists
every missing, unexpected or mis-shaped tensor with its file. Then tensors
are read one at a time; with a mesh each goes straight into its final
sharding (a device receives only its slice), so the full model is never
gathered on one device.

`extend_vocab` appends embedding rows (and untied LM-head columns) for new
tokens, e.g. the semantic-ID tokens a recommender adds to a pretrained
vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp

from taiji_jax import sharding
from taiji_jax.models import checkpoint_io
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.models import decoder_layout
from taiji_jax.models import gguf_import

CheckpointError = checkpoint_io.CheckpointError
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MODEL_NAME = "Llama/Qwen2 decoder"


# The decoder's HF tensor layout, shared with the GGUF reader.
hf_layout = decoder_layout.hf_layout
fill_decoder = decoder_layout.fill_decoder


def _ignored(cfg: decoder_lib.DecoderConfig) -> Callable[[str], bool]:
  """Tensors that may be present without being loaded.

  A tied checkpoint may still store `lm_head.weight` (transformers then
  ignores it too); old checkpoints store the RoPE `inv_freq` buffers,
  which the decoder recomputes from the config.
  """

  def ignored(name: str) -> bool:
    if name.endswith(".rotary_emb.inv_freq"):
      return True
    return cfg.tie_embeddings and name == "lm_head.weight"

  return ignored


def read_config(directory: os.PathLike | str,
                **overrides) -> decoder_lib.DecoderConfig:
  """The `DecoderConfig` of a checkpoint directory's `config.json`.

  Raises:
    FileNotFoundError: no config.json (the directory is named).
    CheckpointError: config.json is not JSON or lacks a required field.
    NotImplementedError: an architecture or option the decoder does not
      implement (the file is named).
  """
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path.parent}: missing {CONFIG_FILE}")
  try:
    hf = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON: {e}") from e
  try:
    return decoder_lib.DecoderConfig.from_hf_config(hf, **overrides)
  except KeyError as e:
    raise CheckpointError(f"{path}: missing field {e}") from e
  except (NotImplementedError, ValueError) as e:
    raise type(e)(f"{path}: {e}") from e


def _weight_files(
    directory: pathlib.Path
) -> tuple[pathlib.Path, list[pathlib.Path], dict[str, str] | None]:
  """(what to name in errors, the safetensors files, the index's map).

  A single `model.safetensors` wins over an index, as in transformers.
  """
  single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
  if single.is_file():
    return single, [single], None
  if not index.is_file():
    raise FileNotFoundError(
        f"{directory}: missing {WEIGHTS_FILE} (or {INDEX_FILE} and its "
        "shards)")
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
    names = sorted(set(weight_map.values()))
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f"{index}: not a safetensors index (expected a "
                          f"'weight_map' object): {e!r}") from e
  absent = [name for name in names if not (directory / name).is_file()]
  if absent:
    raise CheckpointError(f"{index} names files that are not in "
                          f"{directory}: {absent}")
  return index, [directory / name for name in names], weight_map


def checkpoint_config(path: os.PathLike | str,
                      **overrides) -> decoder_lib.DecoderConfig:
  """The `DecoderConfig` `load_hf_checkpoint(path, **overrides)` gives,
  without reading any weights."""
  gguf = gguf_import.gguf_path(path)
  if gguf is not None:
    return gguf_import.file_config(gguf_import.GGUFFile(gguf), **overrides)
  return read_config(path, **overrides)


def load_hf_checkpoint(
    path: os.PathLike | str,
    *,
    dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules | None = None,
    **overrides) -> tuple[decoder_lib.DecoderConfig, decoder_lib.Decoder]:
  """Loads a Llama / Qwen2 checkpoint into a `Decoder`.

  Args:
    path: a directory holding `config.json` and `model.safetensors`, or
      shards named by `model.safetensors.index.json`; or a `.gguf` file (or
      a `gguf_import.PRETRAINED` name), read by `gguf_import.load_gguf`:
      dequantized, Llama's Q/K rows un-permuted, the config from its
      metadata.
    dtype: parameter storage and activation dtype ("bfloat16", jnp.bfloat16,
      ...); tensors are cast from the checkpoint's dtype. None keeps the
      config defaults, float32 for both, which reproduces transformers'
      float32 logits.
    mesh: place each parameter with the sharding its logical axes get under
      `rules`, tensor by tensor, each device receiving only its slice (with
      several hosts, every process reads the files and fills its own
      devices). Run the model under `sharding.use_mesh(mesh, rules)`.
      None: the default device.
    rules: logical-axis rules; None means `sharding.DEFAULT_RULES`.
    **overrides: `DecoderConfig` fields to set on top of config.json (e.g.
      remat=True, max_seq_len=4096).

  Returns:
    (config, decoder); `decoder(tokens_bt)` gives float32 logits (B, T, V).

  Raises:
    FileNotFoundError: no such directory, or config.json or the weights are
      missing (named).
    CheckpointError: unreadable files, an index naming absent files or
      tensors, or tensors missing, unexpected or mis-shaped for the config;
      the message names the file and every offending tensor.
    NotImplementedError: an architecture or option the decoder lacks.
  """
  gguf = gguf_import.gguf_path(path)
  if gguf is not None:
    return gguf_import.load_gguf(
        gguf, dtype=dtype, mesh=mesh, rules=rules, **overrides)
  directory = pathlib.Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: no such checkpoint directory "
                            "(or .gguf file)")
  if dtype is not None:
    name = jnp.dtype(dtype).name
    overrides = {"dtype": name, "param_dtype": name, **overrides}
  cfg = read_config(directory, **overrides)
  source, paths, weight_map = _weight_files(directory)
  layout = hf_layout(cfg)
  with contextlib.ExitStack() as stack:
    opened = [stack.enter_context(checkpoint_io.SafetensorsFile(p)) for p in paths]
    shapes, file_of = {}, {}
    for f in opened:
      for key, shape in f.shapes.items():
        if key in file_of:
          raise CheckpointError(f"{source}: tensor {key!r} is stored in both "
                                f"{file_of[key].path} and {f.path}")
        shapes[key], file_of[key] = shape, f
    if weight_map is not None:
      misplaced = sorted(
          key for key, name in weight_map.items()
          if key not in file_of or file_of[key].path.name != name)
      if misplaced:
        raise CheckpointError(f"{source} lists tensors that are not in the "
                              f"files it names: {misplaced}")
    paths_of = {k: f.path for k, f in file_of.items()}
    checkpoint_io.check_tensors(
        source,
        shapes,
        layout,
        model_name=_MODEL_NAME,
        ignored=_ignored(cfg),
        files=paths_of if len(opened) > 1 else None)
    model = fill_decoder(cfg, layout, file_of, mesh, rules)
  logging.info("loaded %s (%s, %d layers, vocab %d) from %s", _MODEL_NAME,
               cfg.param_dtype, cfg.num_layers, cfg.vocab_size, directory)
  return cfg, model


# ------------------------------------------------------------ vocabulary ---


def extend_vocab(
    decoder: decoder_lib.Decoder,
    config: decoder_lib.DecoderConfig,
    new_vocab_size: int,
    *,
    method: str = "mean",
    key: jax.Array | None = None,
    noise_scale: float = 0.01,
    rules: sharding.Rules | None = None
) -> tuple[decoder_lib.DecoderConfig, decoder_lib.Decoder]:
  """Appends rows for new tokens (e.g. SID tokens) to the vocabulary.

  Rows `[config.vocab_size, new_vocab_size)` are added to the embedding and,
  when untied, the matching columns to the LM head; every other parameter
  is kept (the returned decoder shares those arrays). Logits of the old
  tokens are unchanged, so the model keeps its language ability; only the
  softmax normaliser now also covers the new tokens.

  Methods:
    "mean": each new vector is the mean of the existing ones plus Gaussian
      noise of `noise_scale` times their per-dimension std. A new token's
      logit then starts at the average of the old tokens' logits (h . mean
      = mean of h . e_v), so it neither dominates the softmax nor starts
      unreachably low, and the small noise makes the new tokens distinct.
      This is the usual choice for adding tokens to a pretrained model
      (Hewitt, 2021; transformers' `resize_token_embeddings(mean_resizing=
      True)` does the same with the full covariance scaled by 1e-9).
    "normal": N(0, config.init_std^2), like a freshly initialised model;
      such rows are far from the pretrained embeddings' scale.

  Args:
    decoder: the model; its embedding must have `config.vocab_size` rows.
    config: its config (`decoder.cfg`).
    new_vocab_size: rows after the call; equal to the old size is a no-op.
    method: "mean" or "normal".
    key: PRNG key for the noise; None means `jax.random.key(0)`.
    noise_scale: "mean" only: noise std relative to the embeddings' std.
    rules: logical-axis rules used to re-shard the grown parameters when
      they are sharded (their mesh is kept; the new vocabulary size may
      divide a mesh axis the old one did not).

  Returns:
    (the config with the new vocab_size, the grown decoder).
  """
  old = config.vocab_size
  if decoder.cfg != config:
    raise ValueError("config is not the decoder's config (decoder.cfg).")
  if new_vocab_size < old:
    raise ValueError(f"new_vocab_size {new_vocab_size} is smaller than the "
                     f"vocabulary ({old}); extend_vocab only adds tokens.")
  if method not in ("mean", "normal"):
    raise ValueError(f"method must be 'mean' or 'normal', got {method!r}.")
  if new_vocab_size == old:
    return config, decoder
  key = jax.random.key(0) if key is None else key
  key_embed, key_head = jax.random.split(key)
  extra = new_vocab_size - old

  def grow(w_vd, key):
    return jnp.concatenate(
        [w_vd, _new_rows(w_vd, extra, method, key, config, noise_scale)], 0)

  grown = {("embed",): grow(decoder.embed[...], key_embed)}
  if decoder.lm_head is not None:
    grown[("lm_head",)] = grow(decoder.lm_head[...].T, key_head).T
  new_config = dataclasses.replace(config, vocab_size=new_vocab_size)
  model = decoder_lib.abstract_decoder(new_config)
  for path, variable in nnx.to_flat_state(nnx.state(decoder)):
    value = variable.get_value()
    if path in grown:
      value = _place_like(grown[path], value,
                          variable.get_metadata()["logical_axes"], rules)
    checkpoint_io.param_at(model, path).set_value(value)
  return new_config, model


def _new_rows(w_vd: jax.Array, extra: int, method: str, key: jax.Array,
              config: decoder_lib.DecoderConfig,
              noise_scale: float) -> jax.Array:
  """(extra, D) new vectors for a (V, D) table; see `extend_vocab`."""
  noise_nd = jax.random.normal(key, (extra, w_vd.shape[1]), jnp.float32)
  if method == "normal":
    rows_nd = config.init_std * noise_nd
  else:
    w32 = w_vd.astype(jnp.float32)
    rows_nd = w32.mean(0) + noise_scale * w32.std(0) * noise_nd
  return rows_nd.astype(w_vd.dtype)


def _place_like(value: jax.Array, old: jax.Array, logical_axes,
                rules: sharding.Rules | None) -> jax.Array:
  """Puts a grown parameter on the mesh its predecessor was sharded over."""
  old_sharding = getattr(old, "sharding", None)
  if not isinstance(old_sharding, jax.sharding.NamedSharding):
    return value
  mesh = old_sharding.mesh
  spec = sharding.logical_to_spec(logical_axes, value.shape, mesh, rules)
  return jax.device_put(value, jax.sharding.NamedSharding(mesh, spec))

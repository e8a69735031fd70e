"""Shared plumbing of the benchmark scripts.

Each of `experiments/bench/*.py` (and `experiments/aot_memory.py`) measures
one thing and writes one JSON result and one markdown row for the README's
tables. What they share lives here:

- `parse_mesh`: the `--mesh` flag ("data:2,fsdp:4") as mesh axis sizes.
- `environment_fields`, `memory_fields`: the device, host and software a
  result was measured on, and its peak host and device memory.
- `write_result`: `<workdir>/<name>.json`, and the JSON and the row printed.
- `level_offsets`, `random_inputs`: the SID token layout of `text.vocab`
  and random left-padded prompts with seen items (decoding benchmarks).
- `define_sft_flags`, `sft_from_flags`: the flags of the SFT benchmarks
  (`--config`, `--preset`, `--overrides`, ...) and the decoder and mesh they
  give. By default that is the model of the SFT config (e.g.
  `configs/ml100k_sft.py`) on its vocabulary of `text.vocab` layout.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import resource
from typing import Any, Mapping, NamedTuple, Sequence

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from taiji_jax import sharding
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.sidlm import task
from taiji_jax.text import vocab as vocab_lib

# <pad> <bos> <eos> <unk> <think> </think> <answer> </answer>.
NUM_SPECIALS = len(vocab_lib.SPECIAL_TOKENS)
# ml-100k's SIDs: three RQ-KMeans levels of 64 codes and a fourth that
# numbers the items sharing the first three (collision handling).
DEFAULT_CODEBOOKS = (64, 64, 64, 4)


def parse_mesh(text: str) -> dict[str, int]:
  """Parses mesh axis sizes.

  Args:
    text: comma-separated `axis:size` entries, e.g. "data:1,fsdp:8"; a size
      of -1 takes the remaining devices (`sharding.make_mesh`).

  Returns:
    {"data": 1, "fsdp": 8}, in the order given.

  Raises:
    ValueError: an entry is not `axis:size` with an integer size, or an
      axis is given twice.
  """
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    axis, sep, size = (s.strip() for s in part.partition(":"))
    if not sep or not axis or not size.removeprefix("-").isdigit():
      raise ValueError(f"mesh entry {part!r} of {text!r} is not "
                       "'axis:size' with an integer size.")
    if axis in out:
      raise ValueError(f"mesh axis {axis!r} is given twice in {text!r}.")
    out[axis] = int(size)
  return out


def environment_fields(num_devices: int | None = None) -> dict[str, Any]:
  """What a result was measured on.

  Args:
    num_devices: devices used (default: all of this process's backend).

  Returns:
    `device` ("<device kind> x<num_devices>"), `host` (processor, cores),
    `platform` (cpu, gpu, tpu) and `jax` (version).
  """
  device = jax.devices()[0]
  num_devices = num_devices or jax.device_count()
  return {
      "device": f"{device.device_kind} x{num_devices}",
      "host": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores",
      "platform": device.platform,
      "jax": jax.__version__,
  }


def memory_fields() -> dict[str, float | None]:
  """Peak memory so far, in MiB.

  Returns:
    `peak_rss_mib`: the process's maximum resident set size (host RAM; on
    CPU that includes the arrays). `device_peak_mib`: the first device's
    peak bytes in use, or None where the backend does not report it (CPU).
  """
  # ru_maxrss is KiB on Linux, bytes on macOS.
  scale = 2**20 if platform.system() == "Darwin" else 2**10
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
  peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  return {
      "peak_rss_mib": round(rss, 1),
      "device_peak_mib": None if peak is None else round(peak / 2**20, 1),
  }


def write_result(workdir: str | os.PathLike, name: str,
                 result: Mapping[str, Any], markdown_row: str) -> pathlib.Path:
  """Writes `<workdir>/<name>.json`; prints the JSON and the markdown row.

  Args:
    workdir: output directory (created if missing).
    name: file name without `.json`.
    result: the JSON-able measurements.
    markdown_row: the result's row of the README table.

  Returns:
    The path written.
  """
  path = pathlib.Path(workdir) / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps(result, indent=2)
  path.write_text(text + "\n")
  print(text)
  print(markdown_row)
  return path


def sid_vocab_size(config: ml_collections.ConfigDict,
                   codebooks: Sequence[int]) -> int:
  """Ids of the `text.vocab` layout: specials, SID codes, text pieces."""
  return NUM_SPECIALS + sum(int(k) for k in codebooks) + config.vocab.size


def sft_decoder(
    config: ml_collections.ConfigDict,
    vocab_size: int | None,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None) -> decoder_lib.DecoderConfig:
  """The SFT config's decoder, or a preset's, with `overrides` on top.

  Args:
    config: an SFT config (`configs/ml100k_sft.py`).
    vocab_size: vocabulary size; with `preset`, None keeps the preset's.
    preset: a `DecoderConfig` preset (e.g. "llama_1b") replacing the
      config's model (its preset and overrides); None: the config's model,
      `task.model_config(config, vocab_size)`.
    overrides: `DecoderConfig` fields set last.

  Returns:
    The decoder config.
  """
  overrides = dict(overrides or {})
  if preset:
    if vocab_size is not None:
      overrides["vocab_size"] = vocab_size
    return getattr(decoder_lib.DecoderConfig, preset)(**overrides)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.overrides = {**config.model.overrides.to_dict(), **overrides}
  return task.model_config(config, vocab_size)


class SftBench(NamedTuple):
  """What `sft_from_flags` gives."""
  config: ml_collections.ConfigDict  # the SFT config
  codebooks: tuple[int, ...]  # SID codebook sizes, one per level
  preset: str  # the decoder's preset
  model_cfg: decoder_lib.DecoderConfig
  mesh: jax.sharding.Mesh


def define_sft_flags(default_config: str | os.PathLike) -> None:
  """Defines the flags `sft_from_flags` reads.

  `--config` (an SFT config file), `--workdir`, `--preset`, `--overrides`,
  `--vocab_size`, `--codebooks`, `--dtype`, `--batch_size` and `--mesh`.
  Call it in the script's `__main__` block, so tests can import the script.

  Args:
    default_config: the `--config` default, e.g. `configs/ml100k_sft.py`.
  """
  config_flags.DEFINE_config_file(
      "config", str(default_config), "SFT config.", lock_config=True)
  flags.DEFINE_string("workdir", "runs/bench", "Output directory.")
  flags.DEFINE_string(
      "preset", None, "DecoderConfig preset replacing the config's model "
      "(default: the config's model.preset and model.overrides).")
  flags.DEFINE_string("overrides", None,
                      "JSON dict of DecoderConfig fields set last.")
  flags.DEFINE_integer(
      "vocab_size", None, "Vocabulary size (default: 8 specials + "
      "sum(--codebooks) + config.vocab.size; with --preset, the preset's).")
  flags.DEFINE_list("codebooks", [str(k) for k in DEFAULT_CODEBOOKS],
                    "Codebook size per SID level.")
  flags.DEFINE_string("dtype", None, "Compute dtype (default: the model's).")
  flags.DEFINE_integer("batch_size", None,
                       "Global batch size (default: the config's).")
  flags.DEFINE_string(
      "mesh", None, "Mesh axis sizes, 'axis:size,...' (default: config.mesh).")


def sft_from_flags(**overrides: Any) -> SftBench:
  """The config, codebooks, decoder and mesh of `define_sft_flags`' flags.

  Args:
    **overrides: `DecoderConfig` fields set after `--overrides`, before
      `--dtype` (e.g. `remat=True` from a script's own flag).

  Returns:
    The `SftBench`.
  """
  f = flags.FLAGS
  config = f.config
  codebooks = tuple(int(k) for k in f.codebooks)
  overrides = {**json.loads(f.overrides or "{}"), **overrides}
  if f.dtype:
    overrides["dtype"] = f.dtype
  vocab_size = f.vocab_size
  if vocab_size is None and not f.preset:
    vocab_size = sid_vocab_size(config, codebooks)
  model_cfg = sft_decoder(config, vocab_size, f.preset, overrides)
  axes = parse_mesh(f.mesh) if f.mesh else config.mesh.to_dict()
  return SftBench(config, codebooks, f.preset or config.model.preset, model_cfg,
                  sharding.make_mesh(axes))


def level_offsets(codebooks: Sequence[int]) -> tuple[int, ...]:
  """Token id of code 0 of each level in the `text.vocab` layout."""
  return tuple(
      int(o) for o in NUM_SPECIALS +
      np.concatenate([[0], np.cumsum(codebooks)[:-1]]))


def random_inputs(num_users: int,
                  prompt_len: int,
                  vocab_size: int,
                  num_items: int,
                  history: int,
                  pad_id: int = 0,
                  seed: int = 0) -> dict[str, np.ndarray]:
  """Left-padded random prompts (B, T) and distinct seen items (B, H)."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(1, vocab_size, (num_users, prompt_len), np.int32)
  pad = rng.integers(0, max(prompt_len // 4, 1), num_users)
  prompts[np.arange(prompt_len)[None, :] < pad[:, None]] = pad_id
  seen = np.stack([
      rng.choice(num_items, min(history, num_items), replace=False) + 1
      for _ in range(num_users)
  ]).astype(np.int32)
  return {"prompts": prompts, "seen": seen}

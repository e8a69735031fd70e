"""Reading checkpoints tensor by tensor, and checking them against a layout.

Shared by every loader of pretrained weights (the BERT text encoder, the
Hugging Face and GGUF decoder imports): `TensorSpec` says where a stored
tensor goes and how it is laid out, `SafetensorsFile` reads one tensor at a
time, `check_tensors` lists every missing, unexpected or mis-shaped tensor
in one error, `param_at` finds the variable a spec names.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Mapping

from flax import nnx
import ml_dtypes  # pylint: disable=unused-import  (bfloat16 for NumPy)
import numpy as np
import safetensors


class CheckpointError(ValueError):
  """A checkpoint does not match the model it is loaded into."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """Where one HF tensor goes: module path, HF shape, HF -> ours layout."""
  path: tuple[str | int, ...]
  hf_shape: tuple[int, ...]
  convert: Callable[[np.ndarray], np.ndarray]


class SafetensorsFile:
  """One safetensors file, read a tensor at a time into host NumPy arrays.

  Opening reads only the header (names and shapes), so a loader can check a
  whole checkpoint before reading any data and then hold one tensor in host
  memory at a time. bfloat16 tensors come back as `ml_dtypes.bfloat16`
  arrays (imported with JAX, which is what lets safetensors' NumPy reader
  understand the type). Use as a context manager; errors name the file.

  Attributes:
    path: the file.
    shapes: tensor name -> shape, in the file's order.
  """

  def __init__(self, path: os.PathLike | str):
    self.path = pathlib.Path(path)
    try:
      self._file = safetensors.safe_open(str(self.path), framework="numpy")
      self.shapes = {
          key: tuple(self._file.get_slice(key).get_shape())
          for key in self._file.keys()
      }
    except (OSError, safetensors.SafetensorError) as e:
      raise CheckpointError(f"{self.path}: cannot read safetensors: {e}") from e

  def read(self, key: str) -> np.ndarray:
    try:
      return self._file.get_tensor(key)
    except (OSError, TypeError, safetensors.SafetensorError) as e:
      raise CheckpointError(f"{self.path}: cannot read tensor {key!r}: "
                            f"{e}") from e

  def __enter__(self) -> SafetensorsFile:
    return self

  def __exit__(self, *exc_info) -> None:
    self._file.__exit__(*exc_info)


def check_tensors(source: os.PathLike | str,
                  shapes: Mapping[str, tuple[int, ...]],
                  layout: Mapping[str, TensorSpec],
                  *,
                  model_name: str,
                  originals: Mapping[str, str] | None = None,
                  ignored: Callable[[str], bool] = lambda name: False,
                  files: Mapping[str, os.PathLike | str] | None = None) -> None:
  """Checks a checkpoint's tensor names and shapes against a layout.

  All problems are collected first, so one error lists every missing,
  unexpected and mis-shaped tensor rather than the first of them.

  Args:
    source: the checkpoint, as the message should name it (the file, or the
      index of a checkpoint split over several files).
    shapes: tensor name (canonical, as in `layout`) -> shape in the file.
    layout: tensor name -> where the model needs it.
    model_name: the model, for the message ("BERT", ...).
    originals: name -> the key as stored, for the message (default: the
      name itself).
    ignored: names that may be present without being loaded.
    files: name -> the file holding it; given for checkpoints of several
      files, so a mis-shaped tensor is named with its file.

  Raises:
    CheckpointError: naming `source` and every offending tensor.
  """
  originals = originals or {}

  def shown(name):
    return originals.get(name, name)

  problems = []
  missing = sorted(shown(k) for k in set(layout) - set(shapes))
  if missing:
    problems.append(f"missing tensors {missing}")
  unexpected = sorted(
      shown(k) for k in set(shapes) - set(layout) if not ignored(k))
  if unexpected:
    problems.append(f"unexpected tensors {unexpected}")
  for name, spec in layout.items():
    if name in shapes and tuple(shapes[name]) != spec.hf_shape:
      where = f" in {files[name]}" if files else ""
      problems.append(f"tensor {shown(name)!r}{where} has shape "
                      f"{tuple(shapes[name])}, the config needs "
                      f"{spec.hf_shape}")
  if problems:
    raise CheckpointError(f"{source} does not match the {model_name} "
                          "model:\n  " + "\n  ".join(problems))


def param_at(module: nnx.Module, path: tuple[str | int, ...]) -> nnx.Variable:
  """The variable at a `TensorSpec.path` (attribute names, list indices)."""
  node = module
  for part in path:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node

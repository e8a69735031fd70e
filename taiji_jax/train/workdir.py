"""The workdir is the experiment: its config.json guards resumes."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import ml_collections

from taiji_jax.train import metric_writer


def write_or_check_config(workdir: os.PathLike | str,
                          config: ml_collections.ConfigDict) -> None:
  """Writes `<workdir>/config.json`, or checks a resumed run matches it.

  Raises:
    ValueError: the workdir holds a different config; the message lists the
      differing keys (dotted paths), so a resume never silently mixes runs.
  """
  path = pathlib.Path(workdir) / "config.json"
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  if path.exists():
    saved, now = _flat(json.loads(path.read_text())), _flat(current)
    diff = sorted(
        k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
      raise ValueError(
          f"{path} holds a different config (differs in {diff}); use a new "
          "workdir or delete this one to start over.")
  elif jax.process_index() == 0:
    metric_writer.write_json_atomic(path, current)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def read_config(workdir: os.PathLike | str) -> dict[str, Any]:
  """The config a run saved in `<workdir>/config.json`, as a dict.

  Raises:
    FileNotFoundError: the workdir holds no config.json (names it).
  """
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: {workdir} is not the "
                            "workdir of a run.")
  return json.loads(path.read_text())

"""JSON-lines metrics in the workdir, written by process 0 only."""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any, Mapping

import jax
import numpy as np


class MetricWriter:
  """Appends one JSON object per call to `<workdir>/metrics.jsonl`.

  On resume, pass the restored step as `resume_step`: lines a killed run
  wrote after its last checkpoint (step > resume_step) are dropped, so the
  file reads as if the run had never been interrupted.
  """

  def __init__(self,
               workdir: os.PathLike | str,
               resume_step: int = 0,
               filename: str = "metrics.jsonl"):
    self.path = pathlib.Path(workdir) / filename
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      kept = []
      for line in self.path.read_text().splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut short by a kill
        if record.get("step", 0) <= resume_step:
          kept.append(line)
      tmp = self.path.with_suffix(".tmp")
      tmp.write_text("".join(f"{line}\n" for line in kept))
      os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "time": round(time.time(), 3)}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def _scalar(value: Any) -> Any:
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def write_json_atomic(path: os.PathLike | str, payload: Any) -> None:
  """Writes JSON via a temporary file and rename (never half-written)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


RESULTS_FILE = "results.json"
TIMING_FILE = "timing.json"


def _is_clock(key: str) -> bool:
  return key == "seconds" or key.endswith(("/seconds", "_seconds"))


def split_clock(tree: Any) -> tuple[Any, Any]:
  """(tree without wall-clock entries, those entries at the same paths).

  A wall-clock entry is a key `seconds`, `*/seconds` or `*_seconds` at any
  depth; an emptied branch is dropped from the second tree.
  """
  if not isinstance(tree, dict):
    return tree, None
  kept, clock = {}, {}
  for k, v in tree.items():
    if _is_clock(str(k)):
      clock[k] = v
      continue
    kept[k], sub = split_clock(v)
    if sub:
      clock[k] = sub
  return kept, clock


def write_results(workdir: os.PathLike | str, results: dict[str, Any]) -> None:
  """A stage's results.json and, apart, its timing.json (process 0).

  results.json holds what the run computed and nothing of the machine or
  the moment: the same config and inputs give a byte-identical file on any
  day, in any clone. The wall-clock entries (`split_clock`) go to
  timing.json.
  """
  if jax.process_index() != 0:
    return
  kept, clock = split_clock(results)
  workdir = pathlib.Path(workdir)
  write_json_atomic(workdir / RESULTS_FILE, kept)
  write_json_atomic(workdir / TIMING_FILE, clock or {})


def _merge(a: Any, b: Any) -> Any:
  if not isinstance(a, dict) or not isinstance(b, dict):
    return b if b is not None else a
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge(a.get(k), v)
  return out


def read_results(workdir: os.PathLike | str,
                 timing: bool = False) -> dict[str, Any]:
  """A run's results.json, with its timing.json merged back if asked."""
  workdir = pathlib.Path(workdir)
  results = json.loads((workdir / RESULTS_FILE).read_text())
  if timing and (workdir / TIMING_FILE).is_file():
    results = _merge(results, json.loads((workdir / TIMING_FILE).read_text()))
  return results

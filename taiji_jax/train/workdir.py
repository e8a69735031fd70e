"""The workdir is the experiment: its config.json guards resumes."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import ml_collections

from taiji_jax import config_lib
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
    saved = config_lib.flatten(json.loads(path.read_text()))
    now = config_lib.flatten(current)
    diff = sorted(
        k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
      raise ValueError(
          f"{path} holds a different config (differs in {diff}); use a new "
          "workdir or delete this one to start over.")
  elif jax.process_index() == 0:
    metric_writer.write_json_atomic(path, current)


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


def run_seeds(config: ml_collections.ConfigDict, workdir: os.PathLike | str,
              run_seed) -> dict[int, Any]:
  """{seed: run_seed(config, <workdir>/seed_<s>, s)} over `config.seeds`.

  The workdir of a multi-seed experiment holds its config.json (checked on
  re-runs) and one sub-folder per seed.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  write_or_check_config(workdir, config)
  return {
      int(s): run_seed(config, workdir / f"seed_{s}", int(s))
      for s in config.seeds
  }


def seed_stats(values) -> dict[str, Any]:
  """{"mean", "std" (sample, ddof 1; 0 for one value), "values"}; mean and
  std are None for no values."""
  values = [float(v) for v in values]
  if not values:
    return {"mean": None, "std": None, "values": []}
  mean = sum(values) / len(values)
  var = (sum((v - mean)**2 for v in values) / (len(values) - 1)
         if len(values) > 1 else 0.0)
  return {"mean": mean, "std": var**0.5, "values": values}


def seed_table(rows, metrics) -> str:
  """Markdown table of `seed_stats` entries, "mean ± std" per cell.

  Args:
    rows: (title, {metric: seed_stats}) pairs, one table row each.
    metrics: (metric key, column header) pairs; a missing metric is "-".
  """
  header = "| model | " + " | ".join(h for _, h in metrics) + " |"
  lines = [header, "|" + " --- |" * (len(metrics) + 1)]
  for title, entry in rows:
    cells = []
    for key, _ in metrics:
      m = entry.get(key)
      cells.append("-" if m is None else f"{m['mean']:.4f} ± {m['std']:.4f}")
    lines.append(f"| {title} | " + " | ".join(cells) + " |")
  return "\n".join(lines)

"""The workdir is the experiment: its config.json guards resumes, one run at
a time holds it (`exclusive`), and `inputs.json` records the upstream runs
it was made from (`check_inputs`), so a changed upstream is never silently
reused."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import pathlib
import socket
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from taiji_jax import config_lib
from taiji_jax.train import metric_writer


# Config fields that say how to run, not what the run is: a resume may
# change them.
RUN_POLICY = ("progress_bar", "on_stale_inputs")


def write_or_check_config(workdir: os.PathLike | str,
                          config: ml_collections.ConfigDict) -> None:
  """Writes `<workdir>/config.json`, or checks a resumed run matches it.

  Raises:
    ValueError: the workdir holds a different config; the message lists the
      differing keys (dotted paths), so a resume never silently mixes runs.
      Fields in `RUN_POLICY` may differ.
  """
  path = pathlib.Path(workdir) / "config.json"
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  if path.exists():
    saved = config_lib.flatten(json.loads(path.read_text()))
    now = config_lib.flatten(current)
    diff = sorted(
        k for k in set(saved) | set(now)
        if saved.get(k) != now.get(k) and k.split(".")[-1] not in RUN_POLICY)
    if diff:
      raise ValueError(
          f"{path} holds a different config (differs in {diff}); use a new "
          "workdir or delete this one to start over.")
  elif jax.process_index() == 0:
    metric_writer.write_json_atomic(path, current)


LOCK_FILE = ".lock"
# Workdirs this process holds: path -> (open lock file, nesting depth).
_HELD: dict[pathlib.Path, list] = {}


class WorkdirBusy(RuntimeError):
  """Another process is running in the workdir."""


@contextlib.contextmanager
def exclusive(workdir: os.PathLike | str):
  """Holds `<workdir>/.lock` (an flock) for the duration of the block.

  A second process asking for the same workdir is refused at once, with
  the holder's pid, host and start time; the lock dies with its process
  (a `kill -9` frees it), so a crashed run never blocks its resume. Nested
  holds by the same process (a stage re-entered, a pipeline calling a
  stage that shares its workdir) are allowed. On multi-host runs only
  process 0 takes it (the workdir is shared by the hosts of one run).

  Raises:
    WorkdirBusy: naming the workdir and the holder.
  """
  path = pathlib.Path(workdir).absolute()
  if jax.process_index() != 0:
    yield
    return
  if path in _HELD:
    _HELD[path][1] += 1
    try:
      yield
    finally:
      _HELD[path][1] -= 1
    return
  path.mkdir(parents=True, exist_ok=True)
  f = open(path / LOCK_FILE, "a+")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or "an unknown process"
    f.close()
    raise WorkdirBusy(f"{path} is in use by {holder}; wait for that run to "
                      "end, or use another workdir.") from None
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()} on host {socket.gethostname()} since "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
  f.flush()
  _HELD[path] = [f, 1]
  try:
    yield
  finally:
    del _HELD[path]
    f.seek(0)
    f.truncate()
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def one_run_at_a_time(run: Callable | None = None,
                      *,
                      check: Callable | None = None) -> Callable:
  """Decorates `run(config, workdir, ...)` to hold `exclusive(workdir)`.

  `check(config)`, if given, runs first: a setting it refuses fails before
  the workdir is created, locked or written.
  """
  if run is None:
    return functools.partial(one_run_at_a_time, check=check)

  @functools.wraps(run)
  def wrapped(config, workdir, *args, **kwargs):
    if check is not None:
      check(config)
    with exclusive(workdir):
      return run(config, workdir, *args, **kwargs)

  return wrapped


INPUTS_FILE = "inputs.json"
ON_STALE = ("rerun", "error")
_VOLATILE = ("seconds", "time")


class StaleInputs(RuntimeError):
  """An upstream run changed since this run was made from it."""


def _stable(tree: Any) -> Any:
  """`tree` without wall-clock fields (keys holding "seconds" or "time")."""
  if isinstance(tree, dict):
    return {
        k: _stable(v)
        for k, v in tree.items()
        if not any(w in k for w in _VOLATILE)
    }
  if isinstance(tree, list):
    return [_stable(v) for v in tree]
  return tree


def fingerprint(workdir: os.PathLike | str) -> str:
  """A finished run's identity: SHA-256 of its config.json and of its
  results.json without wall-clock fields (re-evaluating a finished run
  keeps it; retraining changes it).

  Raises:
    FileNotFoundError: the run has no config.json or results.json yet
      (it has not finished), naming the file.
  """
  workdir = pathlib.Path(workdir)
  h = hashlib.sha256()
  for name in ("config.json", "results.json"):
    path = workdir / name
    if not path.is_file():
      raise FileNotFoundError(
          f"{path} does not exist: {workdir} is not the workdir of a run, or "
          "that run has not finished (later stages are made from finished "
          "runs only).")
    tree = json.loads(path.read_text())
    if name == "results.json":
      tree = _stable(tree)
    h.update(json.dumps(tree, sort_keys=True).encode())
  return h.hexdigest()[:16]


def check_inputs(workdir: os.PathLike | str,
                 inputs: dict[str, os.PathLike | str],
                 on_stale: str = "rerun") -> list[str]:
  """Records or checks the upstream runs `workdir` is made from.

  The first call writes `<workdir>/inputs.json` ({name: {"path",
  "fingerprint"}}). Later calls compare: when an input's fingerprint (or
  path) changed, the run is stale. With on_stale="rerun" everything in the
  workdir except config.json is moved to `<workdir>/stale/<time>/` (kept,
  not deleted) and the stage starts over from the new inputs; with
  "error" it is refused.

  Args:
    workdir: this run.
    inputs: name -> the upstream run's workdir (finished).
    on_stale: "rerun" or "error".

  Returns:
    What changed (empty when nothing did), e.g. ["sft: 3f2a.. -> 9b1c.."].

  Raises:
    StaleInputs: with on_stale="error", naming each input and both
      fingerprints.
    FileNotFoundError: an input has not finished.
    ValueError: an unknown on_stale.
  """
  if on_stale not in ON_STALE:
    raise ValueError(f"on_stale_inputs={on_stale!r} is not one of {ON_STALE}.")
  workdir = pathlib.Path(workdir)
  now = {}
  for name, p in sorted(inputs.items()):
    try:
      now[name] = {
          "path": str(pathlib.Path(p).absolute()),
          "fingerprint": fingerprint(p)
      }
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{workdir} is made from the {name} run: {e} "
                              f"First run the {name} stage, or point the "
                              "config at its workdir.") from None
  path = workdir / INPUTS_FILE
  if not path.is_file():
    if jax.process_index() == 0:
      metric_writer.write_json_atomic(path, now)
    return []
  saved = json.loads(path.read_text())
  changed = [
      f"{name}: {saved.get(name, {}).get('fingerprint')} "
      f"({saved.get(name, {}).get('path')}) -> {now.get(name, {}).get('fingerprint')} "
      f"({now.get(name, {}).get('path')})"
      for name in sorted(set(saved) | set(now))
      if saved.get(name) != now.get(name)
  ]
  if not changed:
    return []
  if on_stale == "error":
    raise StaleInputs(
        f"{workdir} was made from other upstream runs than those now given: "
        + "; ".join(changed) + ". Set on_stale_inputs='rerun' to set this "
        "run aside and make it again, or use another workdir.")
  if jax.process_index() == 0:
    aside = workdir / "stale" / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True)
    for entry in workdir.iterdir():
      if entry.name not in ("config.json", LOCK_FILE, "stale"):
        os.replace(entry, aside / entry.name)
    metric_writer.write_json_atomic(path, now)
    (aside / "why.txt").write_text("\n".join(changed) + "\n")
  logging.warning("%s: upstream changed (%s); the old run is set aside and "
                  "the stage runs again.", workdir, "; ".join(changed))
  return changed


def check_same_setting(config: ml_collections.ConfigDict, key: str,
                       upstream: os.PathLike | str, what: str) -> None:
  """`config[key]` equals the upstream run's (its config.json), e.g. the
  dataset of the SFT stage and of the SIDs it is made from.

  Raises:
    ValueError: naming the key and both values (`config_checks.ConfigError`).
  """
  path = pathlib.Path(upstream) / "config.json"
  if not path.is_file():
    return  # `check_inputs` names the missing run
  theirs = json.loads(path.read_text()).get(key)
  ours = json.loads(ml_collections.ConfigDict({
      key: config[key]
  }).to_json_best_effort(sort_keys=True))[key]
  if theirs is not None and theirs != ours:
    from taiji_jax import config_checks  # pylint: disable=g-import-not-at-top
    raise config_checks.ConfigError(
        f"{key} is {ours} here but {theirs} in the {what} run {upstream} "
        f"this stage is made from; set the same {key} (the pipeline's "
        f"`--config.{key}...` sets every stage), or point at a {what} run "
        f"of this {key}.")


def relative(path: os.PathLike | str | None,
             workdir: os.PathLike | str) -> str:
  """`path` relative to `workdir` ("" for none), as results.json records
  an input run: the same in every clone of the experiment."""
  if not path:
    return ""
  return os.path.relpath(pathlib.Path(path).absolute(),
                         pathlib.Path(workdir).absolute())


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

"""Running entry points in subprocesses, as a user's command does.

The kill-and-resume tests start a trainer's absl entry point in its own
process (one CPU device, no inherited fault injection) and compare what two
runs wrote to their workdirs.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
from typing import Any, Sequence


def subprocess_env(**extra: str) -> dict[str, str]:
  """os.environ for a child run on the CPU, plus `extra`.

  TAIJI_FAULT_KILL_AT_STEP is dropped unless `extra` sets it, so only the
  run meant to crash does.
  """
  env = dict(os.environ)
  env.pop("TAIJI_FAULT_KILL_AT_STEP", None)
  env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"})
  env.update(extra)
  return env


def metric_records(workdir: os.PathLike | str) -> list[dict[str, Any]]:
  """metrics.jsonl of a workdir without its wall-clock fields.

  `time` and every `*seconds` field differ between two runs of the same
  config; everything else must not.
  """
  out = []
  path = pathlib.Path(workdir) / "metrics.jsonl"
  for line in path.read_text().splitlines():
    record = json.loads(line)
    out.append({
        k: v
        for k, v in record.items()
        if k != "time" and not k.endswith("seconds")
    })
  return out


def run_beside_a_crash(straight_cmd: Sequence[str],
                       crash_cmd: Sequence[str],
                       kill_at: int,
                       timeout: int = 300) -> None:
  """Runs `straight_cmd` to the end while `crash_cmd` is killed at a step.

  The two run concurrently; `crash_cmd` gets TAIJI_FAULT_KILL_AT_STEP =
  `kill_at`, so it dies by SIGKILL before that step, as under `kill -9`.

  Raises:
    AssertionError: the straight run failed, or the crash did not happen.
  """
  first = subprocess.Popen(
      list(straight_cmd),
      env=subprocess_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True)
  crash = subprocess.run(
      list(crash_cmd),
      env=subprocess_env(TAIJI_FAULT_KILL_AT_STEP=str(kill_at)),
      capture_output=True,
      text=True,
      timeout=timeout)
  out, _ = first.communicate(timeout=timeout)
  assert first.returncode == 0, out[-3000:]
  assert crash.returncode == -signal.SIGKILL, crash.stderr[-3000:]


def resume(cmd: Sequence[str], timeout: int = 300) -> None:
  """Re-runs a killed command; it must finish and say it resumed."""
  resumed = subprocess.run(
      list(cmd),
      env=subprocess_env(),
      capture_output=True,
      text=True,
      timeout=timeout)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr, resumed.stderr[-3000:]


def checkpoint_steps(workdir: os.PathLike | str) -> list[int]:
  """The steps of the orbax checkpoints in `<workdir>/checkpoints`."""
  return sorted(
      int(p.name)
      for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
      if p.name.isdigit())


def assert_same_run(a: os.PathLike | str, b: os.PathLike | str) -> dict:
  """Two workdirs hold the same results and metric records; returns a's.

  Compared: test, valid, steps and the selected point (an SFT run's
  best_epoch, an RL run's best_step and its last-step test metrics).
  """
  ra = json.loads((pathlib.Path(a) / "results.json").read_text())
  rb = json.loads((pathlib.Path(b) / "results.json").read_text())
  keys = ["test", "valid", "steps"]
  keys += [k for k in ("best_epoch", "best_step", "test_last") if k in ra]
  assert keys[3:], f"{a}: results.json has no selected point"
  for key in keys:
    assert ra[key] == rb[key], (key, ra[key], rb.get(key))
  assert metric_records(a) == metric_records(b)
  return ra

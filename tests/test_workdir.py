"""The workdir is one run's: a second process is refused, a killed one
frees it, and the same process may nest."""

import json
import os
import signal
import subprocess
import sys

import pytest

from taiji_jax.train import metric_writer
from taiji_jax.train import workdir as workdir_lib

_HOLD = """
import sys, time
from taiji_jax.train import workdir as workdir_lib
with workdir_lib.exclusive(sys.argv[1]):
  print("held", flush=True)
  time.sleep(120)
"""


def _holder(workdir):
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir)],
                          stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
  proc = _holder(tmp_path)
  try:
    with pytest.raises(workdir_lib.WorkdirBusy,
                       match=f"in use by pid {proc.pid} on host "):
      with workdir_lib.exclusive(tmp_path):
        pass
    # A decorated stage is refused before its body runs.
    ran = []
    stage = workdir_lib.one_run_at_a_time(lambda c, w: ran.append(w))
    with pytest.raises(workdir_lib.WorkdirBusy):
      stage(None, tmp_path)
    assert not ran
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  # kill -9 freed it: the resume gets the workdir.
  with workdir_lib.exclusive(tmp_path):
    assert "pid" in (tmp_path / workdir_lib.LOCK_FILE).read_text()
  assert (tmp_path / workdir_lib.LOCK_FILE).read_text() == ""


def test_the_same_process_may_nest_and_release(tmp_path):
  with workdir_lib.exclusive(tmp_path):
    with workdir_lib.exclusive(tmp_path / "."):
      pass
    assert tmp_path.absolute() in workdir_lib._HELD  # pylint: disable=protected-access
  assert tmp_path.absolute() not in workdir_lib._HELD  # pylint: disable=protected-access
  proc = _holder(tmp_path)  # released: another process gets it
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def _finished(path, config, results):
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config))
  (path / "results.json").write_text(json.dumps(results))
  return path


def test_lineage_records_checks_and_reruns_a_stale_run(tmp_path):
  up = _finished(tmp_path / "sft", {"lr": 1}, {"test": {"ndcg@10": 0.2},
                                               "seconds": 3.0})
  run = tmp_path / "rl"
  run.mkdir()
  (run / "config.json").write_text("{}")
  assert workdir_lib.check_inputs(run, {"sft": up}) == []
  recorded = json.loads((run / workdir_lib.INPUTS_FILE).read_text())
  assert recorded["sft"]["fingerprint"] == workdir_lib.fingerprint(up)
  (run / "results.json").write_text('{"old": true}')
  (run / "checkpoints").mkdir()
  # Re-evaluating upstream (only wall-clock fields change) is not a change.
  _finished(up, {"lr": 1}, {"test": {"ndcg@10": 0.2}, "seconds": 9.0})
  assert workdir_lib.check_inputs(run, {"sft": up}) == []
  # Retrained upstream: refused by name with "error" ...
  old_fp = workdir_lib.fingerprint(up)
  _finished(up, {"lr": 1}, {"test": {"ndcg@10": 0.1}, "seconds": 9.0})
  new_fp = workdir_lib.fingerprint(up)
  with pytest.raises(workdir_lib.StaleInputs,
                     match=f"sft: {old_fp} .* -> {new_fp}"):
    workdir_lib.check_inputs(run, {"sft": up}, on_stale="error")
  assert (run / "results.json").is_file()
  # ... and with "rerun" the old run is set aside, not deleted.
  changed = workdir_lib.check_inputs(run, {"sft": up}, on_stale="rerun")
  assert changed and old_fp in changed[0]
  assert sorted(p.name for p in run.iterdir()) == [
      "config.json", workdir_lib.INPUTS_FILE, "stale"
  ]
  (aside,) = (run / "stale").iterdir()
  assert json.loads((aside / "results.json").read_text()) == {"old": True}
  assert (aside / "checkpoints").is_dir()
  assert json.loads((run / workdir_lib.INPUTS_FILE).read_text(
  ))["sft"]["fingerprint"] == new_fp


def test_an_unfinished_input_is_named(tmp_path):
  (tmp_path / "sft").mkdir()
  (tmp_path / "sft" / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="sft/results.json does not exist: .* not the workdir of a run"):
    workdir_lib.check_inputs(tmp_path / "rl", {"sft": tmp_path / "sft"})
  with pytest.raises(ValueError, match="on_stale_inputs='ignore'"):
    workdir_lib.check_inputs(tmp_path, {}, on_stale="ignore")


def test_results_keep_no_wall_clock_and_timing_merges_back(tmp_path):
  results = {
      "test": {"ndcg@10": 0.25, "valid/seconds": 2.0},
      "seconds": 9.5,
      "reports": {"rq_vae": {"error": 0.1, "seconds": 3.0},
                  "rq_kmeans": {"error": 0.2}},
      "train_seconds": 1.0,
  }
  metric_writer.write_results(tmp_path, results)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved == {"test": {"ndcg@10": 0.25},
                   "reports": {"rq_vae": {"error": 0.1},
                               "rq_kmeans": {"error": 0.2}}}
  assert json.loads((tmp_path / "timing.json").read_text()) == {
      "test": {"valid/seconds": 2.0}, "seconds": 9.5,
      "reports": {"rq_vae": {"seconds": 3.0}}, "train_seconds": 1.0}
  assert metric_writer.read_results(tmp_path, timing=True) == results
  assert metric_writer.read_results(tmp_path) == saved


def test_inputs_are_recorded_relative_to_the_run(tmp_path):
  assert workdir_lib.relative(tmp_path / "a" / "sids", tmp_path / "a" /
                              "sft") == "../sids"
  assert workdir_lib.relative("", tmp_path) == ""

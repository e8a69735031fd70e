"""A real multi-host run: two processes on this machine (jax.distributed
with a local coordinator, gloo collectives, two fake CPU devices each) run
the SFT and RL training steps through `train.fit` and must match one
process holding all four devices (`taiji_jax/testing/multihost.py`).

Each process gathers only its own rows of every batch and the global arrays
are assembled from the processes' blocks, so a wrong row split, a batch
gathered twice or a missed collective shows as a different loss."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from taiji_jax.testing import runs


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(workdir, out, devices, num_processes=1, process_id=0, port=0):
  return [
      sys.executable, "-m", "taiji_jax.testing.multihost",
      f"--num_processes={num_processes}", f"--process_id={process_id}",
      f"--port={port}", f"--devices={devices}", f"--workdir={workdir}",
      f"--out={out}"
  ]


def _wait(proc):
  try:
    _, err = proc.communicate(timeout=600)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  env = runs.subprocess_env()
  port = _free_port()
  procs = [
      subprocess.Popen(
          _command(tmp_path / "single", tmp_path / "single.json", devices=4),
          env=env, stderr=subprocess.PIPE, text=True)
  ] + [
      subprocess.Popen(
          _command(tmp_path / "multi", tmp_path / f"p{i}.json", devices=2,
                   num_processes=2, process_id=i, port=port),
          env=env, stderr=subprocess.PIPE, text=True) for i in range(2)
  ]
  for proc in procs:
    _wait(proc)
  single = json.loads((tmp_path / "single.json").read_text())
  assert (single["process_count"], single["devices"]) == (1, 4)
  for i in range(2):
    multi = json.loads((tmp_path / f"p{i}.json").read_text())
    assert (multi["process_count"], multi["devices"]) == (2, 4)
    for part, steps in (("sft", 6), ("rl", 3)):
      assert len(multi[part]["losses"]) == steps
      np.testing.assert_allclose(multi[part]["losses"], single[part]["losses"],
                                 rtol=1e-5, atol=1e-7, err_msg=part)
      for got, want in zip(multi[part]["params"], single[part]["params"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5,
                                   err_msg=part)
    np.testing.assert_allclose(multi["rl"]["weights"], single["rl"]["weights"],
                               rtol=1e-5)
  # The two rewards conflict: MGDA's weights move away from the start.
  assert np.ptp(np.asarray(single["rl"]["weights"])[:, 0]) > 0.01
  # Both processes checkpointed into the shared workdir; process 0 wrote
  # the digests of every step it kept.
  for part in ("sft", "rl"):
    ckpts = tmp_path / "multi" / part / "checkpoints"
    kept = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert kept and kept[-1] == (6 if part == "sft" else 3)
    assert sorted(int(p.stem) for p in (ckpts / "digests").glob("*.json")
                 ) == kept

"""End-to-end SASRec runs on the smoke config: results, resume after kill -9.

These start the real entry point in subprocesses (one CPU device each), so
they exercise the absl flags, config files, checkpoints and the workdir
exactly as a user's command does.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from taiji_jax import config_lib
from taiji_jax.evaluate import metrics
from taiji_jax.models import sasrec
from taiji_jax.stages import artifacts
from taiji_jax.testing import runs
from taiji_jax.train import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENTRY = ROOT / "experiments" / "train_sasrec.py"
CONFIG = ROOT / "configs" / "ml100k_sasrec.py"


def _command(workdir, *overrides):
  return [
      sys.executable,
      str(ENTRY), f"--config={CONFIG}:smoke", f"--workdir={workdir}",
      "--config.progress_bar=False", *overrides
  ]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  # The uninterrupted run and the run that will be killed run concurrently.
  # Smoke: 6 steps per epoch; step 15 is mid-epoch 3, after the epoch-2
  # checkpoint, so the resumed run must redo steps 12..14.
  runs.run_beside_a_crash(_command(straight), _command(killed), kill_at=15)
  assert not (killed / "results.json").exists()
  steps = runs.checkpoint_steps(killed)
  assert steps and max(steps) == 12, steps
  runs.resume(_command(killed))
  a = runs.assert_same_run(straight, killed)
  # The smoke model learns the planted structure: far above chance (~0.2).
  assert a["test"]["recall@10"] > 0.5, a["test"]

  # The trained model loads as a preference scorer for the RL stage, and
  # its scores reproduce the run's own test metric.
  model, config = artifacts.sasrec_scorer(straight)
  _, split = artifacts.split(config, config.max_len)
  test = split["test"]
  scores = np.asarray(sasrec.score(model, test["histories"]))
  assert scores.shape == (len(test["targets"]),
                          config.dataset.kwargs.num_items + 1)
  topk, _ = metrics.full_sort_topk(scores, test["seen_items"], k=10)
  recall = metrics.ranking_metrics(topk, test["targets"], (10,))["recall@10"]
  np.testing.assert_allclose(recall.mean(), a["test"]["recall@10"], rtol=1e-6)

  # Re-running a finished run only re-evaluates and reproduces the results.
  again = subprocess.run(
      _command(straight),
      env=runs.subprocess_env(),
      capture_output=True,
      text=True,
      timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads(
      (straight / "results.json").read_text())["test"] == a["test"]


def test_resume_with_a_different_config_is_refused(tmp_path):
  config = config_lib.load_config_file(CONFIG, "smoke")
  workdir_lib.write_or_check_config(tmp_path, config)
  workdir_lib.write_or_check_config(tmp_path, config)  # same: accepted
  changed = config_lib.load_config_file(CONFIG, "smoke")
  changed.unlock()
  changed.train.lr = 0.5
  with pytest.raises(ValueError, match=r"config.json.*train\.lr"):
    workdir_lib.write_or_check_config(tmp_path, changed)


def test_misspelt_config_override_is_an_error(tmp_path):
  bad = subprocess.run(
      _command(tmp_path, "--config.train.learning_rate=1e-3"),
      env=runs.subprocess_env(),
      capture_output=True,
      text=True,
      timeout=120)
  assert bad.returncode != 0
  assert "learning_rate" in bad.stderr


def test_config_arguments_are_typed_and_checked():
  arg = config_lib.parse_arg(
      "smoke,seed=3", smoke=False, seed=0, dataset="ml-100k")
  assert arg.smoke is True and arg.seed == 3 and arg.dataset == "ml-100k"
  with pytest.raises(ValueError, match="unknown config argument 'sed'"):
    config_lib.parse_arg("sed=3", seed=0)
  with pytest.raises(ValueError, match="not a bool"):
    config_lib.parse_arg("smoke=maybe", smoke=False)
  config = config_lib.load_config_file(CONFIG, "smoke")
  assert config.dataset.name == "synthetic"
  with pytest.raises(AttributeError):
    config.train.learning_rate = 1.0  # locked: misspelt keys are errors

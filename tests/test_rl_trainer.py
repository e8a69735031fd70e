"""The RL stage end to end on the smoke pipeline: logs, resume, robustness.

A module fixture trains the smoke sids (RQ-KMeans on the synthetic item
texts), SASRec and SFT stages into a temporary directory, as `make run`
lays them out; the RL runs start from that SFT run.
"""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from taiji_jax import config_lib
from taiji_jax.rl import rewards as rewards_lib
from taiji_jax.rl import trainer
from taiji_jax.testing import runs
from taiji_jax.train import build_sids
from taiji_jax.train import sasrec_trainer
from taiji_jax.train import sft

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ENTRY = ROOT / "experiments" / "train_rl.py"
_KILL_AT = 4  # after the step-3 checkpoint of the 6-step smoke run


def _config(name, arg="smoke", **overrides):
  config = config_lib.load_config_file(CONFIGS / name, arg)
  return config_lib.with_overrides(config, progress_bar=False, **overrides)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
  root = tmp_path_factory.mktemp("rl_pipeline")
  build_sids.run(
      _config(
          "ml100k_sids.py", **{
              "representation.weights.collaborative": 0.0,
              "quantizers": ("rq_kmeans",),
              "default": "rq_kmeans",
          }), root / "sids")
  sasrec_trainer.train_and_evaluate(
      _config("ml100k_sasrec.py", **{"train.num_epochs": 3}), root / "sasrec")
  sft.train_and_evaluate(
      _config("ml100k_sft.py", **{"train.num_epochs": 2}), root / "sft")
  return root


def _command(workdir, root):
  return [
      sys.executable,
      str(ENTRY), f"--config={CONFIGS / 'ml100k_rl.py'}:smoke",
      f"--workdir={workdir}", f"--config.sft_workdir={root / 'sft'}",
      "--config.progress_bar=False"
  ]


@pytest.mark.slow
def test_smoke_run_logs_everything_and_resumes_after_kill(stages, tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  runs.run_beside_a_crash(
      _command(straight, stages), _command(killed, stages), kill_at=_KILL_AT)
  assert not (killed / "results.json").exists()
  assert runs.checkpoint_steps(killed) == [3]
  runs.resume(_command(killed, stages))
  a = json.loads((straight / "results.json").read_text())
  b = json.loads((killed / "results.json").read_text())
  for key in ("valid", "test", "test_last", "sft", "steps", "best_step"):
    assert a[key] == b[key], key
  records = runs.metric_records(straight)
  assert records == runs.metric_records(killed)

  config = _config("ml100k_rl.py")
  # Step 0: the SFT model's valid metrics; then one record per RL step.
  assert records[0]["step"] == 0 and "valid/ndcg@10" in records[0]
  steps = [r for r in records if r["step"] > 0]
  assert [r["step"] for r in steps] == list(range(1, 7))
  for r in steps:
    for name in config.rewards:
      for stat in ("mean", "std", "min", "max", "nonfinite"):
        assert np.isfinite(r[f"reward/{name}/{stat}"])
    for key in ("kl", "clip_frac", "entropy", "grad_norm", "loss",
                "weights/semantic", "groups/zero_variance"):
      assert np.isfinite(r[key]), key
    assert r["weights/semantic"] == r["weights/preference"] == 0.5
    assert r["skipped"] == 0 and r["reward/nonfinite_rows"] == 0
    assert 0.0 <= r["reward/semantic/mean"] <= 1.0
    assert 0.0 <= r["reward/preference/mean"] <= 1.0
  # Evaluations every 3 steps, with the reward metrics of the top items.
  assert [r["step"] for r in records if "valid/ndcg@10" in r] == [0, 3, 6]
  for part in ("test", "test_last"):
    for key in ("reward/semantic@1", "reward/preference@10", "recall@10"):
      assert 0.0 <= a[part][key] <= 1.0
    assert a[part]["legal_items"] == 1.0
  # The reference row is the SFT run's own test evaluation.
  sft_results = json.loads((stages / "sft" / "results.json").read_text())
  for key in ("recall@10", "ndcg@10"):
    assert a["sft"]["test"][key] == pytest.approx(sft_results["test"][key])


@pytest.fixture
def half_nan_reward():
  """A broken reward: NaN on every other rollout."""

  def factory(sasrec_graphdef=None):
    del sasrec_graphdef

    def fn(tables, inputs):
      del tables
      n = inputs.items.shape[0]
      return jax.numpy.where(
          jax.numpy.arange(n) % 2 == 0, jax.numpy.nan, 1.0 * inputs.items)

    return fn

  rewards_lib.REWARDS["half_nan"] = factory
  yield "half_nan"
  del rewards_lib.REWARDS["half_nan"]


def _nan_config(stages, **overrides):
  return _config(
      "ml100k_rl.py", **{
          "sft_workdir": str(stages / "sft"),
          "rewards": ("semantic", "half_nan"),
          "weights": {
              "semantic": 0.5,
              "half_nan": 0.5
          },
          "train.num_steps": 2,
          "eval.every_steps": 0,
          **overrides
      })


def test_nan_rewards_are_masked_or_stop_the_run_by_name(
    stages, tmp_path, half_nan_reward):
  with pytest.raises(FloatingPointError, match=f"{half_nan_reward}.*0.5"):
    trainer.train_and_evaluate(_nan_config(stages), tmp_path / "strict")
  results = trainer.train_and_evaluate(
      _nan_config(stages, max_nonfinite_frac=0.6), tmp_path / "tolerant")
  records = trainer.read_metrics(tmp_path / "tolerant")
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert r["reward/nonfinite_rows"] == pytest.approx(0.5)
    assert r["reward/half_nan/nonfinite"] == pytest.approx(0.5)
    assert r["reward/semantic/nonfinite"] == 0.0
    assert np.isfinite(r["loss"]) and r["skipped"] == 0
  for part in ("valid", "test", "test_last"):
    assert all(np.isfinite(v) for v in results[part].values())


def test_bad_settings_are_named(stages, tmp_path):
  with pytest.raises(ValueError, match="unknown objective 'ppo'"):
    trainer.train_and_evaluate(
        _config("ml100k_rl.py", objective="ppo",
                sft_workdir=str(stages / "sft")), tmp_path / "a")
  with pytest.raises(ValueError, match="weights for \\['ctr'\\]"):
    trainer.train_and_evaluate(
        _config(
            "ml100k_rl.py",
            sft_workdir=str(stages / "sft"),
            weights={
                "semantic": 1.0,
                "ctr": 1.0
            }), tmp_path / "b")
  with pytest.raises(FileNotFoundError, match="not the workdir of a run"):
    trainer.train_and_evaluate(
        _config("ml100k_rl.py", sft_workdir=str(tmp_path / "none")),
        tmp_path / "c")

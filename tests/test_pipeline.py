"""The pipeline behind `make run`: MostPop stage, summary table."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from taiji_jax import config_checks as checks
from taiji_jax import config_lib
from taiji_jax import pipeline
from taiji_jax.evaluate import baselines
from taiji_jax.stages import artifacts
from taiji_jax.stages import sft as sft_stage
from taiji_jax.testing import runs

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "ml100k.py"


def test_popularity_scores_count_training_interactions():
  scores = baselines.popularity_scores(
      [np.array([1, 2, 2]), np.array([2, 3])], num_items=4)
  np.testing.assert_array_equal(scores, [0, 1, 3, 1, 0])


def test_popularity_stage_matches_a_direct_computation(tmp_path):
  config = config_lib.load_config_file(CONFIG, "smoke")
  results = pipeline.run_popularity(config.sasrec, tmp_path)
  assert json.loads((tmp_path / "results.json").read_text()) == results
  # Recompute recall@10 by hand: most popular unseen items per user.
  dataset, split = artifacts.split(config.sasrec, config.sasrec.max_len)
  counts = baselines.popularity_scores(split["train"]["sequences"],
                                       dataset.num_items)
  test = split["test"]
  hits = []
  for seen, target in zip(test["seen_items"], test["targets"]):
    order = sorted(
        range(1, dataset.num_items + 1), key=lambda i: (-counts[i], i))
    ranked = [i for i in order if i not in set(seen.tolist())][:10]
    hits.append(target in ranked)
  np.testing.assert_allclose(
      results["test"]["recall@10"], np.mean(hits), rtol=1e-6)
  assert results["test"]["num_users"] == len(test["targets"])


def test_unknown_stage_is_an_error(tmp_path):
  config = config_lib.load_config_file(CONFIG, "smoke")
  config.unlock()
  config.stages = ("popularity", "tiger")
  with pytest.raises(ValueError, match=r"unknown \['tiger'\].*sasrec"):
    pipeline.run(config, tmp_path)


@pytest.mark.parametrize("override, message", [
    ({"rl.objective": "grpoo"}, "rl.objective='grpoo': must be one of"),
    ({"rl.eval.early_stop_metric": "ndcg@11"},
     "rl.eval.early_stop_metric='ndcg@11': not a metric"),
    ({"sasrec.train.batch_size": 0}, "sasrec.train.batch_size=0: must be"),
    ({"sft.train.lr": -1e-3}, "sft.train.lr=-0.001: must be a number > 0"),
    ({"sft.train.freeze_layers": -2}, "sft.train.freeze_layers must be >= 0"),
    ({"sft.train.new_rows_lr_scale": 10.0},
     "sft.train.new_rows_lr_scale applies to the rows a pretrained"),
    ({"sft.model.pretrained_weights": False},
     "sft.model.pretrained_weights=False takes the tokenizer"),
    ({"sft.rows_per_user": -1}, "sft.rows_per_user=-1: must be"),
    ({"rl.weighting": "popoo"}, "rl: unknown reward weighting .popoo."),
])
def test_a_bad_setting_in_any_stage_fails_before_anything_runs(
    tmp_path, override, message):
  config = config_lib.with_overrides(
      config_lib.load_config_file(CONFIG, "smoke"), **override)
  with pytest.raises(checks.ConfigError, match=message):
    pipeline.run(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_the_entry_point_prints_a_user_error_as_one_line(tmp_path):
  cmd = [
      sys.executable,
      str(CONFIG.parents[1] / "experiments" / "pipeline.py"),
      f"--config={CONFIG}:smoke", f"--workdir={tmp_path / 'run'}",
      "--config.rl.objective=grpoo"
  ]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                        env=runs.subprocess_env())
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith(
      "error: rl.objective='grpoo'")
  assert "Traceback" not in done.stderr
  assert not (tmp_path / "run").exists()


def test_format_table_lists_each_stage():
  row = {f"{m}@{k}": 0.5 for m in ("recall", "ndcg") for k in (5, 10, 20)}
  row["num_users"] = 7
  text = pipeline.format_table({
      "popularity": {
          "test": row,
          "seconds": 1.0
      },
      "sasrec": {
          "test": row,
          "seconds": 2.0
      },
      "sids": {
          "results": "runs/x/sids/results.json",
          "seconds": 3.0
      }
  })
  lines = text.splitlines()
  assert lines[0].split()[:3] == ["model", "recall@5", "recall@10"]
  assert lines[2].startswith("popularity") and lines[3].startswith("sasrec")
  assert "7 users" in lines[-2]
  assert lines[-1] == "sids: 3.0 s, results in runs/x/sids/results.json"


@pytest.mark.slow
def test_smoke_pipeline_runs_every_stage_and_prints_them_side_by_side(
    tmp_path, capsys):
  config = config_lib.load_config_file(CONFIG, "smoke")
  summary = pipeline.run(config, tmp_path)
  assert list(summary) == list(config.stages)
  assert {"popularity", "sasrec", "sids", "sft", "rl"} <= set(summary)
  table = capsys.readouterr().out
  for stage in ("popularity", "sasrec", "sft", "rl"):
    test = summary[stage]["test"]
    # The summary holds each stage's own results.json numbers.
    own = json.loads((tmp_path / stage / "results.json").read_text())
    assert test == own["test"]
    row = next(line for line in table.splitlines() if line.startswith(stage))
    np.testing.assert_allclose(
        float(row.split()[2]), test["recall@10"], atol=5e-5)
  assert summary["sft"]["test"]["legal_items"] == 1.0
  assert "sids: " in table
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["sft"]["test"] == summary["sft"]["test"]
  # Every results.json is what the run computed, nothing of the machine or
  # the moment (so two clones write the same bytes): no wall clock, no
  # absolute path; the times are in timing.json.
  for path in [tmp_path / "results.json"] + sorted(
      tmp_path.glob("*/results.json")):
    text = path.read_text()
    assert "seconds" not in text and str(tmp_path) not in text, path
    assert (path.parent / "timing.json").is_file(), path
  assert json.loads((tmp_path / "timing.json").read_text())["sft"] == {
      "seconds": summary["sft"]["seconds"]}
  assert saved["sids"]["results"] == "sids/results.json"
  assert json.loads((tmp_path / "rl" / "results.json").read_text()
                   )["sft_workdir"] == "../sft"


def test_one_dataset_setting_reaches_every_stage():
  config = config_lib.load_config_file(CONFIG)
  config = config_lib.with_overrides(config, **{"dataset.name": "ml-1m"})
  for section in ("sasrec", "sids", "sft"):
    assert config[section].dataset.name == "ml-1m", section
  # The RL stage has no dataset of its own: it reads its SFT run's.
  assert "dataset" not in config.rl


def test_a_stage_made_from_another_dataset_is_refused(tmp_path):
  config = config_lib.load_config_file(CONFIG, "smoke")
  sids = tmp_path / "sids"
  sids.mkdir()
  theirs = config_lib.with_overrides(config.sids, **{"dataset.name": "ml-1m"})
  (sids / "config.json").write_text(theirs.to_json_best_effort())
  with pytest.raises(checks.ConfigError,
                     match="dataset is .*synthetic.* but .*ml-1m.* sids run"):
    sft_stage.train_and_evaluate(config.sft, tmp_path / "sft")
  assert not (tmp_path / "sft" / "config.json").exists()

"""The CoT ablation's smoke run: deterministic, crash-safe, ORFT as stated."""

import json
import pathlib
import sys

import numpy as np
import pytest

from taiji_jax import config_lib
from taiji_jax.cot import orft
from taiji_jax.stages import sids as sids_stage
from taiji_jax.studies import cot_ablation
from taiji_jax.testing import runs

pytestmark = pytest.mark.slow  # end-to-end subprocess runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ENTRY = ROOT / "experiments" / "cot_ablation.py"
SUBRUNS = ("base",) + cot_ablation.VARIANTS
_KILL_AT = 15  # mid second epoch of the base run (after its first checkpoint)


def _command(workdir, sids):
  return [
      sys.executable,
      str(ENTRY), f"--config={CONFIGS / 'ml100k_cot_ablation.py'}:smoke",
      f"--workdir={workdir}", f"--config.sft.sids_workdir={sids}"
  ]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """The smoke ablation straight, and killed in its base run then resumed."""
  tmp = tmp_path_factory.mktemp("cot_ablation")
  sids_config = config_lib.with_overrides(
      config_lib.load_config_file(CONFIGS / "ml100k_sids.py", "smoke"), **{
          "progress_bar": False,
          "representation.weights.collaborative": 0.0,
          "quantizers": ("rq_kmeans",),
          "default": "rq_kmeans",
      })
  sids_stage.run(sids_config, tmp / "sids")
  straight, killed = tmp / "straight", tmp / "killed"
  runs.run_beside_a_crash(
      _command(straight, tmp / "sids"),
      _command(killed, tmp / "sids"),
      kill_at=_KILL_AT,
      timeout=600)
  assert not (killed / "results.json").exists()
  runs.resume(_command(killed, tmp / "sids"), timeout=600)
  return straight, killed


def test_smoke_ablation_is_deterministic_across_a_crash(two_runs):
  straight, killed = two_runs
  for sub in SUBRUNS:
    runs.assert_same_run(straight / "seed_0" / sub, killed / "seed_0" / sub)
  for name in ("candidates_rupr.json", "candidates_direct.json"):
    a = (straight / "seed_0" / "data" / name).read_text()
    assert a == (killed / "seed_0" / "data" / name).read_text()
  with np.load(straight / "seed_0" / "orft" / orft.SCORES_FILE) as a, \
      np.load(killed / "seed_0" / "orft" / orft.SCORES_FILE) as b:
    np.testing.assert_array_equal(a["ppl"], b["ppl"])
  ra = json.loads((straight / "results.json").read_text())
  rb = json.loads((killed / "results.json").read_text())
  assert ra["summary"] == rb["summary"]
  assert (straight / "table.md").read_text() == (killed /
                                                 "table.md").read_text()


def test_smoke_ablation_rows_orft_and_metrics(two_runs):
  straight, _ = two_runs
  config = config_lib.load_config_file(CONFIGS / "ml100k_cot_ablation.py",
                                       "smoke")
  results = json.loads((straight / "results.json").read_text())
  seed = results["per_seed"]["0"]
  assert set(seed) == set(SUBRUNS)
  k = config.cot.k
  n = seed["rupr"]["cot_examples"]
  assert seed["no_cot"]["cot_rows"] == seed["direct"]["cot_rows"] == n * k
  assert seed["rupr"]["cot_rows"] == n * k
  assert seed["no_cot"]["mean_rationale_tokens"] == 0.0
  assert 0 < seed["rupr"]["mean_rationale_tokens"] <= config.cot.max_think

  # ORFT: R is the median of the stored PPLs, a candidate is kept iff its
  # PPL is strictly below it, and the kept ones are exactly the rows of
  # rupr_orft.
  with np.load(straight / "seed_0" / "orft" / orft.SCORES_FILE) as f:
    ppl, accepted = f["ppl"], f["accepted"]
  stats = seed["rupr_orft"]["orft"]
  assert len(ppl) == n * k and np.all(np.isfinite(ppl)) and np.all(ppl >= 1)
  assert stats["threshold"] == pytest.approx(float(np.median(ppl)))
  np.testing.assert_array_equal(accepted, ppl < stats["threshold"])
  assert seed["rupr_orft"]["cot_rows"] == int(accepted.sum())
  assert stats["acceptance_rate"] == pytest.approx(accepted.mean())
  assert 0.3 < stats["acceptance_rate"] <= 0.5
  # Scored out of sample by default, and the stats say by what.
  assert stats["scorer"] == "base" and stats["in_sample"] is False
  assert stats["scorer_workdir"].endswith("seed_0/base")
  assert (straight / "seed_0" / "orft" / orft.HISTOGRAM_FILE).is_file()
  kept = [
      json.loads(line) for line in (straight / "seed_0" / "orft" /
                                    cot_ablation.ACCEPTED_FILE).read_text().splitlines()
  ]
  assert [r["ppl"] for r in kept] == ppl[accepted].tolist()
  texts = json.loads(
      (straight / "seed_0" / "data" / "candidates_rupr.json").read_text())
  assert texts["teacher"] == cot_ablation.teacher_spec(config, "rupr")
  assert texts["checks"]["num"] == n * k
  assert 0.0 <= texts["checks"]["off_target_label"] <= 1.0
  assert [r["rationale"] for r in kept
         ] == [t for t, a in zip(texts["texts"], accepted) if a]

  for sub in SUBRUNS:
    test = seed[sub]["test"]
    assert test["legal_items"] == 1.0
    assert 0.0 <= test["ndcg@10"] <= test["recall@10"] <= 1.0
    assert 0.0 <= test["label_acc@1"] <= 1.0
    think = sub != "base"
    assert ("think/closed" in test) == think
    if think:
      # Recorded relative to the run (the same in every clone).
      assert seed[sub]["init_from"] == "../base"
      # The plain beam of a fine-tune (started from the base) keeps most of
      # the base's quality and never returns a seen item.
      plain = seed[sub]["test_no_think"]
      assert plain["legal_items"] == 1.0 and "think/closed" not in plain
      assert plain["ndcg@10"] > 0.5 * seed["base"]["test"]["ndcg@10"]
      assert 0.0 <= test["format/compliant"] <= test["format/think_open"] <= 1
      assert 0.0 <= test["think/length"] <= config.cot.max_think
  for sub in cot_ablation.VARIANTS:
    samples = json.loads(
        (straight / "seed_0" / sub / cot_ablation.SAMPLES_FILE).read_text())
    assert len(samples) == 8
    for sample in samples:
      assert len(sample["top5"]) == 5 and sample["target"]
      assert "<think>" not in sample["rationale"]
  table = (straight / "table.md").read_text().splitlines()
  assert len(table) == 2 + len(SUBRUNS)


def test_fine_tune_refuses_a_base_with_another_model(two_runs, tmp_path):
  straight, _ = two_runs
  config = config_lib.load_config_file(CONFIGS / "ml100k_cot_ablation.py",
                                       "smoke")
  sids = json.loads((straight / "config.json").read_text())["sft"][
      "sids_workdir"]
  tune = config_lib.with_overrides(
      cot_ablation.fine_tune_config(config, 0, straight / "seed_0" / "base"), **{
          "sids_workdir": sids,
          "model.overrides.dropout_rate": 0.0,
          "progress_bar": False,
      })
  from taiji_jax.stages import sft as sft_stage  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="'model' differs"):
    sft_stage.train_and_evaluate(tune, tmp_path / "tune")

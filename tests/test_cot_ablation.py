"""Taiji's recipe on the tiny Llama (`configs/ml100k_cot_ablation.py:smoke,llm`):
the chat teacher writes the rationales, ORFT scores them out of sample, the
pretrained student is fine-tuned on each variant, then RL (fixed weights
and POPO, reasoning rollouts) from RUPR + ORFT; deterministic across a
kill -9 and its resume."""

import json
import pathlib
import sys

import numpy as np
import pytest

from taiji_jax import config_lib
from taiji_jax.cot import orft
from taiji_jax.stages import rl as rl_stage
from taiji_jax.stages import sasrec as sasrec_stage
from taiji_jax.stages import sids as sids_stage
from taiji_jax.studies import cot_ablation
from taiji_jax.testing import runs

pytestmark = pytest.mark.slow  # end-to-end subprocess runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ENTRY = ROOT / "experiments" / "cot_ablation.py"
ARG = "smoke,llm"
SUBRUNS = ("base",) + cot_ablation.VARIANTS
RL_RUNS = ("fixed_0.50", "popo")  # the smoke config's rl_runs
# Mid the no_cot fine-tune (the 14-step base finished; after the
# fine-tune's step-12 checkpoint).
_KILL_AT = 15


def _config():
  return config_lib.load_config_file(CONFIGS / "ml100k_cot_ablation.py", ARG)


def _command(workdir, tmp):
  return [
      sys.executable,
      str(ENTRY), f"--config={CONFIGS / 'ml100k_cot_ablation.py'}:{ARG}",
      f"--workdir={workdir}", f"--config.sft.sids_workdir={tmp / 'sids'}",
      f"--config.rl.sasrec_workdir={tmp / 'sasrec'}"
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
  sasrec_stage.train_and_evaluate(
      config_lib.with_overrides(
          config_lib.load_config_file(CONFIGS / "ml100k_sasrec.py", "smoke"),
          **{"progress_bar": False, "train.num_epochs": 3}), tmp / "sasrec")
  straight, killed = tmp / "straight", tmp / "killed"
  runs.run_beside_a_crash(
      _command(straight, tmp),
      _command(killed, tmp),
      kill_at=_KILL_AT,
      timeout=900)
  assert not (killed / "results.json").exists()
  assert (killed / "seed_0" / "base" / "results.json").is_file()
  assert not (killed / "seed_0" / "no_cot" / "results.json").exists()
  runs.resume(_command(killed, tmp), timeout=900)
  return straight, killed


def test_smoke_ablation_is_deterministic_across_a_crash(two_runs):
  straight, killed = two_runs
  for sub in SUBRUNS + tuple(f"rl/{r}" for r in RL_RUNS):
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
  for name in ("table.md", "table_rl.md"):
    assert (straight / name).read_text() == (killed / name).read_text()


def test_smoke_ablation_rows_orft_and_metrics(two_runs):
  straight, _ = two_runs
  config = _config()
  results = json.loads((straight / "results.json").read_text())
  seed = results["per_seed"]["0"]
  assert set(seed) == set(SUBRUNS) | {"rl"}
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
      # The plain beam of a fine-tune (started from the base, with replay)
      # keeps a good part of the base's quality (a third, in this 2-epoch
      # smoke of a random tiny Llama) and never returns a seen item.
      plain = seed[sub]["test_no_think"]
      assert plain["legal_items"] == 1.0 and "think/closed" not in plain
      assert plain["ndcg@10"] > seed["base"]["test"]["ndcg@10"] / 3
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
  config = _config()
  sids = json.loads((straight / "config.json").read_text())["sft"][
      "sids_workdir"]
  tune = config_lib.with_overrides(
      cot_ablation.fine_tune_config(config, 0, straight / "seed_0" / "base"), **{
          "sids_workdir": sids,
          "model.pretrained_weights": False,
          "progress_bar": False,
      })
  from taiji_jax.stages import \
      sft as sft_stage  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="'model' differs"):
    sft_stage.train_and_evaluate(tune, tmp_path / "tune")


def test_smoke_recipe_student_is_the_pretrained_llm_and_rl_follows(two_runs):
  """The student of every variant is the tiny Llama in its own tokenizer;
  RL starts from RUPR + ORFT with reasoning rollouts, logs POPO's
  gradient quantities, and its table carries the rewards and judges."""
  from taiji_jax.text import \
      pretrained_vocab  # pylint: disable=g-import-not-at-top
  straight, _ = two_runs
  config = _config()
  seed_dir = straight / "seed_0"
  for sub in SUBRUNS:
    sub_config = json.loads((seed_dir / sub / "config.json").read_text())
    assert sub_config["model"]["pretrained"] == config.sft.model.pretrained
    assert isinstance(
        pretrained_vocab.load_vocab(seed_dir / sub / "vocab"),
        pretrained_vocab.PretrainedVocab)
  assert config.cot.teacher == "chat"

  results = json.loads((straight / "results.json").read_text())
  rl = results["per_seed"]["0"]["rl"]
  assert set(rl) == {"sft"} | set(RL_RUNS)
  # The start model evaluated by the RL stage is rupr_orft's test ranking.
  start = results["per_seed"]["0"][config.rl_runs.start]["test"]
  assert rl["sft"]["test"]["ndcg@10"] == pytest.approx(start["ndcg@10"])
  for name in RL_RUNS:
    run = seed_dir / "rl" / name
    rl_config = json.loads((run / "config.json").read_text())
    assert rl_config["rollout"]["think"] is True
    assert pathlib.Path(rl_config["sft_workdir"]) == seed_dir / "rupr_orft"
    records = rl_stage.read_metrics(run)
    assert [r["step"] for r in records] == list(
        range(1, config.rl.train.num_steps + 1))
    for r in records:
      assert 0 < r["think/length"] <= config.rl.rollout.max_think
      assert np.isfinite(r["loss"])
    test = rl[name]["test"]
    assert test["legal_items"] == 1.0
    for key in ("reward/semantic@1", "reward/preference@1",
                "judge/preference@1", "label_acc@1", "think/closed"):
      assert 0.0 <= test[key] <= 1.0, key
  popo = rl_stage.read_metrics(seed_dir / "rl" / "popo")
  for r in popo:
    w = np.array([r["weights/semantic"], r["weights/preference"]])
    a = np.array([r["grads/alignment/semantic"],
                  r["grads/alignment/preference"]])
    assert w.sum() == pytest.approx(1.0, abs=1e-5)
    assert float(w @ a) == pytest.approx(1.0, abs=1e-3)  # sum_k w_k a_k = 1
    assert -1.0 <= r["grads/cos/semantic|preference"] <= 1.0
  table = (straight / "table_rl.md").read_text().splitlines()
  assert len(table) == 2 + 1 + len(RL_RUNS)
  assert "judge: preference@1 (item-kNN)" in table[0]
  assert "think closed" in table[0]

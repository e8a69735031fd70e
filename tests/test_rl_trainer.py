"""The RL stage end to end on the smoke pipeline: logs, resume, robustness.

A module fixture trains the smoke sids (RQ-KMeans on the synthetic item
texts), SASRec and SFT stages into a temporary directory, as `make run`
lays them out; the RL runs start from that SFT run.
"""

import json
import pathlib
import shutil
import sys

from flax import nnx
import jax
import numpy as np
import pytest

from taiji_jax import config_lib
from taiji_jax.models import decoder
from taiji_jax.rl import rewards as rewards_lib
from taiji_jax.stages import artifacts
from taiji_jax.stages import rl as rl_stage
from taiji_jax.stages import sasrec as sasrec_stage
from taiji_jax.stages import sft as sft_stage
from taiji_jax.stages import sids as sids_stage
from taiji_jax.testing import runs
from taiji_jax.text import pretrained_vocab
from taiji_jax.train import workdir as workdir_lib

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
  sids_stage.run(
      _config(
          "ml100k_sids.py", **{
              "representation.weights.collaborative": 0.0,
              "quantizers": ("rq_kmeans",),
              "default": "rq_kmeans",
          }), root / "sids")
  sasrec_stage.train_and_evaluate(
      _config("ml100k_sasrec.py", **{"train.num_epochs": 3}), root / "sasrec")
  sft_stage.train_and_evaluate(
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

  with rewards_lib.REWARDS.temporarily("half_nan", factory):
    yield "half_nan"


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
    rl_stage.train_and_evaluate(_nan_config(stages), tmp_path / "strict")
  results = rl_stage.train_and_evaluate(
      _nan_config(stages, max_nonfinite_frac=0.6), tmp_path / "tolerant")
  records = rl_stage.read_metrics(tmp_path / "tolerant")
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert r["reward/nonfinite_rows"] == pytest.approx(0.5)
    assert r["reward/half_nan/nonfinite"] == pytest.approx(0.5)
    assert r["reward/semantic/nonfinite"] == 0.0
    assert np.isfinite(r["loss"]) and r["skipped"] == 0
  for part in ("valid", "test", "test_last"):
    assert all(np.isfinite(v) for v in results[part].values())


def test_bad_settings_are_named(stages, tmp_path):
  with pytest.raises(ValueError, match="objective='ppo': must be one of"):
    rl_stage.train_and_evaluate(
        _config("ml100k_rl.py", objective="ppo",
                sft_workdir=str(stages / "sft")), tmp_path / "a")
  assert not (tmp_path / "a").exists()  # refused before anything is written
  with pytest.raises(ValueError, match="weights for \\['ctr'\\]"):
    rl_stage.train_and_evaluate(
        _config(
            "ml100k_rl.py",
            sft_workdir=str(stages / "sft"),
            weights={
                "semantic": 1.0,
                "ctr": 1.0
            }), tmp_path / "b")
  with pytest.raises(FileNotFoundError, match="not the workdir of a run"):
    rl_stage.train_and_evaluate(
        _config("ml100k_rl.py", sft_workdir=str(tmp_path / "none")),
        tmp_path / "c")


def test_reasoning_rollouts_with_dynamic_sampling_and_the_hit_beam(
    stages, tmp_path):
  """DAPO with think-then-answer rollouts, the beam `hit` reward and
  dynamic sampling (8 groups drawn, the 4 most informative updated on)."""
  config = _config(
      "ml100k_rl.py", "smoke,think,objective=dapo", **{
          "sft_workdir": str(stages / "sft"),
          "rewards": ("hit", "format", "semantic"),
          "weights": {
              "hit": 1.0,
              "format": 1.0,
              "semantic": 1.0
          },
          "rollout.hit_beams": 3,
          "train.keep_groups": 4,
          "train.num_steps": 2,
          "eval.every_steps": 0,
      })
  results = rl_stage.train_and_evaluate(config, tmp_path / "rl")
  records = rl_stage.read_metrics(tmp_path / "rl")
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert 0.0 <= r["think/closed"] <= 1.0
    assert 0.0 <= r["think/length"] <= config.rollout.max_think
    # format = the rationale was closed by the model itself.
    assert r["reward/format/mean"] == pytest.approx(r["think/closed"])
    assert r["weights/hit"] == pytest.approx(1 / 3)
    assert r["skipped"] == 0 and np.isfinite(r["loss"])
  assert results["objective_config"]["eps_high"] == 0.28  # clip-higher
  assert results["test"]["legal_items"] == 1.0


@pytest.mark.slow
def test_rl_from_a_pretrained_llm_rolls_out_and_reasons_in_its_tokenizer(
    stages, tmp_path, monkeypatch):
  """The SFT run of `configs/ml100k_smollm2.py:smoke` (the tiny random
  Llama GGUF: its BPE tokenizer, the SID tokens added after its 300 rows)
  is the policy of plain and of think-then-answer rollouts: both train,
  rank only legal items and measure the rationale in its own tokens."""
  monkeypatch.setenv("TAIJI_MODEL_CACHE_DIR", str(tmp_path / "models"))
  sft = tmp_path / "sft"
  sft_stage.train_and_evaluate(
      _config("ml100k_smollm2.py", sids_workdir=str(stages / "sids")), sft)
  vocab = pretrained_vocab.load_vocab(sft / "vocab")
  assert isinstance(vocab, pretrained_vocab.PretrainedVocab)
  for arg in ("smoke", "smoke,think,objective=dapo"):
    workdir = tmp_path / arg.replace(",", "_").replace("=", "_")
    config = _config(
        "ml100k_rl.py", arg, **{
            "sft_workdir": str(sft),
            "sasrec_workdir": str(stages / "sasrec"),
            "train.num_steps": 2,
            "eval.every_steps": 0,
        })
    results = rl_stage.train_and_evaluate(config, workdir)
    records = rl_stage.read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert results["test"]["legal_items"] == 1.0
    if "think" in arg:
      for r in records:
        assert 0 < r["think/length"] <= config.rollout.max_think
        assert 0.0 <= r["think/closed"] <= 1.0


def test_training_prompts_end_before_each_users_last_training_item(stages):
  from taiji_jax.rl import \
      data as rl_data  # pylint: disable=g-import-not-at-top
  sft_config, data = artifacts.sft_run(stages / "sft")
  config = _config("ml100k_rl.py")
  p = rl_data.training_prompts(config, sft_config, data, pref_len=7)
  train = data.split["train"]
  last = {int(u): s for u, s in zip(train["users"], train["sequences"])}
  levels = data.item_tokens.shape[1]
  for i, u in enumerate(p["users"]):
    seq = last[int(u)]
    # The target is the last training item, never a valid or test one.
    assert p["targets"][i] == seq[-1]
    seen = p["seen"][i][p["seen"][i] > 0]
    np.testing.assert_array_equal(seen, seq[:-1])
    # The prompt ends with the SID of the item just before the target.
    np.testing.assert_array_equal(p["prompts"][i, -levels:],
                                  data.item_tokens[seq[-2]])
    hist = p["pref_histories"][i]
    assert hist.shape == (7,)
    np.testing.assert_array_equal(hist[hist > 0], seq[:-1][-7:])
  parts = rl_data.eval_parts(sft_config, data, pref_len=7)
  for part in ("valid", "test"):
    np.testing.assert_array_equal(parts[part]["users"],
                                  data.split[part]["users"])
    assert parts[part]["pref_histories"].shape[1] == 7


@pytest.mark.slow
def test_pareto_experiment_smoke_writes_table_plots_and_weights(
    stages, tmp_path):
  """`configs/ml100k_pareto.py:smoke` end to end from one SFT run: two fixed
  weights and the three adaptive rules; the gradient rules log their
  gradient statistics, the weights they used, and stay on the simplex."""
  from taiji_jax.studies import pareto  # pylint: disable=g-import-not-at-top
  from taiji_jax.testing import \
      gguf as gguf_testing  # pylint: disable=g-import-not-at-top
  lm_cfg = decoder.DecoderConfig.tiny(vocab_size=300, attention_bias=False)
  judge_lm = tmp_path / "judge_lm.gguf"
  gguf_testing.write_gguf(judge_lm, lm_cfg,
                          decoder.Decoder(lm_cfg, rngs=nnx.Rngs(0)))
  config = config_lib.with_overrides(
      config_lib.load_config_file(CONFIGS / "ml100k_pareto.py", "smoke"), **{
          "sft_workdir": str(stages / "sft"),
          "rl.sasrec_workdir": str(stages / "sasrec"),
          "rl.train.num_steps": 2,
          "rl.judges.names": ("semantic", "preference"),
          "rl.judges.text_encoder.name": "tiny-lm",
          "rl.judges.text_encoder.path": str(judge_lm),
      })
  summary = pareto.run(config, tmp_path)
  # The judge encoder ran once; the other runs read the first one's file.
  assert len(list(tmp_path.glob("seed_0/*/embeddings/judge.npz"))) == 1
  saved = json.loads((tmp_path / "results.json").read_text())
  runs_0 = saved["per_seed"]["0"]
  assert set(runs_0) == {"sft", "fixed_0.00", "fixed_1.00", "popo",
                         "popo_light", "mgda", "gdpo"}
  for name in ("popo", "popo_light", "mgda", "gdpo"):
    w = runs_0[name]["weights"]
    assert len(w["semantic"]) == 2
    for a, b in zip(w["semantic"], w["preference"]):
      assert a + b == pytest.approx(1.0, abs=1e-5) and 0 <= a <= 1
  assert runs_0["fixed_0.00"]["weights"]["semantic"] == [0.0, 0.0]
  records = rl_stage.read_metrics(tmp_path / "seed_0" / "mgda")
  for r in records:
    assert r["grads/norm/semantic"] > 0 and r["grads/norm/preference"] > 0
    assert -1.0 <= r["grads/cos/semantic|preference"] <= 1.0
    # The alignments a_k = <g_k, d> / |d|^2 with the applied direction
    # d = sum_k w_k g_k: sum_k w_k a_k = 1 by construction.
    names = ("semantic", "preference")
    assert sum(r[f"weights/{n}"] * r[f"grads/alignment/{n}"]
               for n in names) == pytest.approx(1.0, rel=1e-3)
    assert all(f"grads/popo_I/{n}" in r for n in names)
  for r in rl_stage.read_metrics(tmp_path / "seed_0" / "popo"):
    # min_weight floors the applied weights; the state is logged beside.
    assert min(r["weights/semantic"], r["weights/preference"]) >= 0.05 - 1e-6
    assert "weights_state/semantic" in r
  assert "grads/norm/semantic" not in rl_stage.read_metrics(
      tmp_path / "seed_0" / "popo_light")[0]
  for name in runs_0:
    for key in ("judge/semantic@1", "judge/preference@1", "label_acc@1"):
      assert np.isfinite(runs_0[name]["test"][key]), (name, key)
    assert -1.0 <= runs_0[name]["test"]["judge/semantic@1"] <= 1.0
    assert 0.0 <= runs_0[name]["test"]["judge/preference@1"] <= 1.0
  table = (tmp_path / "table.md").read_text()
  for name in ("SFT", "fixed_0.00", "popo", "popo_light", "mgda"):
    assert f"| {name} | " in table
  assert "the reference point (0.350, 0.750)" in table
  assert "judge: semantic@1 (SmolLM2) |" in table.splitlines()[0]
  first = table.split("\n\n")[0].splitlines()[2:]
  assert all(c.strip() != "-" for line in first for c in line.split("|"))
  judged = summary["hypervolume_judges"]
  assert judged["metrics"] == ["judge/semantic@1", "judge/preference@1"]
  sft_valid = runs_0["sft"]["valid"]
  assert judged["references"][0] == [sft_valid["judge/semantic@1"],
                                     sft_valid["judge/preference@1"]]
  assert "Hypervolume (x 1e-3) of the held-out judges" in table
  for png in ("front.png", "weights.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
  assert set(summary["hypervolume"]["per_rule"]) == {"popo", "popo_light",
                                                     "mgda", "gdpo"}
  # A finished seed is read back, not trained again.
  log = tmp_path / "seed_0" / "popo" / "metrics.jsonl"
  before = log.read_text()
  as_json = lambda x: json.loads(json.dumps(x))
  assert as_json(pareto.run(config, tmp_path)) == as_json(summary)
  assert list(pareto.finished_seeds(tmp_path)) == [0]
  assert log.read_text() == before


@pytest.mark.slow
def test_rl_made_from_a_retrained_sft_is_made_again(stages, tmp_path):
  """The issue's case: SFT re-trained in place, then RL re-run. RL sets its
  old run aside and trains from the new SFT model; results.json never
  mixes the two."""
  sft_dir, rl_dir = tmp_path / "sft", tmp_path / "rl"
  shutil.copytree(stages / "sft", sft_dir)
  (tmp_path / "sids").symlink_to(stages / "sids")
  rl_config = _config("ml100k_rl.py", sft_workdir=str(sft_dir),
                      sasrec_workdir=str(stages / "sasrec"),
                      **{"train.num_steps": 2, "eval.every_steps": 0})
  first = rl_stage.train_and_evaluate(rl_config, rl_dir)
  assert rl_stage.train_and_evaluate(rl_config, rl_dir)["sft"] == first["sft"]
  assert not (rl_dir / "stale").exists()  # unchanged input: reused
  shutil.rmtree(sft_dir)
  new_sft = sft_stage.train_and_evaluate(
      _config("ml100k_sft.py", **{"train.num_epochs": 1, "seed": 7}), sft_dir)
  again = rl_stage.train_and_evaluate(rl_config, rl_dir)
  for key in ("recall@10", "ndcg@10", "label_acc@1"):
    assert again["sft"]["test"][key] == pytest.approx(new_sft["test"][key])
  assert again["sft"]["test"] != first["sft"]["test"]
  (aside,) = (rl_dir / "stale").iterdir()
  assert "sft: " in (aside / "why.txt").read_text()
  assert json.loads((aside / "results.json").read_text())["sft"] == first["sft"]
  with pytest.raises(workdir_lib.StaleInputs, match="sft: "):
    shutil.rmtree(sft_dir)
    sft_stage.train_and_evaluate(
        _config("ml100k_sft.py", **{"train.num_epochs": 1, "seed": 8}),
        sft_dir)
    rl_stage.train_and_evaluate(
        config_lib.with_overrides(rl_config, on_stale_inputs="error"), rl_dir)

"""RL vs SFT over seeds: the README's "RL alignment" table.

`run(config, workdir)` (`configs/ml100k_rl_table.py`,
`experiments/rl_table.py`, `make rl-table`) does, for every seed s, into
`<workdir>/seed_<s>/`:

  sft/  the SFT stage (`configs/ml100k_sft.py` with seed s);
  rl/   the RL stage from that SFT run (`configs/ml100k_rl.py` with seed s;
        the SASRec reward model and the SIDs are shared by all seeds);

then `<workdir>/results.json` (per-seed test metrics of the SFT model, the
RL model selected on valid and the RL model at its last step, with their
mean and sample standard deviation) and `<workdir>/table.md`. Every stage
resumes or reuses a finished run, so re-running the command continues where
it stopped.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import ml_collections

from taiji_jax import config_lib
from taiji_jax.stages import rl as rl_stage
from taiji_jax.stages import sft as sft_stage
from taiji_jax.train import metric_writer
from taiji_jax.train import workdir as workdir_lib

# (results key, column header) of the table.
TABLE_METRICS = (
    ("reward/semantic@1", "semantic reward@1 (trained)"),
    ("reward/preference@1", "preference reward@1 (trained)"),
    ("judge/semantic@1", "judge: semantic@1 (SmolLM2)"),
    ("judge/preference@1", "judge: preference@1 (item-kNN)"),
    ("label_acc@1", "judge: genre acc@1"),
    ("recall@10", "Recall@10"),
    ("ndcg@10", "NDCG@10"),
)
ROWS = (("sft", "SFT"), ("rl", "RL, best valid step"), ("rl_last",
                                                        "RL, last step"))


def run_seed(config: ml_collections.ConfigDict, root: pathlib.Path,
             seed: int) -> dict[str, dict]:
  """SFT then RL for one seed; {row: test metrics}."""
  sft_config = config_lib.with_overrides(config.sft, seed=seed)
  sft_stage.train_and_evaluate(sft_config, root / "sft")
  rl_config = config_lib.with_overrides(
      config.rl, seed=seed, sft_workdir=str(root / "sft"))
  results = rl_stage.train_and_evaluate(rl_config, root / "rl")
  return {
      "sft": results["sft"]["test"],
      "rl": results["test"],
      "rl_last": results["test_last"],
      "best_step": results["best_step"],
  }


def summarize(per_seed: dict[int, dict]) -> dict[str, Any]:
  """{row: {metric: {"mean", "std" (ddof 1), "values"}}} over the seeds."""
  out = {}
  for row, _ in ROWS:
    tests = [per_seed[s][row] for s in per_seed]
    names = sorted(set.intersection(*(set(t) for t in tests)))
    out[row] = {
        name: workdir_lib.seed_stats(t[name] for t in tests) for name in names
    }
  out["best_steps"] = [per_seed[s]["best_step"] for s in per_seed]
  return out


def format_table(summary: dict[str, Any]) -> str:
  """Markdown, mean ± std over the seeds."""
  return workdir_lib.seed_table([(title, summary[row]) for row, title in ROWS],
                                TABLE_METRICS)


@workdir_lib.one_run_at_a_time
def run(config: ml_collections.ConfigDict,
        workdir: os.PathLike | str) -> dict[str, Any]:
  """Every seed, then results.json and table.md (module docstring)."""
  workdir = pathlib.Path(workdir)
  per_seed = workdir_lib.run_seeds(config, workdir, run_seed)
  summary = summarize(per_seed)
  table = format_table(summary)
  metric_writer.write_json_atomic(workdir / "results.json", {
      "per_seed": per_seed,
      "summary": summary
  })
  (workdir / "table.md").write_text(table + "\n")
  print(table)
  return summary

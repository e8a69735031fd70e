"""The end-to-end pipeline: runs each stage into `<workdir>/<stage>/`.

Stages run in the order of `config.stages`; each writes its own
`results.json` and is resumable on its own (a finished stage re-evaluates or
is skipped). The pipeline then writes `<workdir>/results.json` with every
stage's test and valid metrics and prints them side by side. Stages without
ranking metrics (sids) are listed with their results file. New stages
register in `STAGES`.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from taiji_jax import config_checks as checks
from taiji_jax.evaluate import baselines
from taiji_jax.evaluate import full_ranking
from taiji_jax.stages import artifacts
from taiji_jax.stages import rl as rl_stage
from taiji_jax.stages import sasrec as sasrec_stage
from taiji_jax.stages import sft as sft_stage
from taiji_jax.stages import sids as sids_stage
from taiji_jax.train import metric_writer
from taiji_jax.train import workdir as workdir_lib


def run_popularity(config: ml_collections.ConfigDict,
                   workdir: os.PathLike | str) -> dict[str, Any]:
  """MostPop: the most-interacted unseen items, same split and metrics."""
  workdir_lib.write_or_check_config(workdir, config)
  dataset, split = artifacts.split(config, config.max_len)
  scores = baselines.popularity_scores(split["train"]["sequences"],
                                       dataset.num_items)
  step = jax.jit(
      full_ranking.make_eval_step(
          baselines.constant_score_fn(scores), config.eval.ks,
          config.eval.mask_history))
  results = {
      part:
          full_ranking.evaluate(step, None, split[part], config.eval.batch_size)
      for part in ("valid", "test")
  }
  results["mask_history"] = bool(config.eval.mask_history)
  metric_writer.write_results(workdir, results)
  return results


# Stage name -> (function(config, workdir), config section it reads, the
# section's settings check).
STAGES: dict[str, tuple[Callable, str, Callable]] = {
    "popularity": (run_popularity, "sasrec", sasrec_stage.check_settings),
    "sasrec": (sasrec_stage.train_and_evaluate, "sasrec",
               sasrec_stage.check_settings),
    "sids": (sids_stage.run, "sids", sids_stage.check_settings),
    "sft": (sft_stage.train_and_evaluate, "sft", sft_stage.check_settings),
    "rl": (rl_stage.train_and_evaluate, "rl", rl_stage.check_settings),
}


def check_settings(config: ml_collections.ConfigDict) -> None:
  """Every stage's settings, before the first stage runs or anything is
  written (a typo in the last stage costs nothing).

  Raises:
    ValueError: an unknown stage, or a stage's check (`config_checks`),
      naming `<section>.<key>`, the value and what is allowed.
  """
  unknown = [s for s in config.stages if s not in STAGES]
  if unknown:
    raise checks.ConfigError(f"stages: unknown {unknown}; known: "
                             f"{sorted(STAGES)}.")
  for stage in config.stages:
    _, section, check = STAGES[stage]
    check(config[section], prefix=section)


def reruns(stage_dir: pathlib.Path, since: float) -> list[str]:
  """Why a stage was set aside and made again during this run (its
  `stale/<time>/why.txt` files newer than `since`)."""
  out = []
  for why in sorted(stage_dir.glob("stale/*/why.txt")):
    if why.stat().st_mtime >= since:
      out += why.read_text().splitlines()
  return out


@workdir_lib.one_run_at_a_time(check=check_settings)
def run(config: ml_collections.ConfigDict,
        workdir: os.PathLike | str) -> dict[str, Any]:
  """Runs `config.stages` and returns {stage: results}."""
  workdir = pathlib.Path(workdir)
  summary = {}
  for stage in config.stages:
    fn, section, _ = STAGES[stage]
    start, wall = time.perf_counter(), time.time()
    logging.info("pipeline: stage %s -> %s", stage, workdir / stage)
    results = fn(config[section], workdir / stage)
    seconds = round(time.perf_counter() - start, 1)
    why = reruns(workdir / stage, wall)
    if why:
      logging.warning("pipeline: stage %s was made again, its inputs "
                      "changed: %s", stage, "; ".join(why))
    if "test" in results:  # a recommender with ranking metrics
      summary[stage] = {
          "test": results["test"],
          "valid": results["valid"],
          "seconds": seconds
      }
    else:  # a preparation stage (e.g. sids): its own results file
      summary[stage] = {
          "results": f"{stage}/results.json",
          "seconds": seconds
      }
    if why:
      summary[stage]["rerun_because"] = why
  metric_writer.write_results(workdir, summary)
  print(format_table(summary, config.report_ks))
  return summary


def format_table(summary: dict[str, Any], ks=(5, 10, 20)) -> str:
  """A fixed-width table of test Recall/NDCG per stage."""
  names = [f"{m}@{k}" for m in ("recall", "ndcg") for k in ks]
  header = f"{'model':<12}" + "".join(
      f"{n:>11}" for n in names) + (f"{'seconds':>10}")
  lines = [header, "-" * len(header)]
  ranked = {s: r for s, r in summary.items() if "test" in r}
  for stage, result in ranked.items():
    test = result["test"]
    lines.append(f"{stage:<12}" + "".join(f"{test[n]:>11.4f}" for n in names) +
                 f"{result['seconds']:>10.1f}")
  if ranked:
    users = next(iter(ranked.values()))["test"]["num_users"]
    lines.append(f"(test split, {users} users, full ranking over all items)")
  for stage, result in summary.items():
    if stage not in ranked:
      lines.append(f"{stage}: {result['seconds']:.1f} s, results in "
                   f"{result['results']}")
  return "\n".join(lines)

"""The RL runs a study makes from one SFT model: fixed reward weights and
adaptive weighting rules.

A *spec* (a ConfigDict) names them:

  fixed_semantic_weights  semantic weights w, one `fixed_<w>` run each
                          (preference weight 1 - w);
  adaptive                rule names, one run each, whose overrides of the
                          RL config are `rules.<name>` (`weighting` is the
                          name unless the entry sets it; the weights start
                          at the RL config's `weights`).

`configs/ml100k_pareto.py` holds the rules' settings (POPO's mu and floor
chosen there on a tuning seed); the Pareto experiment and the reasoning
ablation's RL runs (`studies/cot_ablation.py`) both run them with `run`.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

from absl import logging
import ml_collections

from taiji_jax import config_lib
from taiji_jax.stages import rl as rl_stage
from taiji_jax.train import workdir as workdir_lib


def fixed_name(w: float) -> str:
  return f"fixed_{w:.2f}"


def variants(spec: ml_collections.ConfigDict) -> list[tuple[str, dict]]:
  """(name, overrides of the RL config) of every run of `spec`."""
  out = []
  for w in spec.fixed_semantic_weights:
    w = float(w)
    if not 0 <= w <= 1:
      raise ValueError(f"fixed_semantic_weights: {w} is not in [0, 1].")
    out.append((fixed_name(w), {
        "weighting": "fixed",
        "weights.semantic": w,
        "weights.preference": 1.0 - w
    }))
  for name in spec.adaptive:
    if name not in spec.rules:
      raise ValueError(f"adaptive rule {name!r} has no entry in "
                       f"rules (known: {sorted(spec.rules)}).")
    overrides = {"weighting": name,
                 **config_lib.flatten(spec.rules[name].to_dict())}
    out.append((name, overrides))
  names = [n for n, _ in out]
  if len(set(names)) != len(names):
    raise ValueError(f"duplicate variants {names}.")
  return out


def weight_trajectory(workdir: os.PathLike | str,
                      names: Sequence[str]) -> dict[str, list[float]]:
  """{reward: [weight used at step 1, 2, ...]} from an RL run's metrics."""
  records = rl_stage.read_metrics(workdir)
  return {
      n: [float(r[f"weights/{n}"]) for r in records if f"weights/{n}" in r]
      for n in names
  }


def _train(config: ml_collections.ConfigDict,
           workdir: pathlib.Path) -> dict[str, Any]:
  """An RL run's results: read when it finished before (with the same
  config), else trained or resumed."""
  done = workdir / "results.json"
  if done.is_file():
    workdir_lib.write_or_check_config(workdir, config)
    logging.info("%s: finished before, reusing its results", workdir)
    return json.loads(done.read_text())
  return rl_stage.train_and_evaluate(config, workdir)


def run(rl_config: ml_collections.ConfigDict, spec: ml_collections.ConfigDict,
        sft_dir: os.PathLike | str, root: os.PathLike | str,
        seed: int) -> dict[str, Any]:
  """Every run of `spec` from the SFT run `sft_dir`, into `<root>/<name>/`.

  Returns {"sft": the SFT model's {"test", "valid"} (evaluated once, by the
  first run), name: {"test" (the final parameters), "valid",
  "final_weights", "weights" (trajectory), "seconds"}}.
  """
  root = pathlib.Path(root)
  out = {}
  for i, (name, overrides) in enumerate(variants(spec)):
    config = config_lib.with_overrides(
        rl_config,
        seed=seed,
        sft_workdir=str(sft_dir),
        **{"eval.reference_model": i == 0},
        **overrides)
    results = _train(config, root / name)
    if i == 0:
      out["sft"] = {
          "test": results["sft"]["test"],
          "valid": results["sft"]["valid"]
      }
    out[name] = {
        "test": results["test_last"],
        "valid": results["valid"],
        "final_weights": results["final_weights"],
        "weights": weight_trajectory(root / name, results["rewards"]),
        "seconds": results["seconds"],
    }
  return out


def check(rl_config: ml_collections.ConfigDict,
          spec: ml_collections.ConfigDict) -> list[tuple[str, dict]]:
  """`variants(spec)`, each run's RL settings checked before any training
  (errors name the run)."""
  out = variants(spec)
  for name, overrides in out:
    rl_stage.check_settings(
        config_lib.with_overrides(rl_config, **overrides), prefix=f"rl {name}")
  return out

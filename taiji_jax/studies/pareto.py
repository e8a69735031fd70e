"""The Pareto experiment: fixed reward weights against adaptive weighting.

`run(config, workdir)` (`configs/ml100k_pareto.py`, `experiments/pareto.py`,
`make pareto`) does, for every seed s, into `<workdir>/seed_<s>/`:

  sft/         the SFT stage (`config.sft` with seed s; or one given SFT
               run, `config.sft_workdir`, for every seed);
  <variant>/   one RL run from that SFT model per variant: `fixed_<w>` for
               every semantic weight w in `config.fixed_semantic_weights`
               (preference weight 1 - w), and one per adaptive rule in
               `config.adaptive` (its overrides of `config.rl` in
               `config.rules.<name>`; the weights start at 0.5 / 0.5);

and the seed's results in `seed_results.json` (a finished seed is read from
there); then, in `<workdir>/`:

  results.json  per seed and variant the test and valid metrics of the
                final parameters and the weight trajectory; per variant their
                seed mean and sample std; the hypervolumes;
  table.md      the table (mean ± std over seeds);
  front.png     test (semantic reward@1, preference reward@1) of every
                variant, seed means with std bars and the seeds' points,
                the fixed-weight front drawn through the fixed points;
  weights.png   the semantic weight per RL step of the adaptive rules.

The table, the front and the hypervolumes are of `config.split`: "test"
for the reported experiment, "valid" for the tuning run that picks the
rules' settings (`configs/ml100k_pareto.py:tune`, a seed not reported).

Hypervolume (maximising both rewards) is measured against the stated
reference point `config.reference` (semantic, preference): per seed, of the
fixed-weight front alone and of the front with each adaptive point added;
an adaptive rule "extends the front" in a seed when that adds volume, and
"lands on or beyond it" when no fixed point dominates it. The same analysis
is made of the held-out judges (`judge/semantic@1`, `judge/preference@1`,
models the policy never saw) against each seed's SFT model's valid judge
point, so a rule that only games the reward models shows it there. Every stage
resumes or reuses a finished run, so re-running continues where it stopped.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import ml_collections
import numpy as np

from taiji_jax import config_lib
from taiji_jax.evaluate import figures
from taiji_jax.stages import sft as sft_stage
from taiji_jax.studies import rl_table
from taiji_jax.studies import rl_variants
from taiji_jax.train import metric_writer
from taiji_jax.train import workdir as workdir_lib

X_METRIC = "reward/semantic@1"
Y_METRIC = "reward/preference@1"
# The (x, y) metrics of each front: the training rewards, and the held-out
# judges (`taiji_jax.rl.judges`), which the policy never saw.
FRONTS = {
    "rewards": (X_METRIC, Y_METRIC),
    "judges": ("judge/semantic@1", "judge/preference@1"),
}
# The table's columns: the RL-vs-SFT study's.
TABLE_METRICS = rl_table.TABLE_METRICS


def run_seed(config: ml_collections.ConfigDict, root: pathlib.Path,
             seed: int) -> dict[str, Any]:
  """SFT, then every variant's RL run, for one seed."""
  cache = root / "seed_results.json"
  if cache.is_file():  # this seed is done (the experiment's config.json,
    return json.loads(cache.read_text())  # checked by run_seeds, is its own)
  sft_dir = config.sft_workdir
  if not sft_dir:
    sft_dir = root / "sft"
    sft_stage.train_and_evaluate(
        config_lib.with_overrides(config.sft, seed=seed), sft_dir)
  out = rl_variants.run(config.rl, config, sft_dir, root, seed)
  metric_writer.write_json_atomic(cache, out)
  return out


def pareto_front(points) -> np.ndarray:
  """Indices of the non-dominated points (maximising every coordinate).

  p dominates q when p >= q everywhere and p > q somewhere; duplicates keep
  their first copy.
  """
  p = np.asarray(points, np.float64)
  keep = []
  for i in range(len(p)):
    dominated = np.any(
        np.all(p >= p[i], axis=1) & np.any(p > p[i], axis=1))
    duplicate = any(np.array_equal(p[j], p[i]) for j in keep)
    if not dominated and not duplicate:
      keep.append(i)
  return np.asarray(keep, np.int64)


def hypervolume_2d(points, reference) -> float:
  """Area dominated by the points and dominating `reference` (maximising
  both coordinates); points that do not dominate the reference add 0."""
  p = np.asarray(points, np.float64).reshape(-1, 2)
  r = np.asarray(reference, np.float64)
  p = p[np.all(p > r, axis=1)]
  if not len(p):
    return 0.0
  p = p[pareto_front(p)]
  p = p[np.argsort(-p[:, 0])]  # x descending, so y ascending on the front
  area, y_prev = 0.0, r[1]
  for x, y in p:
    area += (x - r[0]) * (y - y_prev)
    y_prev = y
  return float(area)


def dominated_by(point, others) -> list[int]:
  """Indices of `others` that dominate `point`."""
  o = np.asarray(others, np.float64).reshape(-1, 2)
  q = np.asarray(point, np.float64)
  return [
      int(i)
      for i in np.flatnonzero(np.all(o >= q, axis=1) & np.any(o > q, axis=1))
  ]


def gap_to_front(point, front) -> float | None:
  """How far above the front `point` is, vertically: its y minus the
  piecewise-linear front (the non-dominated points of `front`, by x) at its
  x; positive beyond the front, negative behind it; None when x is outside
  the front's x range (no interpolation there)."""
  f = np.asarray(front, np.float64).reshape(-1, 2)
  f = f[pareto_front(f)]
  f = f[np.argsort(f[:, 0])]
  x, y = float(point[0]), float(point[1])
  if not f[0, 0] <= x <= f[-1, 0]:
    return None
  return y - float(np.interp(x, f[:, 0], f[:, 1]))


def _xy(test: dict, metrics=(X_METRIC, Y_METRIC)) -> tuple[float, float]:
  return float(test[metrics[0]]), float(test[metrics[1]])


def judge_references(per_seed: dict[int, dict]) -> dict[int, tuple] | None:
  """Per seed, the judges' hypervolume reference: the SFT model's *valid*
  judge point (fixed before any test metric is read: the area counted is
  where both judges rate the model above the SFT model). None when the
  runs have no judges."""
  out = {}
  for s, runs in per_seed.items():
    valid = (runs["sft"].get("valid") or {})
    if not all(m in valid for m in FRONTS["judges"]):
      return None
    out[s] = _xy(valid, FRONTS["judges"])
  return out


def summarize(config: ml_collections.ConfigDict,
              per_seed: dict[int, dict]) -> dict[str, Any]:
  """Seed statistics per variant and the hypervolume analyses: of the
  training rewards against `config.reference` ("hypervolume") and of the
  judges against `judge_references` ("hypervolume_judges", when there are
  judges)."""
  names = ["sft"] + [n for n, _ in rl_variants.variants(config)]
  split = config.split
  stats = {}
  for name in names:
    tests = [per_seed[s][name][split] for s in per_seed]
    keys = sorted(set.intersection(*(set(t) for t in tests)))
    stats[name] = {
        k: workdir_lib.seed_stats(t[k] for t in tests) for k in keys
    }
  ref = tuple(float(v) for v in config.reference)
  out = {
      "stats":
          stats,
      "hypervolume":
          front_analysis(config, per_seed, FRONTS["rewards"],
                         {s: ref for s in per_seed})
  }
  judge_refs = judge_references(per_seed)
  have_judges = all(
      m in per_seed[s][n][split] for s in per_seed for n in names[1:]
      for m in FRONTS["judges"])
  if judge_refs is not None and have_judges:
    out["hypervolume_judges"] = front_analysis(
        config, per_seed, FRONTS["judges"], judge_refs,
        shared_reference=False)
  return out


def front_analysis(config: ml_collections.ConfigDict,
                   per_seed: dict[int, dict],
                   metrics: tuple[str, str],
                   refs: dict[int, tuple],
                   shared_reference: bool = True) -> dict[str, Any]:
  """Hypervolumes of the `config.split` points on `metrics` against
  `refs[seed]`: of the fixed-weight front, and per adaptive rule of its
  point alone and added to the front (module docstring).
  `shared_reference`: one stated point for every seed ("reference"), else
  a point per seed ("references" only)."""
  fixed = [
      rl_variants.fixed_name(float(w)) for w in config.fixed_semantic_weights
  ]
  split = config.split
  fronts = {
      s: [_xy(per_seed[s][n][split], metrics) for n in fixed]
      for s in per_seed
  }
  distinct = sorted(set(refs.values()))
  if shared_reference and len(distinct) != 1:
    raise ValueError(f"one reference point expected, got {distinct}.")
  hv: dict[str, Any] = {
      "metrics": list(metrics),
      "split": split,
      "reference": distinct[0] if shared_reference else None,
      "references": {int(s): list(r) for s, r in refs.items()},
      "fixed_front": [hypervolume_2d(fronts[s], refs[s]) for s in per_seed],
      "per_rule": {}
  }
  for name in config.adaptive:
    rows = []
    for i, s in enumerate(per_seed):
      front, ref = fronts[s], refs[s]
      point = _xy(per_seed[s][name][split], metrics)
      with_point = hypervolume_2d(front + [point], ref)
      rows.append({
          "seed": int(s),
          "point": point,
          "above_front": gap_to_front(point, front),
          "alone": hypervolume_2d([point], ref),
          "front_with_point": with_point,
          "gain": with_point - hv["fixed_front"][i],
          "dominated_by": [fixed[j] for j in dominated_by(point, front)],
      })
    hv["per_rule"][name] = {
        "seeds": rows,
        "gain": workdir_lib.seed_stats(r["gain"] for r in rows),
        "alone": workdir_lib.seed_stats(r["alone"] for r in rows),
        "above_front": workdir_lib.seed_stats(
            r["above_front"] for r in rows if r["above_front"] is not None),
        "on_or_beyond_front": sum(not r["dominated_by"] for r in rows),
        "extends_front": sum(r["gain"] > 0 for r in rows),
    }
  hv["fixed_front_stats"] = workdir_lib.seed_stats(hv["fixed_front"])
  return hv


def format_table(config: ml_collections.ConfigDict,
                 summary: dict[str, Any]) -> str:
  """Markdown: the metrics table, then the hypervolume table."""
  stats = summary["stats"]
  rows = [("SFT", stats["sft"])]
  rows += [(n, stats[n]) for n, _ in rl_variants.variants(config)]
  table = workdir_lib.seed_table(rows, TABLE_METRICS)
  parts = [table, _hv_table(summary["hypervolume"], "the training rewards")]
  if "hypervolume_judges" in summary:
    parts.append(
        _hv_table(summary["hypervolume_judges"], "the held-out judges"))
  return "\n".join(parts)


def _hv_table(hv: dict[str, Any], what: str) -> str:
  """Markdown of one `front_analysis`."""
  ref = hv["reference"]
  where = (f"the reference point ({ref[0]:.3f}, {ref[1]:.3f})"
           if ref is not None else
           "each seed's SFT model's valid point (" + ", ".join(
               f"seed {s}: ({r[0]:.3f}, {r[1]:.3f})"
               for s, r in hv["references"].items()) + ")")
  fs = hv["fixed_front_stats"]
  n = len(hv["fixed_front"])
  x, y = hv["metrics"]
  milli = lambda st: f"{1e3 * st['mean']:.3f} ± {1e3 * st['std']:.3f}"
  lines = [
      "", f"Hypervolume (x 1e-3) of {what}, {hv['split']} ({x}, {y}), against "
      f"{where}, mean ± std over {n} seeds; the fixed-weight front alone: "
      f"{milli(fs)}.", "",
      "| rule | its point alone | gain when added to the fixed front | "
      "seeds on or beyond the front | seeds extending it | y above the "
      "front at its x (x 1e-3) |", "| --- | --- | --- | --- | --- | --- |"
  ]
  for name, r in hv["per_rule"].items():
    gap = r["above_front"]
    gap = (f"{milli(gap)} ({len(gap['values'])} seeds)"
           if gap["values"] else "- (outside the front's range)")
    lines.append(f"| {name} | {milli(r['alone'])} | {milli(r['gain'])} | "
                 f"{r['on_or_beyond_front']}/{n} | {r['extends_front']}/{n} | "
                 f"{gap} |")
  return "\n".join(lines)


def plot_front(config: ml_collections.ConfigDict, per_seed: dict[int, dict],
               summary: dict[str, Any], path: os.PathLike | str):
  """front.png (module docstring)."""
  fig, ax = figures.new(figsize=(7, 5))
  stats = summary["stats"]
  fixed = [
      rl_variants.fixed_name(float(w)) for w in config.fixed_semantic_weights
  ]
  mean = lambda n: (stats[n][X_METRIC]["mean"], stats[n][Y_METRIC]["mean"])
  std = lambda n: (stats[n][X_METRIC]["std"], stats[n][Y_METRIC]["std"])
  xs, ys = zip(*(mean(n) for n in fixed))
  ax.plot(xs, ys, "-", color="tab:gray", zorder=1, label="fixed weights")
  markers = dict(sft="s", popo="*", popo_light="P", mgda="D", mgda_ub="X")
  for name in ["sft"] + fixed + list(config.adaptive):
    (x, y), (sx, sy) = mean(name), std(name)
    is_fixed = name in fixed
    ax.errorbar(x, y, xerr=sx, yerr=sy, fmt=markers.get(name, "o"),
                color="tab:gray" if is_fixed else None, markersize=9,
                capsize=3, zorder=3,
                label=None if is_fixed else name)
    pts = np.asarray(
        [_xy(per_seed[s][name][config.split]) for s in per_seed])
    ax.scatter(pts[:, 0], pts[:, 1], s=10, alpha=0.4, zorder=2,
               color="tab:gray" if is_fixed else ax.lines[-1].get_color())
    if is_fixed:
      ax.annotate(name.replace("fixed_", "w_sem="), (x, y),
                  textcoords="offset points", xytext=(5, 5), fontsize=8)
  ref = summary["hypervolume"]["reference"]
  ax.set_xlabel(f"{config.split} semantic reward of the top-1 item "
                f"({X_METRIC})")
  ax.set_ylabel(f"{config.split} preference reward of the top-1 item "
                f"({Y_METRIC})")
  ax.set_title(f"{len(per_seed)} seeds (mean ± std, small dots: seeds); "
               f"HV reference ({ref[0]:.2f}, {ref[1]:.2f})", fontsize=9)
  ax.legend(fontsize=8)
  return figures.save(fig, path)


def plot_weights(config: ml_collections.ConfigDict, per_seed: dict[int, dict],
                 path: os.PathLike | str, reward: str = "semantic"):
  """weights.png: `reward`'s weight per RL step of each adaptive rule."""
  fig, ax = figures.new(figsize=(7, 4))
  for name in config.adaptive:
    color = None
    for i, s in enumerate(per_seed):
      w = per_seed[s][name]["weights"].get(reward, [])
      line, = ax.plot(np.arange(1, len(w) + 1), w, color=color, alpha=0.8,
                      label=name if i == 0 else None)
      color = line.get_color()
  ax.axhline(0.5, color="tab:gray", linestyle=":", label="start / equal")
  ax.set_xlabel("RL step")
  ax.set_ylabel(f"weight of the {reward} reward")
  ax.set_ylim(0, 1)
  ax.set_title(f"adaptive weights, {len(per_seed)} seeds (one line each)",
               fontsize=9)
  ax.legend(fontsize=8)
  return figures.save(fig, path)


def report(config: ml_collections.ConfigDict, workdir: os.PathLike | str,
           per_seed: dict[int, dict]) -> dict[str, Any]:
  """results.json, table.md, front.png and weights.png of `per_seed`."""
  workdir = pathlib.Path(workdir)
  summary = summarize(config, per_seed)
  table = format_table(config, summary)
  metric_writer.write_json_atomic(workdir / "results.json", {
      "per_seed": per_seed,
      "summary": summary
  })
  (workdir / "table.md").write_text(table + "\n")
  plot_front(config, per_seed, summary, workdir / "front.png")
  plot_weights(config, per_seed, workdir / "weights.png")
  print(table)
  return summary


def finished_seeds(workdir: os.PathLike | str) -> dict[int, dict]:
  """{seed: results} of the seeds of `workdir` that are done (their
  `seed_results.json`), e.g. to report an experiment still running."""
  out = {}
  for path in sorted(pathlib.Path(workdir).glob("seed_*/seed_results.json")):
    out[int(path.parent.name[len("seed_"):])] = json.loads(path.read_text())
  return dict(sorted(out.items()))


@workdir_lib.one_run_at_a_time
def run(config: ml_collections.ConfigDict,
        workdir: os.PathLike | str) -> dict[str, Any]:
  """Every seed and variant, then the reports (module docstring)."""
  # A bad variant list or RL setting fails before any training.
  rl_variants.check(config.rl, config)
  per_seed = workdir_lib.run_seeds(config, workdir, run_seed)
  return report(config, workdir, per_seed)

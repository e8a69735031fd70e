"""The Pareto experiment's analysis: fronts, hypervolumes, variants."""

import pathlib

import numpy as np
import pytest

from taiji_jax import config_lib
from taiji_jax.studies import pareto
from taiji_jax.studies import rl_variants

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / (
    "ml100k_pareto.py")


def test_pareto_front_keeps_the_non_dominated_points():
  pts = [(1, 5), (2, 4), (2, 2), (3, 1), (1, 5), (0.5, 0.5), (3, 1)]
  assert pareto.pareto_front(pts).tolist() == [0, 1, 3]
  assert pareto.dominated_by((2, 2), pts) == [1]
  assert pareto.dominated_by((3, 1), pts) == []


def test_hypervolume_2d_by_hand_and_by_grid():
  ref = (0.0, 0.0)
  # Staircase: (3,1), (2,2), (1,3) -> 3*1 + 2*1 + 1*1 = 6.
  assert pareto.hypervolume_2d([(1, 3), (3, 1), (2, 2)], ref) == 6.0
  # A dominated point and a point below the reference add nothing.
  assert pareto.hypervolume_2d([(1, 3), (3, 1), (2, 2), (1, 1), (-1, 9)],
                               ref) == 6.0
  assert pareto.hypervolume_2d([], ref) == 0.0
  rng = np.random.default_rng(0)
  pts = rng.uniform(0.2, 1.0, (7, 2))
  r = (0.1, 0.15)
  xs, ys = np.meshgrid(np.linspace(0, 1, 801), np.linspace(0, 1, 801))
  cells = np.stack([xs.ravel(), ys.ravel()], 1)
  covered = np.zeros(len(cells), bool)
  for p in pts:
    covered |= np.all(cells <= p, 1)
  covered &= np.all(cells > r, 1)
  grid = covered.mean()  # the unit square's area is 1
  assert pareto.hypervolume_2d(pts, r) == pytest.approx(grid, abs=5e-3)


def test_variants_and_their_overrides():
  config = config_lib.load_config_file(CONFIG)
  names = [n for n, _ in rl_variants.variants(config)]
  assert names == ["fixed_0.00", "fixed_0.25", "fixed_0.50", "fixed_0.75",
                   "fixed_1.00", "popo", "popo_light", "mgda", "gdpo"]
  overrides = dict(rl_variants.variants(config))
  assert overrides["fixed_0.25"]["weights.preference"] == 0.75
  assert overrides["popo"]["weighting"] == "popo"
  assert overrides["popo"]["weighting_cfg.mu"] == 5e-4
  assert overrides["popo"]["weighting_cfg.min_weight"] == 0.05
  assert overrides["mgda"]["weighting_cfg.normalization"] == "l2"
  assert overrides["gdpo"] == {"weighting": "fixed", "advantage": "gdpo"}
  # Every variant's overrides apply to the RL config.
  for name, o in rl_variants.variants(config):
    config_lib.with_overrides(config.rl, **o)
  config.unlock()
  config.adaptive = ("popo", "mgda_ub")
  assert dict(rl_variants.variants(config))["mgda_ub"]["weighting"] == "mgda"
  config.adaptive = ("gapo",)
  with pytest.raises(ValueError, match="'gapo' has no entry"):
    rl_variants.variants(config)
  config.adaptive = ()
  config.fixed_semantic_weights = (0.5, 1.5)
  with pytest.raises(ValueError, match="1.5 is not in"):
    rl_variants.variants(config)


def test_gap_to_front_interpolates_the_non_dominated_points():
  front = [(1, 3), (3, 1), (2, 0.5)]  # (2, 0.5) is dominated by (3, 1)
  assert pareto.gap_to_front((2, 2.5), front) == pytest.approx(0.5)
  assert pareto.gap_to_front((1.5, 2.0), front) == pytest.approx(-0.5)
  assert pareto.gap_to_front((0.5, 9), front) is None


def test_summary_counts_rules_on_and_beyond_the_front():
  config = config_lib.load_config_file(CONFIG)
  config.unlock()
  config.fixed_semantic_weights = (0.0, 1.0)
  config.adaptive = ("popo", "mgda")
  config.reference = (0.0, 0.0)
  point = lambda x, y: {"test": {pareto.X_METRIC: x, pareto.Y_METRIC: y}}
  per_seed = {
      0: {"sft": point(1, 1), "fixed_0.00": point(1, 3),
          "fixed_1.00": point(3, 1), "popo": point(2, 2),
          "mgda": point(0.5, 0.5)},
      1: {"sft": point(1, 1), "fixed_0.00": point(1, 3),
          "fixed_1.00": point(3, 1), "popo": point(3, 3),
          "mgda": point(1, 2)},
  }
  s = pareto.summarize(config, per_seed)
  hv = s["hypervolume"]
  assert hv["fixed_front"] == [5.0, 5.0]
  popo = hv["per_rule"]["popo"]
  assert [r["gain"] for r in popo["seeds"]] == [1.0, 4.0]
  assert popo["on_or_beyond_front"] == 2 and popo["extends_front"] == 2
  # (2, 2) is on the segment (1, 3)-(3, 1); (3, 3) is at its x
  # range end: at x = 3, 2 above (3, 1).
  assert popo["above_front"]["values"] == [0.0, 2.0]
  mgda = hv["per_rule"]["mgda"]
  assert mgda["on_or_beyond_front"] == 0 and mgda["extends_front"] == 0
  assert mgda["seeds"][0]["dominated_by"] == ["fixed_0.00", "fixed_1.00"]
  assert s["stats"]["popo"][pareto.X_METRIC]["mean"] == 2.5
  table = pareto.format_table(config, s)
  assert "| popo | " in table and "2/2 | 2/2 |" in table
  # mgda: (0.5, 0.5) is left of the front (no gap), (1, 2) 1 below it.
  assert mgda["above_front"]["values"] == [-1.0]


def test_judges_front_and_the_valid_split_of_the_tuning_run():
  config = config_lib.load_config_file(CONFIG)
  config.unlock()
  config.fixed_semantic_weights = (0.0, 1.0)
  config.adaptive = ("popo",)
  config.reference = (0.0, 0.0)
  js, jp = pareto.FRONTS["judges"]

  def point(x, y, jx, jy, valid_shift=0.0):
    m = {pareto.X_METRIC: x, pareto.Y_METRIC: y, js: jx, jp: jy}
    return {"test": m, "valid": {k: v + valid_shift for k, v in m.items()}}

  per_seed = {
      0: {"sft": point(1, 1, 0.1, 0.5), "fixed_0.00": point(1, 3, 0.2, 0.7),
          "fixed_1.00": point(3, 1, 0.3, 0.6), "popo": point(2, 2, 0.4, 0.8)},
  }
  s = pareto.summarize(config, per_seed)
  judged = s["hypervolume_judges"]
  # Against the SFT model's valid judge point (0.1, 0.5).
  assert judged["references"] == {0: [0.1, 0.5]}
  # popo's (0.4, 0.8) dominates the whole fixed judge front.
  assert judged["per_rule"]["popo"]["seeds"][0]["dominated_by"] == []
  assert judged["per_rule"]["popo"]["alone"]["mean"] == pytest.approx(
      0.3 * 0.3)
  table = pareto.format_table(config, s)
  assert "of the held-out judges, test" in table
  assert "seed 0: (0.100, 0.500)" in table
  # The tuning run reads valid: shifted points, same structure.
  config.split = "valid"
  for runs in per_seed.values():
    for name in runs:
      runs[name]["valid"] = {
          k: v + 1.0 for k, v in runs[name]["test"].items()
      }
  v = pareto.summarize(config, per_seed)
  assert v["stats"]["popo"][pareto.X_METRIC]["mean"] == 3.0
  assert v["hypervolume"]["split"] == "valid"
  # Without judge metrics there is no judge analysis.
  for runs in per_seed.values():
    for name in runs:
      runs[name]["valid"].pop(js)
  assert "hypervolume_judges" not in pareto.summarize(config, per_seed)


def test_the_tuning_config_uses_an_unreported_seed_and_valid():
  tune = config_lib.load_config_file(CONFIG, "tune")
  main = config_lib.load_config_file(CONFIG)
  assert not set(tune.seeds) & set(main.seeds)
  assert tune.split == "valid" and main.split == "test"
  overrides = dict(rl_variants.variants(tune))
  popo = [n for n in overrides if n.startswith("popo_")]
  assert len(popo) == 6
  for name in popo:
    assert overrides[name]["weighting"] == "popo"
    config_lib.with_overrides(tune.rl, **overrides[name])

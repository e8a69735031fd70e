"""The SID stage end to end on the smoke config (SASRec -> fused -> SIDs)."""

import json
import pathlib

import numpy as np
import pytest

from taiji_jax import config_lib
from taiji_jax.quantize import semantic_ids as sid_lib
from taiji_jax.stages import artifacts
from taiji_jax.stages import sasrec as sasrec_stage
from taiji_jax.stages import sids as sids_stage

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _smoke(**overrides):
  config = config_lib.load_config_file(CONFIGS / "ml100k_sids.py", "smoke")
  return config_lib.with_overrides(config, progress_bar=False, **overrides)


@pytest.fixture(scope="module")
def sasrec_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pipe") / "sasrec"
  config = config_lib.load_config_file(CONFIGS / "ml100k_sasrec.py", "smoke")
  config.unlock()
  config.progress_bar = False
  config.train.num_epochs = 2
  sasrec_stage.train_and_evaluate(config.lock(), workdir)
  return workdir


@pytest.mark.slow
def test_stage_builds_unique_sids_for_both_quantizers_and_reuses_them(
    sasrec_dir):
  workdir = sasrec_dir.parent / "sids"
  config = _smoke()
  results = sids_stage.run(config, workdir)
  dataset = artifacts.dataset(config)
  assert results["default"] == "rq_vae"
  for name in ("rq_kmeans", "rq_vae"):
    sids = sid_lib.SemanticIds.load(workdir / name, dataset.item_raw_ids)
    assert sids.num_items == dataset.num_items
    assert len(np.unique(sids.codes[1:], axis=0)) == dataset.num_items
    report = results["reports"][name]
    assert report["collision_rate_after"] == 0.0
    assert 0.0 <= report["reconstruction_error"] < 1.0
    assert report["coherence"]["field"] == "category"
    assert json.loads((workdir / name / "report.json").read_text()) == report
  default = sid_lib.SemanticIds.load(workdir, dataset.item_raw_ids)
  np.testing.assert_array_equal(
      default.codes,
      sid_lib.SemanticIds.load(workdir / "rq_vae").codes)
  # Content + collaborative parts were both cached; the fused width is their
  # sum (384 MiniLM dims + the SASRec embedding size).
  assert results["representation"]["dim"] == 384 + 16
  # A re-run reuses the SIDs instead of rebuilding them.
  stamp = (workdir / "rq_vae" / sid_lib.FILE_NAME).stat().st_mtime_ns
  again = sids_stage.run(config, workdir)
  assert again["reports"] == results["reports"]
  assert (workdir / "rq_vae" / sid_lib.FILE_NAME).stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_stage_refuses_a_changed_config_and_missing_sasrec(
    sasrec_dir, tmp_path):
  workdir = sasrec_dir.parent / "sids_hash"
  only_kmeans = {"quantizers": ("rq_kmeans",), "default": "rq_kmeans"}
  sids_stage.run(
      _smoke(**{
          "collisions.method": "hash",
          **only_kmeans
      }), workdir)
  with pytest.raises(ValueError, match="differs in.*collisions.method"):
    sids_stage.run(_smoke(**only_kmeans), workdir)
  with pytest.raises(FileNotFoundError, match="First run the sasrec stage"):
    sids_stage.run(_smoke(**only_kmeans), tmp_path / "sids")
  with pytest.raises(ValueError, match="include sids.default='rq_vae'"):
    sids_stage.run(_smoke(quantizers=("rq_kmeans",)), tmp_path / "other")

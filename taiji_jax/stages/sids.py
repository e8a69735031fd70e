"""The SID stage: item representations -> quantizers -> unique semantic IDs.

Writes into the workdir (re-running reuses everything already there):

  config.json                   guards resumes (a different config is an error)
  embeddings/content.npz        text-encoder embeddings of every item's text,
                                keyed by encoder + a hash of the texts
  embeddings/collaborative.npz  the SASRec item table (when fused)
  <quantizer>/semantic_ids.npz  `SemanticIds` of each built tokenizer
  <quantizer>/report.json       its quality report (collisions, usage, ...)
  <quantizer>/history.jsonl     training curves (RQ-VAE)
  semantic_ids.npz              the default tokenizer's SIDs, which later
                                stages load with `SemanticIds.load(workdir)`
  results.json                  {"default": name, "reports": {name: report}}

The pure parts (fusion, quantizers, collision resolution, reports) live in
`taiji_jax.quantize`; this module only wires them to data and files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from taiji_jax import config_checks as checks
from taiji_jax import data as data_lib
from taiji_jax.quantize import collisions
from taiji_jax.quantize import fusion
from taiji_jax.quantize import quality
from taiji_jax.quantize import rq_kmeans
from taiji_jax.quantize import rq_vae
from taiji_jax.quantize import semantic_ids as sid_lib
from taiji_jax.stages import artifacts
from taiji_jax.text import embedding_cache
from taiji_jax.train import metric_writer
from taiji_jax.train import workdir as workdir_lib

QUANTIZERS = ("rq_kmeans", "rq_vae")


def content_embeddings(config: ml_collections.ConfigDict,
                       dataset: data_lib.Dataset,
                       workdir: pathlib.Path) -> np.ndarray:
  """(num_items, D) text-encoder embeddings of items 1..num_items."""
  texts = [dataset.item_text(i) for i in range(1, dataset.num_items + 1)]
  return embedding_cache.text_embeddings(
      config.representation.text_encoder, texts,
      workdir / "embeddings" / "content.npz", progress=config.progress_bar)


def sasrec_dir(config: ml_collections.ConfigDict,
               workdir: pathlib.Path) -> pathlib.Path:
  return artifacts.upstream_dir(config.representation.sasrec_workdir, workdir,
                                "sasrec")


def upstream(config: ml_collections.ConfigDict,
             workdir: pathlib.Path) -> dict[str, pathlib.Path]:
  """The runs the SIDs are made from: SASRec when its item table is fused."""
  weights = dict(config.representation.weights)
  if weights.get("collaborative", 0) > 0:
    return {"sasrec": sasrec_dir(config, workdir)}
  return {}


def collaborative_embeddings(config: ml_collections.ConfigDict,
                             dataset: data_lib.Dataset,
                             workdir: pathlib.Path) -> np.ndarray:
  """(num_items, D) item table of the SASRec model trained on this data."""
  src = sasrec_dir(config, workdir)
  if not (src / "config.json").is_file():
    raise FileNotFoundError(
        f"collaborative embeddings need a trained SASRec in {src} (no "
        "config.json there); run the sasrec stage first or set "
        "sids.representation.sasrec_workdir")
  key = f"{src.resolve()}|{(src / 'results.json').stat().st_mtime_ns}" if (
      src / "results.json").is_file() else str(src.resolve())

  def compute():
    model, _ = artifacts.checked_sasrec(src, config.dataset.name,
                                        dataset.num_items, "the SIDs")
    return np.asarray(model.item_embed[...])[1:]

  return embedding_cache.cached_array(
      workdir / "embeddings" / "collaborative.npz", key, compute)


def item_representations(config: ml_collections.ConfigDict,
                         dataset: data_lib.Dataset,
                         workdir: pathlib.Path) -> np.ndarray:
  """The fused (num_items, D) embeddings the quantizers see."""
  weights = dict(config.representation.weights)
  getters = {
      "content": content_embeddings,
      "collaborative": collaborative_embeddings
  }
  unknown = set(weights) - set(getters)
  if unknown:
    raise ValueError(f"sids.representation.weights: unknown parts "
                     f"{sorted(unknown)}; known {sorted(getters)}")
  parts = {
      name: getters[name](config, dataset, workdir)
      for name, w in weights.items()
      if w > 0
  }
  return fusion.fuse(parts, weights)


def _relative_error(x: np.ndarray, x_hat: np.ndarray) -> float:
  return float(np.sum((x - x_hat)**2) / np.sum(x**2))


def quantize_rq_kmeans(x: np.ndarray, cfg: ml_collections.ConfigDict, seed: int,
                       workdir: pathlib.Path):
  """RQ-KMeans codes and relative reconstruction error."""
  del workdir
  result = rq_kmeans.fit(
      jax.random.key(seed),
      x,
      tuple(cfg.codebook_sizes),
      iters=cfg.iters,
      balanced=cfg.balanced)
  codes = np.asarray(result.codes)
  x_hat = np.asarray(rq_kmeans.decode(result, codes))
  return codes, tuple(cfg.codebook_sizes), _relative_error(x, x_hat)


def quantize_rq_vae(x: np.ndarray, cfg: ml_collections.ConfigDict, seed: int,
                    workdir: pathlib.Path):
  """RQ-VAE codes and relative reconstruction error; curves to history."""
  fields = {f.name for f in dataclasses.fields(rq_vae.RQVAEConfig)}
  kwargs = {
      k: tuple(v) if isinstance(v, (list, tuple)) else v
      for k, v in cfg.to_dict().items()
      if k in fields
  }
  unknown = set(cfg.to_dict()) - fields
  if unknown:
    raise ValueError(f"sids.rq_vae: unknown fields {sorted(unknown)}; "
                     f"RQVAEConfig has {sorted(fields)}")
  kwargs["seed"] = seed
  model_cfg = rq_vae.RQVAEConfig(input_dim=x.shape[1], **kwargs)
  model, history = rq_vae.train(x, model_cfg)
  out = workdir / "rq_vae"
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "history.jsonl", "w") as f:
    for row in history:
      f.write(json.dumps(row, default=float) + "\n")
  codes = np.asarray(rq_vae.encode(model, x))
  x_hat = np.asarray(rq_vae.reconstruct(model, x))
  return codes, tuple(model_cfg.codebook_sizes), _relative_error(x, x_hat)


_QUANTIZE = {"rq_kmeans": quantize_rq_kmeans, "rq_vae": quantize_rq_vae}


def _labels(dataset: data_lib.Dataset, field: str):
  if not field:
    return None
  if field not in dataset.item_features:
    raise ValueError(f"sids.coherence_field {field!r} is not an item feature "
                     f"of {dataset.name}; it has "
                     f"{sorted(dataset.item_features)}")
  values = dataset.item_features[field][1:]
  return [() if v is None else (v,) if isinstance(v, str) else tuple(v)
          for v in values]


def build_one(name: str, x: np.ndarray, config: ml_collections.ConfigDict,
              dataset: data_lib.Dataset,
              workdir: pathlib.Path) -> dict[str, Any]:
  """Builds (or reuses) one tokenizer's SIDs and report."""
  out = workdir / name
  if (out / sid_lib.FILE_NAME).is_file() and (out / "report.json").is_file():
    sid_lib.SemanticIds.load(out, dataset.item_raw_ids)  # validates
    logging.info("%s: reusing SIDs in %s", name, out)
    return json.loads((out / "report.json").read_text())
  start = time.perf_counter()
  codes, sizes, error = _QUANTIZE[name](x, config[name], config.seed, workdir)
  final, extra = collisions.resolve(
      codes,
      config.collisions.method,
      raw_ids=dataset.item_raw_ids[1:],
      hash_size=config.collisions.hash_size)
  sizes = tuple(sizes) + (extra,)
  padded = np.concatenate([np.full((1, final.shape[1]), -1, np.int32), final])
  sids = sid_lib.SemanticIds(
      padded, sizes, sid_lib.catalogue_fingerprint(dataset.item_raw_ids), {
          "quantizer": name,
          "collisions": config.collisions.method,
          "representation": dict(config.representation.weights),
          "dataset": dataset.name,
      })
  rep = quality.report(codes, final, sizes, error,
                       _labels(dataset, config.coherence_field),
                       config.coherence_field)
  rep["seconds"] = round(time.perf_counter() - start, 2)
  if jax.process_index() == 0:
    sids.save(out)
    metric_writer.write_json_atomic(out / "report.json", rep)
  return rep


def check_settings(config: ml_collections.ConfigDict,
                   prefix: str = "sids") -> None:
  """The settings, before any work (`taiji_jax.config_checks`)."""
  unknown = [q for q in config.quantizers if q not in QUANTIZERS]
  if unknown or config.default not in config.quantizers:
    raise checks.ConfigError(
        f"{prefix}.quantizers={tuple(config.quantizers)} must be from "
        f"{QUANTIZERS} and include {prefix}.default={config.default!r}.")
  parts = set(dict(config.representation.weights)) - {
      "content", "collaborative"
  }
  if parts:
    raise checks.ConfigError(
        f"{prefix}.representation.weights: unknown parts {sorted(parts)}; "
        "known ['collaborative', 'content'].")
  checks.one_of(config, "on_stale_inputs", workdir_lib.ON_STALE, prefix)


@workdir_lib.one_run_at_a_time(check=check_settings)
def run(config: ml_collections.ConfigDict,
        workdir: os.PathLike | str) -> dict[str, Any]:
  """Builds the configured tokenizers; returns {"default", "reports"}."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  for name, src in upstream(config, workdir).items():
    workdir_lib.check_same_setting(config, "dataset", src, name)
  workdir_lib.write_or_check_config(workdir, config)
  workdir_lib.check_inputs(workdir, upstream(config, workdir),
                           config.on_stale_inputs)
  dataset = artifacts.dataset(config)
  x = item_representations(config, dataset, workdir)
  reports = {
      name: build_one(name, x, config, dataset, workdir)
      for name in config.quantizers
  }
  if jax.process_index() == 0:
    shutil.copyfile(workdir / config.default / sid_lib.FILE_NAME,
                    workdir / (sid_lib.FILE_NAME + ".tmp"))
    os.replace(workdir / (sid_lib.FILE_NAME + ".tmp"),
               workdir / sid_lib.FILE_NAME)
  results = {
      "default": config.default,
      "representation": {
          "weights": dict(config.representation.weights),
          "dim": int(x.shape[1])
      },
      "reports": reports,
  }
  metric_writer.write_results(workdir, results)
  print(quality.format_reports(reports))
  return results

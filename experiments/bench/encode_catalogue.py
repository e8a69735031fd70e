r"""Benchmarks encoding a whole item catalogue with the MiniLM text encoder.

  TAIJI_CACHE_DIR=/tmp/taiji_cache .venv/bin/python \
      experiments/bench/encode_catalogue.py --dataset=ml-100k

Encodes `ds.item_text(i)` for every item i = 1..num_items (index 0 is the
padding item) with `taiji_jax.text.load_text_encoder()`. The programs for
the catalogue's (batch, bucketed length) shapes are compiled ahead of time
and timed on their own (`compile_s`); then one first pass (warm-up: first
executions, allocations) and `--repeats` steady passes are timed, and the
throughput is taken from the median steady pass (and the fastest one, a
steadier figure on a shared machine). `wall_s` is the whole run
from dataset loading on. Prints one JSON line (and writes
`<workdir>/encode_catalogue.json` when --workdir is given). Peak memory is
the process's maximum resident set size (host RAM; on CPU it includes the
arrays) and, where the backend reports it, the device's peak.
"""

import json
import os
import pathlib
import platform
import resource
import time

from absl import app
from absl import flags
import jax
import numpy as np

from taiji_jax import launch
from taiji_jax import text
from taiji_jax.data import load_dataset

_DATASET = flags.DEFINE_string("dataset", "ml-100k", "Dataset to encode.")
_MODEL = flags.DEFINE_string("model", "all-MiniLM-L6-v2",
                             "Text encoder name or checkpoint directory.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Texts per forward.")
_LENGTH_MULTIPLE = flags.DEFINE_integer(
    "length_multiple", 8, "Batches are padded to a multiple of this.")
_PRECISION = flags.DEFINE_enum("precision", "highest", ["highest", "default"],
                               "Matmul precision of the forward pass.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steady passes.")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Optional directory for the JSON result.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch.setup()
  wall_start = start = time.perf_counter()
  dataset = load_dataset(_DATASET.value)
  texts = [dataset.item_text(i) for i in range(1, dataset.num_items + 1)]
  data_s = time.perf_counter() - start

  start = time.perf_counter()
  encoder = text.load_text_encoder(
      _MODEL.value,
      precision=None if _PRECISION.value == "default" else "highest",
      length_multiple=_LENGTH_MULTIPLE.value)
  load_s = time.perf_counter() - start

  start = time.perf_counter()
  lengths = np.array([len(ids) for ids in encoder.tokenize(texts)])
  tokenize_s = time.perf_counter() - start
  plan = encoder.plan(lengths, _BATCH_SIZE.value)
  shapes = sorted({shape for _, shape in plan})
  padded_tokens = sum(b * t for _, (b, t) in plan)

  start = time.perf_counter()
  encoder.compile(shapes)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  first = encoder.encode(texts, batch_size=_BATCH_SIZE.value)
  first_s = time.perf_counter() - start
  steady = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    again = encoder.encode(texts, batch_size=_BATCH_SIZE.value)
    steady.append(time.perf_counter() - start)
  if not np.array_equal(first, again):
    raise AssertionError("repeated encoding differs from the first pass.")
  norms = np.linalg.norm(first, axis=1)
  steady_s = float(np.median(steady))
  stats = jax.devices()[0].memory_stats() or {}
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  device_peak = stats.get("peak_bytes_in_use")
  result = dict(
      dataset=dataset.name,
      items=len(texts),
      model=_MODEL.value,
      dim=encoder.dim,
      device=f"{jax.devices()[0].device_kind} x{len(jax.devices())}",
      host=f"{platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} cores",
      batch_size=_BATCH_SIZE.value,
      precision=_PRECISION.value,
      tokens_mean=round(float(lengths.mean()), 1),
      tokens_max=int(lengths.max()),
      padding_overhead=round(padded_tokens / int(lengths.sum()), 3),
      compiled_shapes=[list(shape) for shape in shapes],
      dataset_load_s=round(data_s, 3),
      model_load_s=round(load_s, 3),
      tokenize_s=round(tokenize_s, 4),
      compile_s=round(compile_s, 3),
      first_pass_s=round(first_s, 3),
      steady_pass_s=[round(t, 3) for t in steady],
      steady_pass_s_median=round(steady_s, 3),
      items_per_s=round(len(texts) / steady_s, 1),
      items_per_s_best=round(len(texts) / min(steady), 1),
      tokens_per_s=round(int(lengths.sum()) / steady_s, 1),
      wall_s=round(time.perf_counter() - wall_start, 3),
      norm_min_max=[round(float(norms.min()), 6),
                    round(float(norms.max()), 6)],
      peak_rss_mib=round(peak_rss, 1),
      device_peak_mib=(None if device_peak is None else round(
          device_peak / 2**20, 1)),
      jax=jax.__version__,
  )
  if _WORKDIR.value:
    out = pathlib.Path(_WORKDIR.value)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "encode_catalogue.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)

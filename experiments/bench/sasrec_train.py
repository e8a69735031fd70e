r"""Benchmarks SASRec training: wall time, examples/s, peak memory.

  .venv/bin/python experiments/bench/sasrec_train.py --workdir runs/bench

Times `--epochs` epochs of the given config's training step (no evaluation)
after a warm-up step that includes compilation, and the full-ranking eval
over the valid split. Writes `<workdir>/sasrec_train.json` and prints a
markdown row for the README. Peak memory is the process's maximum resident
set size (host RAM; on CPU that includes the arrays) and, where the backend
reports it, the device's peak bytes in use.
"""

import pathlib
import time
from typing import Any, Mapping

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from taiji_jax import benchmarking
from taiji_jax import launch
from taiji_jax import sharding
from taiji_jax.data import pipeline
from taiji_jax.evaluate import full_ranking
from taiji_jax.stages import artifacts
from taiji_jax.stages import sasrec as sasrec_stage

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(
        pathlib.Path(__file__).resolve().parents[2] / "configs" /
        "ml100k_sasrec.py"),
    "SASRec config.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench", "Output directory.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Timed epochs.")


def markdown_row(r: Mapping[str, Any]) -> str:
  """The README row: device, batch, epoch s, windows/s, target items/s,
  compile + first step s, valid eval s, peak RSS MiB."""
  return (f"| {r['device']} | {r['batch_size']} | {r['epoch_s_median']} | "
          f"{r['windows_per_s']} | {r['target_items_per_s']} | "
          f"{r['compile_and_first_step_s']} | {r['valid_eval_s']} | "
          f"{r['peak_rss_mib']} |")


def main(argv):
  del argv
  launch.setup()
  config = _CONFIG.value
  dataset, split = artifacts.split(config, config.max_len)
  windows = pipeline.training_windows(split["train"]["sequences"],
                                      config.max_len, config.window_stride)
  batch_size = config.train.batch_size
  steps = -(-len(windows["inputs"]) // batch_size)
  targets_per_epoch = int((windows["targets"] > 0).sum())
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rules = tuple(tuple(r) for r in config.sharding_rules)
  t0 = time.perf_counter()
  setup = sasrec_stage.build(
      config, artifacts.sasrec_model_config(config, dataset.num_items),
      steps * _EPOCHS.value, mesh)
  it = iter(
      pipeline.train_batches(windows, batch_size, config.seed,
                             _EPOCHS.value + 1).to_iter_dataset())
  key = jax.random.key(0)
  state = setup.state
  with sharding.use_mesh(mesh, rules):
    state, m = setup.train_step(state, setup.put_batch(next(it)), key)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    epoch_times = []
    for _ in range(_EPOCHS.value):
      start = time.perf_counter()
      for _ in range(steps):
        state, m = setup.train_step(state, setup.put_batch(next(it)), key)
      jax.block_until_ready(m)
      epoch_times.append(time.perf_counter() - start)
    full_ranking.evaluate(setup.eval_step, state["params"], split["valid"],
                          config.eval.batch_size, setup.put_batch)
    start = time.perf_counter()
    full_ranking.evaluate(setup.eval_step, state["params"], split["valid"],
                          config.eval.batch_size, setup.put_batch)
    eval_s = time.perf_counter() - start
  epoch_s = float(np.median(epoch_times))
  result = {
      **benchmarking.environment_fields(mesh.size),
      "dataset": dataset.name,
      "batch_size": batch_size,
      "steps_per_epoch": steps,
      "compile_and_first_step_s": round(compile_s, 2),
      "epoch_s_median": round(epoch_s, 3),
      "windows_per_s": round(steps * batch_size / epoch_s, 1),
      "target_items_per_s": round(targets_per_epoch / epoch_s, 1),
      "valid_eval_s": round(eval_s, 3),
      **benchmarking.memory_fields(),
  }
  benchmarking.write_result(_WORKDIR.value, "sasrec_train", result,
                            markdown_row(result))


if __name__ == "__main__":
  app.run(main)

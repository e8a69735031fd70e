r"""SFT and RL training steps in one or several processes, for the multi-host
test (`tests/test_multihost.py`).

  python -m taiji_jax.testing.multihost --num_processes=2 --process_id=0 \
      --port=12355 --devices=2 --workdir=/tmp/run --out=/tmp/run/p0.json

Each process runs the same program, as on a pod: jax.distributed over a
local coordinator (gloo collectives on the CPU), `--devices` fake CPU
devices of its own, one (data, fsdp) mesh over every process's devices.
Each process gathers only its own rows of every batch (the grain pipelines'
`process_rows`), `train_state.batch_putter` assembles the global arrays,
and `train.fit` runs the loop and writes (orbax, every process) checkpoints
into the shared workdir. What it measured (per-step losses, the final
parameters, RL's reward weights) is written to `--out`; a run with one
process of all the devices must give the same.
"""

from __future__ import annotations

import json
import pathlib

from absl import app
from absl import flags
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from taiji_jax import sharding
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.rl import data as rl_data
from taiji_jax.rl import objectives
from taiji_jax.rl import rewards as rewards_lib
from taiji_jax.rl import rollout as rollout_lib
from taiji_jax.rl import train_step as step_lib
from taiji_jax.rl import weighting
from taiji_jax.sidlm import task
from taiji_jax.testing import decoders
from taiji_jax.testing import sids as sid_testing
from taiji_jax.train import checkpointing
from taiji_jax.train import fit
from taiji_jax.train import metric_writer
from taiji_jax.train import train_state

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_processes", 1, "Processes of the run.")
flags.DEFINE_integer("process_id", 0, "This process.")
flags.DEFINE_integer("port", 0, "The coordinator's port on localhost.")
flags.DEFINE_integer("devices", 4, "Fake CPU devices of this process.")
flags.DEFINE_string("workdir", None, "Shared run directory.")
flags.DEFINE_string("out", None, "Where this process writes its results.")

V = 40  # vocabulary of the tiny decoder
SIZES = (5, 4, 3)  # SID codebooks
OFFSETS = (8, 13, 17)  # their token offsets
NAMES = ("id", "mod5")  # two RL rewards that disagree


def _start_jax(num_processes: int, process_id: int, port: int,
               devices: int) -> None:
  jax.config.update("jax_num_cpu_devices", devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if num_processes > 1:
    jax.distributed.initialize(f"localhost:{port}", num_processes, process_id)


def _host(tree):
  """Host copies of (replicated or sharded) global arrays."""
  return jax.tree.map(
      lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
      tree)


def _fit(workdir, state, shardings, copy_params, train_step, batches,
         num_steps, record=None):
  ckpt = checkpointing.Checkpoints(workdir / "checkpoints")
  state, best, meta, _ = fit.resume(ckpt, state, copy_params(state["params"]),
                                    shardings, fit.initial_meta())
  losses = []

  def logged(window, step, meta):
    losses.append(float(_host(window[-1]["loss"])))
    return record(window, step, meta) if record else {"loss": losses[-1]}

  out = fit.fit(
      state,
      best,
      meta,
      train_step=train_step,
      batches=batches,
      schedule=fit.Schedule(num_steps=num_steps, checkpoint_every=2),
      checkpoints=ckpt,
      writer=metric_writer.MetricWriter(workdir),
      copy_params=copy_params,
      record=logged,
      progress_bar=False)
  ckpt.close()
  return out, losses


def sft_steps(workdir: pathlib.Path, mesh, rules) -> dict:
  """Four SFT steps of a tiny decoder on random rows (two length buckets)."""

  rng = np.random.default_rng(0)
  tokens = rng.integers(1, V, (24, 12)).astype(np.int32)
  tokens[:12, :6] = 0  # left padding: a second length bucket
  rows = {"tokens": tokens, "loss_mask": (tokens > 20).astype(np.int32)}
  config = ml_collections.ConfigDict(
      dict(seed=3, train=dict(batch_size=8, length_bucket=6, num_epochs=2)))
  model_cfg = decoder_lib.DecoderConfig.tiny(vocab_size=V, max_seq_len=16)
  tx = optax.adam(1e-2)
  graphdef, init_state = task.state_init_fn(model_cfg, tx, seed=0)
  state, shardings = train_state.init_sharded(init_state, mesh, rules)
  step_fn = task.jit_train_step(
      task.make_train_step(graphdef, tx, pad_id=0, seed=3), shardings, mesh)
  put = train_state.batch_putter(mesh, rules)
  b = config.train.batch_size
  batches = iter(
      task.train_batches(rows, config, 0, sharding.process_rows(
          mesh, b, rules)).to_iter_dataset())
  with sharding.use_mesh(mesh, rules):
    out, losses = _fit(
        workdir / "sft", state, shardings,
        train_state.params_copier(shardings),
        lambda s, batch, i: step_fn(s, put(batch, b)), batches, 6)
  return {"losses": losses, "params": _host(out.state["params"])}


def rl_steps(workdir: pathlib.Path, mesh, rules) -> dict:
  """Three RL steps (rollouts, MGDA weights, GRPO) of a random policy."""

  graphdef, params = nnx.split(decoders.random_decoder(V, seed=3, std=0.3))
  ids = sid_testing.random_semantic_ids(37, SIZES, seed=1)
  rng = np.random.default_rng(4)
  n, b = 12, 4
  prompts = {
      "prompts": rng.integers(20, V, (n, 5)).astype(np.int32),
      "seen": np.zeros((n, 1), np.int32),
      "targets": np.ones((n,), np.int32),
      "users": np.arange(n, dtype=np.int32),
      "pref_histories": np.zeros((n, 1), np.int32),
  }
  cfg = rollout_lib.RolloutConfig(group_size=4)
  rollout = rollout_lib.make_rollout_fn(
      graphdef, cfg, ids.trie, ids.paths, OFFSETS,
      rewards_lib.make_reward_fn(["format"]), pad_id=0)

  def rollout_and_rewards(params, batch, key):
    roll, _ = rollout(params, params, {}, batch, key)
    items = roll.items.astype(jnp.float32)
    return roll, jnp.stack([items / 37.0, (roll.items % 5) / 4.0], 1)

  tx = optax.sgd(0.1)
  step = step_lib.make_train_step(
      graphdef, tx, cfg, OFFSETS, NAMES, objective="grpo",
      objective_cfg=objectives.defaults("grpo"),
      weight_rule=weighting.make("mgda"), seed=0)
  w0 = weighting.initial_weights(NAMES, [0.5, 0.5])
  init = lambda p: step_lib.init_state(p, tx, w0)
  shardings = sharding.tree_shardings(jax.eval_shape(init, params), mesh,
                                      rules)
  with sharding.use_mesh(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)(params)
  roll_fn = jax.jit(rollout_and_rewards)
  train = jax.jit(step, in_shardings=(shardings, None, None),
                  out_shardings=(shardings, None), donate_argnums=(0,))
  put = train_state.batch_putter(mesh, rules)
  batches = iter(
      rl_data.prompt_batches(prompts, b, 5, 3, sharding.process_rows(
          mesh, b, rules)).to_iter_dataset())

  def rl_step(state, batch, i):
    roll, rewards = roll_fn(state["params"], put(batch, b),
                            jax.random.fold_in(jax.random.key(0), i))
    return train(state, roll, rewards)

  weights = []

  def record(window, step, meta):
    weights.append([float(_host(window[-1][f"weights/{k}"])) for k in NAMES])
    return {}

  with sharding.use_mesh(mesh, rules):
    out, losses = _fit(workdir / "rl", state, shardings,
                       train_state.params_copier(shardings), rl_step, batches,
                       3, record)
  return {
      "losses": losses,
      "weights": weights,
      "params": _host(out.state["params"])
  }


def main(argv) -> None:
  del argv
  _start_jax(FLAGS.num_processes, FLAGS.process_id, FLAGS.port, FLAGS.devices)
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
  rules = sharding.DEFAULT_RULES
  workdir = pathlib.Path(FLAGS.workdir)
  results = {
      "process_count": jax.process_count(),
      "devices": len(jax.devices()),
      "sft": sft_steps(workdir, mesh, rules),
      "rl": rl_steps(workdir, mesh, rules),
  }
  flat = lambda tree: [np.asarray(x).tolist() for x in jax.tree.leaves(tree)]
  for part in ("sft", "rl"):
    results[part]["params"] = flat(results[part]["params"])
  pathlib.Path(FLAGS.out).write_text(json.dumps(results))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)

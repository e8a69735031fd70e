"""Training, early stopping and evaluation of SASRec; resumable.

`train_and_evaluate(config, workdir)` is the whole stage; the absl entry
point `experiments/train_sasrec.py`, the pipeline and notebooks call it; a
later stage opens the trained model with `artifacts.sasrec_scorer`. The workdir holds:

  config.json      the config (a resumed run must use the same one)
  checkpoints/     orbax: train state, best parameters, loop counters and
                   the grain iterator's state, every
                   `checkpoint_every_epochs` epochs and at the end
  metrics.jsonl    per-epoch train loss and valid metrics (process 0)
  results.json     {"valid": {...}, "test": {...}} of the best-valid params

The loop is `train.fit` (evaluation, early stopping, checkpoints, the
non-finite guard). Resume order: the latest checkpoint in
`<workdir>/checkpoints`, else a fresh initialisation from `config.seed`. Data order (grain iterator state), dropout
keys (`fold_in(seed, step)`) and early stopping are all restored, so a run
that is killed and re-run with the same command ends with the same numbers as
one that never stopped.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from absl import logging
from flax import nnx
import jax
import ml_collections
import optax

from taiji_jax import config_checks as checks
from taiji_jax import sharding
from taiji_jax.data import pipeline
from taiji_jax.evaluate import full_ranking
from taiji_jax.models import sasrec
from taiji_jax.stages import artifacts
from taiji_jax.train import checkpointing
from taiji_jax.train import fit
from taiji_jax.train import metric_writer
from taiji_jax.train import optimizer
from taiji_jax.train import train_state
from taiji_jax.train import workdir as workdir_lib


Setup = train_state.Setup


def build(config: ml_collections.ConfigDict, model_cfg: sasrec.SASRecConfig,
          total_steps: int, mesh: jax.sharding.Mesh) -> Setup:
  """Abstract init -> shardings -> sharded init and jitted steps."""
  rules = tuple(tuple(r) for r in config.sharding_rules)
  tx = optimizer.from_config(config, total_steps)

  graphdef = train_state.params_graphdef(
      nnx.eval_shape(lambda: sasrec.SASRec(model_cfg, rngs=nnx.Rngs(params=0))))
  state, state_shardings = train_state.init_sharded(
      train_state.init_fn(
          lambda: sasrec.SASRec(model_cfg, rngs=nnx.Rngs(params=config.seed)),
          tx), mesh, rules)

  def loss_fn(params, batch, rng):
    model = nnx.merge(graphdef, params)
    logits = model(
        batch["inputs"], deterministic=False, rngs=nnx.Rngs(dropout=rng))
    return sasrec.next_item_loss(logits, batch["targets"])

  def train_step(state, batch, key):
    rng = jax.random.fold_in(key, state["step"])
    (loss, count), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state["params"], batch, rng)
    state = train_state.apply_gradients(state, grads, tx)
    metrics = {
        "loss": loss,
        "targets": count,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(state["params"]),
    }
    return state, metrics

  def score_fn(params, histories):
    return sasrec.score(nnx.merge(graphdef, params), histories)

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  jit_train = jax.jit(
      train_step,
      in_shardings=(state_shardings, None, replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,))
  eval_step = jax.jit(
      full_ranking.make_eval_step(score_fn, config.eval.ks,
                                  config.eval.mask_history))
  # The other protocol, reported alongside for comparison with RecBole.
  other_eval_step = jax.jit(
      full_ranking.make_eval_step(score_fn, config.eval.ks,
                                  not config.eval.mask_history))
  return Setup(graphdef, state, state_shardings, jit_train, eval_step,
               other_eval_step, train_state.params_copier(state_shardings),
               train_state.batch_putter(mesh, rules), mesh)


def check_settings(config: ml_collections.ConfigDict,
                   prefix: str = "") -> None:
  """The settings, before any work (`taiji_jax.config_checks`)."""
  checks.epoch_trainer(config, prefix, sizes=("max_len", "window_stride"))


@workdir_lib.one_run_at_a_time(check=check_settings)
def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: os.PathLike | str) -> dict[str, Any]:
  """Trains SASRec with early stopping on valid; returns results.json."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_or_check_config(workdir, config)
  dataset, split = artifacts.split(config, config.max_len)
  logging.info("dataset %s from %s: %s", dataset.name, dataset.source,
               dataset.statistics())
  windows = pipeline.training_windows(split["train"]["sequences"],
                                      config.max_len, config.window_stride)
  batch_size = config.train.batch_size
  steps_per_epoch = -(-len(windows["inputs"]) // batch_size)
  total_steps = steps_per_epoch * config.train.num_epochs
  mesh = sharding.make_mesh(config.mesh.to_dict())
  setup = build(config, artifacts.sasrec_model_config(config, dataset.num_items), total_steps,
                mesh)
  ckpt = checkpointing.Checkpoints(workdir / "checkpoints")
  rules = tuple(tuple(r) for r in config.sharding_rules)
  rows = sharding.process_rows(mesh, batch_size, rules)
  batches = iter(
      pipeline.train_batches(windows, batch_size, config.seed,
                             config.train.num_epochs, rows).to_iter_dataset())
  key = jax.random.key(config.seed)
  state, best_params, meta, _ = fit.resume(
      ckpt, setup.state, setup.copy_params(setup.state["params"]),
      setup.state_shardings, fit.initial_meta())
  writer = metric_writer.MetricWriter(workdir, resume_step=meta["step"])

  def evaluate(params, part):
    return full_ranking.evaluate(setup.eval_step, params, split[part],
                                 config.eval.batch_size, setup.put_batch)

  def train_step(state, batch, step):
    return setup.train_step(state, setup.put_batch(batch, batch_size), key)

  with sharding.use_mesh(mesh, rules):
    out, epochs = fit.fit_epochs(
        config, f"sasrec {dataset.name}", steps_per_epoch, state, best_params,
        meta, train_step=train_step, batches=batches, checkpoints=ckpt,
        writer=writer, copy_params=setup.copy_params,
        evaluate=lambda params: evaluate(params, "valid"))
    state, best_params, meta = out.state, out.best_params, out.meta
    results = {
        "valid":
            evaluate(best_params, "valid"),
        "test":
            evaluate(best_params, "test"),
        **epochs,
        "steps":
            int(state["step"]),
        "dataset": {
            "name": dataset.name,
            "source": dataset.source,
            **dataset.statistics()
        },
        "split":
            split["counts"],
        "mask_history":
            bool(config.eval.mask_history),
        # Test metrics under the other history-masking protocol.
        ("test_history_unmasked"
         if config.eval.mask_history else "test_history_masked"):
            full_ranking.evaluate(setup.second_eval_step, best_params,
                                  split["test"], config.eval.batch_size,
                                  setup.put_batch),
    }
  ckpt.close()
  metric_writer.write_results(workdir, results)
  return results

"""Supervised fine-tuning of the SID decoder on next-item rows; resumable.

`train_and_evaluate(config, workdir)` is the whole stage; the absl entry
point `experiments/train_sft.py` and notebooks call it. It reads the
semantic IDs of the sids stage (`config.sids_workdir`, default
`<workdir>/../sids`) and writes into the workdir:

  config.json      the config (a resumed run must use the same one)
  vocab/           the sentencepiece + SID vocabulary (reused when the texts
                   and codebooks are unchanged)
  checkpoints/     orbax: train state, best parameters, loop counters and
                   the input iterator's state, every
                   `checkpoint_every_epochs` epochs and at the end
  metrics.jsonl    per-epoch train loss and valid metrics (process 0)
  results.json     {"valid": {...}, "test": {...}} of the best-valid params,
                   in the format of the SASRec stage

Training rows are `sidlm.rows.next_item_rows` of the training split (every
training interaction is a target once), plus the optional item-text -> SID
and SID -> title alignment rows, batched by length bucket
(`config.train.length_bucket`) and shuffled every epoch by a numpy RNG
seeded with (seed, epoch); dropout keys are folded from (seed, step), so a
resumed run repeats the uninterrupted one exactly. Evaluation prompts the model with each user's profile and
recent history and ranks items by trie-constrained beam search (beams =
max(ks)) that never returns an item the user has seen, the candidate set of
SASRec's masked full ranking.

The batches are a grain pipeline over steps (`train_batches`: each epoch's
`epoch_plan`), the loop is `train.fit`. Resume order: the latest checkpoint
in `<workdir>/checkpoints` (the data order resumes at the step it was
saved), else a fresh initialisation from `config.seed`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Sequence

from absl import logging
import ml_collections
import numpy as np

from taiji_jax import config_checks as checks
from taiji_jax import sharding
from taiji_jax.evaluate import full_ranking
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.sidlm import task
from taiji_jax.stages import artifacts
from taiji_jax.text import vocab as vocab_lib
from taiji_jax.train import checkpointing
from taiji_jax.train import fit
from taiji_jax.train import metric_writer
from taiji_jax.train import optimizer
from taiji_jax.train import workdir as workdir_lib


def prepare(config: ml_collections.ConfigDict,
            workdir: os.PathLike | str,
            extra_vocab_texts: Callable[[Any], Sequence[str]] | None = None
           ) -> task.Data:
  """Loads the data and SIDs and builds the vocabulary into `workdir`.

  `extra_vocab_texts(dataset)` adds texts to the vocabulary's training
  corpus (e.g. teacher rationales, so reasoning text is not spelt out in
  byte pieces).
  """
  dataset = artifacts.dataset(config)
  sids = artifacts.load_sids(config, workdir, dataset)
  extra = list(extra_vocab_texts(dataset)) if extra_vocab_texts else []
  vocab = task.build_vocab(config, dataset, sids, workdir, extra)
  return artifacts.task_data(config, workdir, vocab, dataset, sids)


def check_settings(config: ml_collections.ConfigDict,
                   prefix: str = "") -> None:
  """The settings, before any work (`taiji_jax.config_checks`)."""
  checks.epoch_trainer(config, prefix, sizes=("max_items", "max_prefix"))
  checks.one_of(config, "on_stale_inputs", workdir_lib.ON_STALE, prefix)
  counts = [k for k in ("rows_per_user", "train.log_every_steps",
                        "train.checkpoint_every_steps", "eval.num_users")
            if k.split(".")[-1] in (config[k.split(".")[0]] if "." in k
                                    else config)]
  checks.positive(config, counts, prefix, allow_zero=counts)
  try:
    optimizer.frozen_patterns(config)
    optimizer.trained_patterns(config)
    if optimizer.new_rows_scale(config) != 1.0 and not task.pretrained(config):
      raise ValueError("train.new_rows_lr_scale applies to the rows a "
                       "pretrained vocabulary adds; set model.pretrained or "
                       "leave it at 1.0.")
    if not config.model.pretrained_weights and not task.pretrained(config):
      raise ValueError("model.pretrained_weights=False takes the tokenizer "
                       "and architecture of model.pretrained; set it or "
                       "leave pretrained_weights at True.")
  except ValueError as e:
    raise checks.ConfigError(f"{prefix + '.' if prefix else ''}{e}") from None


def keep_vocab(workdir: pathlib.Path, vocab) -> None:
  """Saves `vocab` into `<workdir>/vocab` unless it is there: a run trained
  on another run's data holds that vocabulary too, so a later stage (RL,
  an init_from) can read every SFT workdir alone."""
  if not (workdir / "vocab" / vocab_lib.HEADER_FILE).is_file():
    vocab.save(workdir / "vocab")


@workdir_lib.one_run_at_a_time(check=check_settings)
def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: os.PathLike | str,
                       *,
                       data: task.Data | None = None,
                       rows: dict[str, np.ndarray] | None = None,
                       extra_results: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
  """Fine-tunes the decoder with early stopping on valid; results.json.

  Args:
    config: an SFT config (`configs/ml100k_sft.py`).
    workdir: the run's directory (resumes from its checkpoints).
    data: `prepare(config, ...)` output to reuse (default: prepared here).
    rows: the training rows {"tokens", "loss_mask"} (default:
      `training_rows`, the packed next-item rows + alignment rows).
    extra_results: added to results.json (e.g. how the rows were made).

  With `config.init_from` a fresh run starts from the best parameters of
  that SFT workdir (a new optimizer state); resuming ignores it.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  inputs = {"sids": artifacts.sids_dir(config, workdir)}
  workdir_lib.check_same_setting(config, "dataset", inputs["sids"], "sids")
  workdir_lib.write_or_check_config(workdir, config)
  if config.init_from:
    inputs["init_from"] = pathlib.Path(config.init_from)
  workdir_lib.check_inputs(workdir, inputs, config.on_stale_inputs)
  if data is None:
    data = prepare(config, workdir)
  else:
    keep_vocab(workdir, data.vocab)
  dataset, split, sids, vocab = data.dataset, data.split, data.sids, data.vocab
  item_tokens, prefixes, titles = data.item_tokens, data.prefixes, data.titles
  if rows is None:
    rows = task.training_rows(config, dataset, split, vocab, item_tokens, prefixes,
                         titles)
  logging.info("dataset %s: %s; %d training rows of %d tokens, vocab %d",
               dataset.name, dataset.statistics(), len(rows["tokens"]),
               rows["tokens"].shape[1], vocab.size)

  batch_size = config.train.batch_size
  steps_per_epoch = task.num_batches(rows, batch_size, vocab.pad_id,
                                config.train.length_bucket)
  total_steps = steps_per_epoch * config.train.num_epochs
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rules = tuple(tuple(r) for r in config.sharding_rules)
  model_cfg = task.model_config(config, vocab.size)
  setup = task.build(config, model_cfg, total_steps, mesh, sids, vocab, dataset)
  logging.info("decoder %s: %d parameters", model_cfg,
               decoder_lib.count_params(model_cfg))
  ckpt = checkpointing.Checkpoints(workdir / "checkpoints")
  state, best_params, meta, resumed = fit.resume(
      ckpt, setup.state, setup.copy_params(setup.state["params"]),
      setup.state_shardings, fit.initial_meta())
  if not resumed and config.init_from:
    state["params"] = artifacts.sft_best_params(config.init_from, setup, config)
    best_params = setup.copy_params(state["params"])
    logging.info("initialised from the best parameters of %s",
                 config.init_from)
  elif (not resumed and task.pretrained(config) and
        config.model.pretrained_weights):
    state["params"] = task.pretrained_params(config, setup, vocab.size)
    best_params = setup.copy_params(state["params"])
    logging.info("initialised from the pretrained %s (vocabulary grown to "
                 "%d)", task.pretrained(config), vocab.size)
  writer = metric_writer.MetricWriter(workdir, resume_step=meta["step"])
  eval_parts = {
      part:
          task.eval_split(split[part], item_tokens, prefixes, config, vocab.pad_id,
                      titles) for part in ("valid", "test")
  }

  put_eval = task.eval_putter(setup, vocab.pad_id)

  def evaluate(params, part, final=False):
    step = setup.second_eval_step if final else setup.eval_step
    return full_ranking.evaluate(step, params, eval_parts[part],
                                 config.eval.batch_size, put_eval)

  batches = iter(
      task.train_batches(rows, config, vocab.pad_id,
                    sharding.process_rows(mesh, batch_size,
                                          rules)).to_iter_dataset())
  with sharding.use_mesh(mesh, rules):
    out, epochs = fit.fit_epochs(
        config, f"sft {dataset.name}", steps_per_epoch, state, best_params,
        meta, batches=batches, checkpoints=ckpt, writer=writer,
        copy_params=setup.copy_params,
        evaluate=lambda params: evaluate(params, "valid"),
        train_step=lambda state, batch, step: setup.train_step(
            state, setup.put_batch(batch, batch_size)))
    state, best_params, meta = out.state, out.best_params, out.meta
    results = {
        "valid": meta.get("best_valid") or evaluate(best_params, "valid"),
        "test": evaluate(best_params, "test", final=True),
        **epochs,
        "steps": int(state["step"]),
        "dataset": {
            "name": dataset.name,
            "source": dataset.source,
            **dataset.statistics()
        },
        "split": split["counts"],
        "mask_history": True,
        "train_rows": int(len(rows["tokens"])),
        "row_length": int(rows["tokens"].shape[1]),
        "vocab_size": int(vocab.size),
        "num_params": int(decoder_lib.count_params(model_cfg)),
        "sids": workdir_lib.relative(artifacts.sids_dir(config, workdir), workdir),
        "init_from": workdir_lib.relative(config.init_from, workdir),
        **(extra_results or {}),
    }
  ckpt.close()
  metric_writer.write_results(workdir, results)
  return results

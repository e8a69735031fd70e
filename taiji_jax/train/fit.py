"""The one training loop of every trainer (SASRec, SFT, RL): `fit`.

A trainer builds its compiled step, its input pipeline (a grain iterator with
checkpointable state, `taiji_jax.data.pipeline`) and its evaluation, and
hands them to `fit`, which owns everything a loop decides:

  - steps: `schedule.num_steps` calls of `train_step(state, batch, step)`;
  - records: every `log_every` steps one line of metrics.jsonl, the window's
    step metrics averaged as `train/<name>` (or the trainer's own `record`
    hook, e.g. RL's per-step reward statistics and its robustness checks);
  - the non-finite guard: a non-finite `loss` in the window stops the run
    with an error naming the step (unless the trainer's hook owns it);
  - evaluation and selection: every `eval_every` steps and at the last
    step, `evaluate(params)` on valid; a better `metric` makes the current
    parameters the best ones and resets the patience counter; `patience`
    evaluations without improvement end training (0: never);
  - checkpoints: every `checkpoint_every` steps and when done, the train
    state, the best parameters, the loop counters and the input iterator's
    state, so a run killed at any step and re-run ends with the numbers of
    one that never stopped;
  - the progress bar, and the fault injection of the resume tests.

The loop counters (`meta`) are plain JSON: step, best, best_step,
bad_evals, done, best_valid, plus whatever the trainer put in before the
first step (e.g. RL's reference evaluation).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any, Callable, Mapping

from absl import logging
import jax
import numpy as np
import tqdm

from taiji_jax.train import checkpointing
from taiji_jax.train import metric_writer

DATA_ITER = "data_iter"


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When the loop records, evaluates, stops and saves (all in steps).

  Attributes:
    num_steps: steps of a complete run.
    log_every: steps per metrics record (an epoch for the epoch trainers);
      a record also closes at every evaluation and checkpoint step.
    eval_every: steps between valid evaluations, also at the last step; 0:
      no evaluation (the final parameters are the result).
    checkpoint_every: steps between checkpoints (0: only when done).
    patience: evaluations without improvement that end training; 0: never.
    metric: the valid metric that selects the best parameters.
    steps_per_epoch: adds "epoch" to each record when set.
  """
  num_steps: int
  log_every: int = 1
  eval_every: int = 0
  checkpoint_every: int = 0
  patience: int = 0
  metric: str = "ndcg@10"
  steps_per_epoch: int = 0

  def __post_init__(self):
    if self.num_steps < 1 or self.log_every < 1:
      raise ValueError(f"Schedule: num_steps and log_every must be >= 1, "
                       f"got {self}.")
    for name in ("eval_every", "checkpoint_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"Schedule: {name}={getattr(self, name)} must be "
                         ">= 0.")

  def records(self, step: int) -> bool:
    """Whether a metrics record closes after `step`."""
    return (step % self.log_every == 0 or step == self.num_steps or
            self.evaluates(step) or self.saves(step, False))

  def evaluates(self, step: int) -> bool:
    return bool(self.eval_every) and (step % self.eval_every == 0 or
                                      step == self.num_steps)

  def saves(self, step: int, done: bool) -> bool:
    return done or bool(self.checkpoint_every and
                        step % self.checkpoint_every == 0)


def initial_meta(**extra: Any) -> dict[str, Any]:
  """The loop counters of a run that has not started."""
  return {
      "step": 0,
      "best": -float("inf"),
      "best_step": 0,
      "bad_evals": 0,
      "done": False,
      "best_valid": None,
      **extra
  }


def resume(ckpt: checkpointing.Checkpoints, state: Any, best_params: Any,
           state_shardings: Any, meta: dict[str, Any]
          ) -> tuple[Any, Any, dict[str, Any], bool]:
  """(state, best_params, meta, resumed): the latest checkpoint's, or the
  given ones with `meta` (`initial_meta`) when there is none."""
  if ckpt.latest_step() is None:
    return state, best_params, meta, False
  abstract = checkpointing.abstract_like({
      "state": state,
      "best_params": best_params
  }, {
      "state": state_shardings,
      "best_params": state_shardings["params"]
  })
  restored, saved = ckpt.restore(abstract)
  logging.info("resumed from %s at step %d", ckpt.directory, saved["step"])
  return restored["state"], restored["best_params"], saved, True


def maybe_inject_fault(step: int) -> None:
  """Hard-kills the process before `step` if TAIJI_FAULT_KILL_AT_STEP says so.

  Used by the resume tests to simulate a crash or preemption mid-epoch: no
  cleanup runs, exactly as with `kill -9`.
  """
  target = os.environ.get("TAIJI_FAULT_KILL_AT_STEP")
  if target is not None and step == int(target):
    os.kill(os.getpid(), signal.SIGKILL)


def mean_record(window: list[Mapping[str, Any]], step: int) -> dict[str, Any]:
  """The default record: each step metric's mean over the window as
  `train/<name>`; a non-finite loss is an error.

  Raises:
    FloatingPointError: a non-finite `loss` in the window.
  """
  host = jax.device_get(list(window))
  record = {}
  for name in host[0]:
    values = np.asarray([m[name] for m in host], np.float64)
    if name == "loss" and not np.all(np.isfinite(values)):
      raise FloatingPointError(
          f"non-finite training loss in the {len(values)} steps up to step "
          f"{step}: {values.tolist()}; lower config.train.lr or check the "
          "data.")
    record[f"train/{name}"] = float(values.mean())
  return record


@dataclasses.dataclass
class Fitted:
  """What `fit` ends with: the final state, the best parameters (the final
  ones when nothing is evaluated) and the loop counters."""
  state: Any
  best_params: Any
  meta: dict[str, Any]


def fit(state: Any,
        best_params: Any,
        meta: dict[str, Any],
        *,
        train_step: Callable[[Any, Any, int], tuple[Any, Mapping[str, Any]]],
        batches: Any,
        schedule: Schedule,
        checkpoints: checkpointing.Checkpoints,
        writer: metric_writer.MetricWriter,
        copy_params: Callable[[Any], Any],
        evaluate: Callable[[Any], dict[str, float]] | None = None,
        record: Callable[[list, int, dict], dict[str, Any]] | None = None,
        postfix: Callable[[dict, dict], dict[str, str]] | None = None,
        progress: str = "",
        progress_bar: bool = True) -> Fitted:
  """Runs (or continues) training to the end of `schedule`.

  Args:
    state: the train state ({"params", ...}), fresh or resumed.
    best_params: the best parameters so far (a copy, never donated).
    meta: the loop counters (`initial_meta`, or a checkpoint's).
    train_step: (state, host batch, step) -> (state, step metrics); it
      places the batch and may donate `state`.
    batches: an iterator of host batches with `get_state`/`set_state` (a
      grain DatasetIterator); its state is restored from `meta` on resume.
    schedule: `Schedule`.
    checkpoints: where the state is saved.
    writer: the run's metrics.jsonl (opened at the resumed step).
    copy_params: a copy of the parameters that the next step cannot donate.
    evaluate: params -> valid metrics (needed when schedule.eval_every).
    record: (window of step metrics, step, meta) -> the record's training
      entries; default `mean_record`. It may raise to stop the run.
    postfix: (record, meta) -> progress-bar fields.
    progress: the progress bar's label.
    progress_bar: whether to draw it.

  Returns:
    `Fitted`.
  """
  if schedule.eval_every and evaluate is None:
    raise ValueError("fit: schedule.eval_every needs an evaluate function.")
  record = record or (lambda window, step, meta: mean_record(window, step))
  if DATA_ITER in meta:
    batches.set_state(meta[DATA_ITER])
  step = int(meta["step"])
  bar = tqdm.tqdm(
      total=schedule.num_steps,
      initial=step,
      desc=progress,
      unit="step",
      disable=meta["done"] or not progress_bar)
  window, start = [], time.perf_counter()
  while not meta["done"] and step < schedule.num_steps:
    maybe_inject_fault(step)
    state, metrics = train_step(state, next(batches), step)
    window.append(metrics)
    step += 1
    bar.update(1)
    if not schedule.records(step):
      continue
    entry = dict(record(window, step, meta))
    if schedule.steps_per_epoch:
      entry["epoch"] = -(-step // schedule.steps_per_epoch)
    entry["train/seconds"] = time.perf_counter() - start
    meta["step"] = step
    if schedule.evaluates(step):
      t0 = time.perf_counter()
      valid = evaluate(state["params"])
      entry.update({f"valid/{k}": v for k, v in valid.items()})
      entry["valid/seconds"] = time.perf_counter() - t0
      if valid[schedule.metric] > meta["best"]:
        meta.update(best=valid[schedule.metric], best_step=step, bad_evals=0,
                    best_valid=dict(valid))
        best_params = copy_params(state["params"])
      else:
        meta["bad_evals"] += 1
    meta["done"] = step == schedule.num_steps or bool(
        schedule.patience and meta["bad_evals"] >= schedule.patience)
    writer.write(step, entry)
    if postfix is not None:
      bar.set_postfix(postfix(entry, meta))
    if schedule.saves(step, meta["done"]):
      meta[DATA_ITER] = batches.get_state()
      checkpoints.save(step, {"state": state, "best_params": best_params},
                       meta)
    window, start = [], time.perf_counter()
  bar.close()
  if not schedule.eval_every:
    best_params, meta["best_step"] = state["params"], step
  return Fitted(state, best_params, meta)


def epoch_schedule(config: Any, steps_per_epoch: int) -> Schedule:
  """The `Schedule` of an epoch trainer's config (SASRec, SFT): train.*
  num_epochs, patience, checkpoint_every_epochs; eval.every_epochs and
  early_stop_metric. For long epochs (a pretrained model), the optional
  train.log_every_steps and train.checkpoint_every_steps (0 or absent: once
  per epoch, and every checkpoint_every_epochs) log and save within one."""
  t, e = config.train, config.eval
  log_steps = int(t.get("log_every_steps", 0) or 0)
  ckpt_steps = int(t.get("checkpoint_every_steps", 0) or 0)
  return Schedule(
      num_steps=steps_per_epoch * int(t.num_epochs),
      log_every=log_steps or steps_per_epoch,
      eval_every=steps_per_epoch * int(e.every_epochs),
      checkpoint_every=ckpt_steps or
      steps_per_epoch * int(t.checkpoint_every_epochs),
      patience=int(t.patience),
      metric=e.early_stop_metric,
      steps_per_epoch=steps_per_epoch)


def epochs(meta: dict[str, Any], schedule: Schedule) -> dict[str, int]:
  """{"best_epoch", "epochs_run"} of an epoch trainer's loop counters."""
  spe = schedule.steps_per_epoch
  return {
      "best_epoch": -(-int(meta["best_step"]) // spe),
      "epochs_run": -(-int(meta["step"]) // spe)
  }


def fit_epochs(config: Any, label: str, steps_per_epoch: int, state: Any,
               best_params: Any, meta: dict[str, Any], **hooks: Any
              ) -> tuple[Fitted, dict[str, int]]:
  """`fit` on an epoch trainer's `epoch_schedule`, with its progress bar
  (loss, best valid metric); also returns `epochs` of the result.

  `hooks` are fit's train_step, batches, checkpoints, writer, copy_params
  and evaluate.
  """
  schedule = epoch_schedule(config, steps_per_epoch)
  out = fit(
      state,
      best_params,
      meta,
      schedule=schedule,
      postfix=lambda r, m: dict(
          loss=f"{r['train/loss']:.3f}", best=f"{m['best']:.4f}"),
      progress=label,
      progress_bar=config.progress_bar,
      **hooks)
  return out, epochs(out.meta, schedule)

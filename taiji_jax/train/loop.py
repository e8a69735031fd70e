"""The end-of-epoch bookkeeping shared by the trainers (SASRec, SFT).

One function, so every trainer stops on a non-finite loss, evaluates,
early-stops and checkpoints by the same rules:

  - evaluate every `config.eval.every_epochs` epochs and after the last one;
  - a better `valid/<config.eval.early_stop_metric>` resets the patience
    counter, otherwise it grows; done after the last epoch or when
    `config.train.patience` evaluations brought no improvement;
  - checkpoint on evaluated epochs that are multiples of
    `config.train.checkpoint_every_epochs`, and when done.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np


def maybe_inject_fault(step: int) -> None:
  """Hard-kills the process before `step` if TAIJI_FAULT_KILL_AT_STEP says so.

  Used by the resume tests to simulate a crash or preemption mid-epoch: no
  cleanup runs, exactly as with `kill -9`.
  """
  target = os.environ.get("TAIJI_FAULT_KILL_AT_STEP")
  if target is not None and step == int(target):
    os.kill(os.getpid(), signal.SIGKILL)


def finish_epoch(
    config: ml_collections.ConfigDict, meta: dict[str,
                                                  Any], epoch: int, step: int,
    losses: list, start: float, evaluate_valid: Callable[[], dict[str, float]]
) -> tuple[dict[str, float], bool, bool]:
  """Closes epoch `epoch` (0-based); updates `meta` in place.

  Args:
    config: the trainer config (train.*, eval.* fields above).
    meta: the loop counters of `checkpointing.resume_training`.
    epoch: the epoch just trained.
    step: the global step after it.
    losses: the per-step loss arrays of the epoch (device or host).
    start: `time.perf_counter()` at the start of the epoch.
    evaluate_valid: returns the valid metrics of the current parameters.

  Returns:
    (the metrics record to write, whether the valid metric improved — copy
    the parameters as the new best —, whether to save a checkpoint now).

  Raises:
    FloatingPointError: a non-finite training loss.
  """
  losses = np.asarray(jax.device_get(losses))
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(
        f"non-finite training loss at epoch {epoch + 1}, step {step}: "
        f"{losses.tolist()}; lower config.train.lr or check the data.")
  record = {
      "epoch": epoch + 1,
      "train/loss": float(losses.mean()),
      "train/epoch_seconds": time.perf_counter() - start
  }
  evaluated = (epoch + 1) % config.eval.every_epochs == 0 or (
      epoch + 1 == config.train.num_epochs)
  improved = False
  if evaluated:
    t1 = time.perf_counter()
    record.update({f"valid/{k}": v for k, v in evaluate_valid().items()})
    record["valid/seconds"] = time.perf_counter() - t1
    metric = record[f"valid/{config.eval.early_stop_metric}"]
    improved = metric > meta["best"]
    if improved:
      meta.update(best=metric, best_epoch=epoch + 1, bad_evals=0)
    else:
      meta["bad_evals"] += 1
  meta["epoch"] = epoch + 1
  meta["done"] = (
      meta["epoch"] == config.train.num_epochs or
      meta["bad_evals"] >= config.train.patience)
  save = (evaluated and meta["epoch"] % config.train.checkpoint_every_epochs
          == 0) or meta["done"]
  return record, improved, save

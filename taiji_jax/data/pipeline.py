"""Training windows over whole histories, and grain input pipelines.

`training_windows` cuts each user's training sequence into right-aligned
windows of `max_len` so that *every* interaction after the first is a target
exactly once (not only the last `max_len` items of long histories, as the
original SASRec code does). With `stride < max_len`, windows overlap to give
early positions more context, and the loss mask marks each target in one
window only.

`train_batches` is a grain pipeline: a seeded per-epoch shuffle of window
indices, gathered into fixed-shape batches. The window count is padded with
empty (all-zero, fully masked) windows to a multiple of the batch size, so
every epoch has the same number of identical-shape batches (one compile),
and batches never straddle epochs. The iterator's `get_state()` is saved
with each checkpoint and restored with `set_state()`, so a resumed run sees
exactly the batches an uninterrupted run would.

`step_batches` is the same mechanism for trainers whose batches are planned
per epoch (SFT's length buckets, RL's prompt permutations): step s's batch is
`take(plan(epoch)[s - epoch * steps_per_epoch])`, a grain MapDataset over
steps, so every trainer resumes through the same checkpointed iterator
state. `rows` (default: all) is this process's block of each global batch
(`sharding.process_rows`): a process gathers only the rows its devices hold,
and `train_state.batch_putter` assembles the global array from every
process's block.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import grain
import numpy as np


def training_windows(sequences: Sequence[np.ndarray],
                     max_len: int,
                     stride: int | None = None) -> dict[str, np.ndarray]:
  """Cuts sequences into (inputs, targets) windows covering every target.

  For a sequence s_1..s_n the targets are s_2..s_n. Windows end at targets
  n, n - stride, n - 2 * stride, ...; each holds the (up to) `max_len` items
  before its end as inputs and the shifted targets, of which it keeps (the
  rest are set to 0) only its last `stride`: the ones no later window has.

  Args:
    sequences: per-user item sequences in time order.
    max_len: window length L.
    stride: distance between window ends (default: max_len, no overlap).

  Returns:
    {"inputs": (W, L), "targets": (W, L)} int32, right-aligned, 0-padded;
    targets are 0 where the position is padding or masked out.
  """
  stride = max_len if stride is None else stride
  if not 1 <= stride <= max_len:
    raise ValueError(f"stride must be in [1, max_len={max_len}], got "
                     f"{stride}.")
  inputs, targets = [], []
  for seq in sequences:
    seq = np.asarray(seq, np.int32)
    end = len(seq)  # one past the index of the window's last target
    while end >= 2:
      start = max(0, end - 1 - max_len)  # index of the first input
      x = seq[start:end - 1]
      y = seq[start + 1:end].copy()
      # This window owns targets [end - stride, end); earlier ones belong to
      # the next (earlier) window, which ends at end - stride.
      first_target = start + 1
      y[:max(0, end - stride - first_target)] = 0
      row_x = np.zeros(max_len, np.int32)
      row_y = np.zeros(max_len, np.int32)
      row_x[max_len - len(x):] = x
      row_y[max_len - len(y):] = y
      inputs.append(row_x)
      targets.append(row_y)
      end -= stride
  if not inputs:
    return {
        "inputs": np.zeros((0, max_len), np.int32),
        "targets": np.zeros((0, max_len), np.int32)
    }
  return {"inputs": np.stack(inputs), "targets": np.stack(targets)}


def train_batches(arrays: dict[str, np.ndarray],
                  batch_size: int,
                  seed: int,
                  num_epochs: int,
                  rows: slice = slice(None)) -> grain.MapDataset:
  """Epoch-aligned, seeded, fixed-shape batches of row-aligned arrays.

  Args:
    arrays: name -> (W, ...) arrays with the same leading size.
    batch_size: rows per batch.
    seed: shuffle seed; each epoch gets a different permutation.
    num_epochs: epochs to produce.
    rows: the block of each batch to gather (this process's rows).

  Returns:
    A grain MapDataset of dicts of (batch_size, ...) arrays (their `rows`
    block); padding rows are all zeros (masked by the loss, which ignores
    target 0).
  """
  sizes = {k: len(v) for k, v in arrays.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"arrays differ in length: {sizes}.")
  count = next(iter(sizes.values()))
  if count == 0:
    raise ValueError("no training rows: every sequence is shorter than 2.")
  padded = -(-count // batch_size) * batch_size
  table = {
      k: np.concatenate([v,
                         np.zeros((padded - count,) + v.shape[1:],
                                  v.dtype)]) for k, v in arrays.items()
  }

  def gather(indices: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[indices[rows]] for k, v in table.items()}

  return (grain.MapDataset.range(padded).shuffle(
      seed=seed).repeat(num_epochs).batch(batch_size,
                                          batch_fn=np.asarray).map(gather))


def step_batches(num_steps: int, steps_per_epoch: int,
                 plan: Callable[[int], Sequence[Any]],
                 take: Callable[[Any], dict[str, np.ndarray]]
                ) -> grain.MapDataset:
  """Batches of a run whose data order is planned per epoch.

  Args:
    num_steps: steps of the run.
    steps_per_epoch: entries of each epoch's plan that are used.
    plan: epoch -> that epoch's batch descriptions (e.g. index arrays), a
      pure function of the epoch (and the run's seed); cached per epoch.
    take: a batch description -> the host batch (this process's rows).

  Returns:
    A grain MapDataset over steps; its iterator's state is the step, so a
    resumed run continues with exactly the batch an uninterrupted run would.
  """
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")
  planned = functools.lru_cache(maxsize=2)(plan)

  def batch(step: int) -> dict[str, np.ndarray]:
    epoch, pos = divmod(int(step), steps_per_epoch)
    return take(planned(epoch)[pos])

  return grain.MapDataset.range(num_steps).map(batch)


def eval_batches(split: dict[str, np.ndarray], batch_size: int):
  """Yields fixed-shape batches of an eval split plus a validity mask.

  The last batch is padded with all-zero rows (`valid` False), so one
  compiled eval step serves every batch. Every array of the split with one
  row per user is batched ("histories", "targets", "seen_items", "users",
  and e.g. a second model's histories).
  """
  n = len(split["targets"])
  keys = [
      k for k, v in split.items()
      if isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == n
  ]
  for start in range(0, n, batch_size):
    batch = {}
    for key in keys:
      chunk = split[key][start:start + batch_size]
      pad = batch_size - len(chunk)
      batch[key] = np.concatenate(
          [chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    batch["valid"] = np.arange(batch_size) < (n - start)
    yield batch

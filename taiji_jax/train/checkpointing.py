"""Orbax checkpoints of a train state plus JSON metadata, with resume.

Each checkpoint step holds two items: `state`, any pytree of arrays (model
parameters, optimizer state, best parameters so far), restored onto the
shardings of an abstract target; and `meta`, a JSON dict (epoch, early
stopping bookkeeping, the grain iterator state). Orbax writes into a
temporary directory and renames it on commit, so a run killed mid-save leaves
the previous checkpoint intact and the partial one is ignored.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """Keeps the newest `max_to_keep` checkpoints of a run in `directory`."""

  def __init__(self, directory: os.PathLike | str, max_to_keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=False,
            create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True)
    self._manager.wait_until_finished()

  def restore(self,
              abstract_state: Any,
              step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores (state, meta); `abstract_state` carries target shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}.")
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or abstract) with `shardings`."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
      shardings)


def resume_training(ckpt: "Checkpoints", state: Any, best_params: Any,
                    state_shardings: Any) -> tuple[Any, Any, dict, bool]:
  """The training state to continue from: the latest checkpoint or `state`.

  Returns:
    (state, best_params, meta, resumed); `meta` holds the loop counters
    (epoch, best valid metric, its epoch, evaluations without improvement,
    done) plus whatever the trainer saved with them; on a resume it is the
    saved meta as it was (a step-based trainer saves its own counters).
  """
  meta = {
      "epoch": 0,
      "best": -1.0,
      "best_epoch": 0,
      "bad_evals": 0,
      "done": False
  }
  if ckpt.latest_step() is None:
    return state, best_params, meta, False
  abstract = abstract_like({
      "state": state,
      "best_params": best_params
  }, {
      "state": state_shardings,
      "best_params": state_shardings["params"]
  })
  restored, meta = ckpt.restore(abstract)
  logging.info("resumed from %s at step %d (meta %s)", ckpt.directory,
               int(restored["state"]["step"]), meta)
  return restored["state"], restored["best_params"], meta, True

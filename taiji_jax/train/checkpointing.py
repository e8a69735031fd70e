"""Orbax checkpoints of a train state plus JSON metadata, with resume.

Each checkpoint step holds two items: `state`, any pytree of arrays (model
parameters, optimizer state, best parameters so far), restored onto the
shardings of an abstract target; and `meta`, a JSON dict (epoch, early
stopping bookkeeping, the grain iterator state). Orbax writes into a
temporary directory and renames it on commit, so a run killed mid-save leaves
the previous checkpoint intact and the partial one is ignored.

Every committed step is verified on restore: after a save, the SHA-256 of
each of its files is written to `digests/<step>.json` beside the steps;
`restore` checks the newest step against it and, if a file differs, is
missing or cannot be read (a flipped byte, a truncated or emptied file, a
step committed without its digest by a crash), logs the path and falls back
to the newest intact step. Only when no step is intact does it raise, with
every step's problem listed, so damaged values are never restored.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from taiji_jax.data import fetch


DIGESTS = "digests"


class CheckpointCorrupt(RuntimeError):
  """No checkpoint step of a run is intact."""


def step_digests(step_dir: pathlib.Path) -> dict[str, str]:
  """{relative path: SHA-256} of every file of a checkpoint step."""
  return {
      str(p.relative_to(step_dir)): fetch.sha256(p)
      for p in sorted(step_dir.rglob("*"))
      if p.is_file()
  }


class Checkpoints:
  """Keeps the newest `max_to_keep` checkpoints of a run in `directory`,
  each verified by its stored digests on restore (module docstring)."""

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
    if jax.process_index() == 0:
      self._write_digest(step)

  def _step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def _digest_path(self, step: int) -> pathlib.Path:
    return self.directory / DIGESTS / f"{step}.json"

  def _write_digest(self, step: int) -> None:
    path = self._digest_path(step)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(step_digests(self._step_dir(step)), indent=0))
    os.replace(tmp, path)
    kept = {str(s) for s in self._manager.all_steps()}
    for old in path.parent.glob("*.json"):
      if old.stem not in kept:
        old.unlink()

  def _set_aside(self, steps) -> None:
    """Moves damaged steps to `damaged/` (kept for inspection, out of
    orbax's sight), so the resumed run can save those steps again."""
    if jax.process_index() == 0:
      aside = self.directory / "damaged"
      aside.mkdir(exist_ok=True)
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for s in steps:
        if self._step_dir(s).exists():
          os.replace(self._step_dir(s), aside / f"{s}-{stamp}")
        if self._digest_path(s).exists():
          os.replace(self._digest_path(s), aside / f"{s}-{stamp}.json")
    self._manager.reload()

  def verify(self, step: int) -> str | None:
    """None if step's files match their digests, else what is wrong."""
    step_dir = self._step_dir(step)
    digest = self._digest_path(step)
    if not digest.is_file():
      return f"{digest} is missing (the step cannot be verified)"
    try:
      want = json.loads(digest.read_text())
    except (OSError, ValueError) as e:
      return f"{digest} is unreadable: {e}"
    got = step_digests(step_dir) if step_dir.is_dir() else {}
    bad = sorted(f for f in set(want) | set(got) if want.get(f) != got.get(f))
    if bad:
      return (f"{len(bad)} file(s) differ from their digests, e.g. "
              f"{step_dir / bad[0]}")
    return None

  def restore(self,
              abstract_state: Any,
              step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores (state, meta); `abstract_state` carries target shardings.

    Without `step`, the newest intact step: damaged newer ones are logged
    (path and problem) and skipped. With `step`, that step or an error.

    Raises:
      FileNotFoundError: no checkpoint at all.
      CheckpointCorrupt: no candidate step is intact (each one's problem is
        listed).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if step is not None:
      steps = [step]
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}.")
    problems = []
    for s in steps:
      problem = self.verify(s)
      if problem is None:
        try:
          restored = self._manager.restore(
              s,
              args=ocp.args.Composite(
                  state=ocp.args.StandardRestore(abstract_state),
                  meta=ocp.args.JsonRestore()))
        except Exception as e:  # pylint: disable=broad-except
          # orbax / tensorstore raise many types for unreadable data.
          problem = f"restore failed: {type(e).__name__}: {e}"[:500]
        else:
          if problems:
            logging.warning(
                "%s: restored step %d; newer steps are damaged: %s",
                self.directory, s, "; ".join(problems))
            self._set_aside([d for d in steps if d > s])
          return restored["state"], dict(restored["meta"])
      problems.append(f"step {s}: {problem}")
      logging.warning("%s: checkpoint step %d is damaged: %s", self.directory,
                      s, problem)
    raise CheckpointCorrupt(
        f"{self.directory}: no intact checkpoint; " + "; ".join(problems) +
        ". Move the checkpoints directory aside to start the run over.")

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or abstract) with `shardings`."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
      shardings)

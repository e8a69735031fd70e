"""Guarded multi-host initialisation for the entry points."""

import os

from absl import logging
import jax


def maybe_initialize() -> None:
  """Calls jax.distributed.initialize() on multi-host runs only.

  Runs when TAIJI_DISTRIBUTED=1 is set, or automatically on TPU pod slices
  (detected from the TPU worker environment); single-host runs skip it.
  """
  on_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
  if os.environ.get("TAIJI_DISTRIBUTED") == "1" or on_pod:
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(),
                 jax.process_count())

"""What every entry point does first: multi-host init and quiet logs."""

import logging as py_logging
import os

from absl import logging
import jax


class _DropLibraryInfo(py_logging.Filter):
  """Drops INFO chatter of orbax (a dozen lines per checkpoint save)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    noisy = "/orbax/" in record.pathname.replace(os.sep, "/")
    return not (noisy and record.levelno < py_logging.WARNING)


def setup() -> None:
  """Initialises jax.distributed on multi-host runs and filters log noise.

  jax.distributed.initialize() runs when TAIJI_DISTRIBUTED=1 is set, or
  automatically on TPU pod slices (several TPU worker hosts); single-host
  runs skip it.
  """
  logging.get_absl_handler().addFilter(_DropLibraryInfo())
  on_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if os.environ.get("TAIJI_DISTRIBUTED") == "1" or on_pod:
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(),
                 jax.process_count())

"""What every entry point does first: multi-host init and quiet logs."""

import logging as py_logging
import os
import sys
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from taiji_jax import config_checks
from taiji_jax.train import workdir as workdir_lib

# Errors of the user's making: one line, not a traceback.
USER_ERRORS = (config_checks.ConfigError, workdir_lib.WorkdirBusy,
               workdir_lib.StaleInputs)


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


def entry_point(run: Callable[[Any, str], Any],
                default_config: str,
                doc: str = "Experiment config.") -> None:
  """The whole body of a thin absl entry point.

  Defines `--config` (an ml_collections config file, locked, so a misspelt
  override is an error) and the required `--workdir`, then runs
  `run(config, workdir)` after `setup()`. A user error (a refused setting,
  a busy workdir, a stale upstream run) is printed as one line and exits
  with status 2; `--debug` shows its traceback instead.
  """
  config = config_flags.DEFINE_config_file(
      "config", default_config, doc, lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Experiment directory.")
  debug = flags.DEFINE_bool("debug", False,
                            "Raise user errors with their traceback.")
  flags.mark_flags_as_required(["workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup()
    try:
      run(config.value, workdir.value)
    except USER_ERRORS as e:
      if debug.value:
        raise
      logging.debug("user error", exc_info=True)
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(main)

"""Shared pytest setup: 8 fake CPU devices, a shared compilation cache.

Must run before any JAX backend is initialised, hence at conftest import.

The persistent compilation cache (`.pytest_cache/jax_compilation`, also
inherited by the entry points the end-to-end tests start in subprocesses)
lets the many runs that compile the same programs — an uninterrupted run
and its killed twin, the sub-runs of an ablation, test after test on the
same tiny models — compile each program once per test session. It changes
no result: a cached executable is the one XLA would compile again.
"""

import os
import pathlib

_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / (
    "jax_compilation")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_num_cpu_devices", 8)

"""Shared pytest setup: 8 fake CPU devices for sharding tests.

Must run before any JAX backend is initialised, hence at conftest import.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_num_cpu_devices", 8)

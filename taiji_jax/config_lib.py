"""Helpers for `configs/*.py` files (big_vision-style `get_config(arg)`).

`parse_arg("smoke,seed=3", smoke=False, seed=0)` turns the string after the
colon in `--config configs/x.py:smoke,seed=3` into a typed ConfigDict: a bare
name sets a boolean to True, `key=value` is converted to the default's type,
and an unknown key is an error.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'a,b=2' against typed defaults; unknown keys are errors."""
  out = ml_collections.ConfigDict(defaults)
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    key, eq, value = token.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: "
                       f"{sorted(defaults)}.")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value.")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} is not a bool.")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value)
  return out


def load_config_file(path: str | pathlib.Path,
                     arg: str | None = None) -> ml_collections.ConfigDict:
  """Imports a config file by path and calls its `get_config(arg)`."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"taiji_config_{path.stem}",
                                                path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"cannot import config file {path}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"a.b.c": leaf} of a nested dict (the keys `with_overrides` takes)."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def with_overrides(config: ml_collections.ConfigDict,
                   **dotted: Any) -> ml_collections.ConfigDict:
  """A locked copy of `config` with `a.b.c=value` fields replaced.

  For notebooks and tests: `with_overrides(c, **{"train.lr": 1e-3})`. An
  unknown key is an error, as with `--config.a.b.c` on the command line.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in dotted.items():
    target = config
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    if last not in target:
      raise KeyError(f"config has no field {key!r}")
    target[last] = value
  return config.lock()

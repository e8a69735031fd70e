"""One registry mechanism for everything chosen by name in a config.

Rewards, RL objectives and reward-weighting rules are each a `Registry`:
an entry is a value (a function or a factory) with the defaults that go
with it (an objective's paper hyper-parameters and advantage kind, a
rule's combine mode and gradient normalisation), registered once, next to
its definition:

  OBJECTIVES = registry.Registry("objective")
  OBJECTIVES.add("grpo", grpo, config=ObjectiveConfig(...), advantage="std")

  REWARDS = registry.Registry("reward")
  @REWARDS.register("semantic")
  def semantic(...): ...

`get(name)` raises one error naming the kind, the name and every known
name; `defaults(name)` is the entry's defaults (a copy). Tests add an entry
for the length of a block with `temporarily`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator


class Registry:
  """Named values of one kind, each with its defaults."""

  def __init__(self, kind: str):
    self.kind = kind
    self._values: dict[str, Any] = {}
    self._defaults: dict[str, dict[str, Any]] = {}

  def add(self, name: str, value: Any, **defaults) -> Any:
    """Registers `value` as `name` with `defaults`; returns `value`.

    Raises:
      ValueError: `name` is registered already.
    """
    if name in self._values:
      raise ValueError(f"{self.kind} {name!r} is registered twice.")
    self._values[name] = value
    self._defaults[name] = dict(defaults)
    return value

  def register(self, name: str, **defaults) -> Callable[[Any], Any]:
    """Decorator form of `add`."""
    return lambda value: self.add(name, value, **defaults)

  def get(self, name: str) -> Any:
    """The value registered as `name`.

    Raises:
      ValueError: naming the kind, `name` and the known names.
    """
    if name not in self._values:
      raise ValueError(f"unknown {self.kind} {name!r}; known: "
                       f"{self.names()}.")
    return self._values[name]

  def defaults(self, name: str) -> dict[str, Any]:
    """A copy of the defaults `name` was registered with."""
    self.get(name)
    return dict(self._defaults[name])

  def names(self) -> list[str]:
    """The registered names, in registration order."""
    return list(self._values)

  def __contains__(self, name: object) -> bool:
    return name in self._values

  def __iter__(self) -> Iterator[str]:
    return iter(self._values)

  def __len__(self) -> int:
    return len(self._values)

  @contextlib.contextmanager
  def temporarily(self, name: str, value: Any, **defaults):
    """Registers an entry for the duration of the block (tests)."""
    self.add(name, value, **defaults)
    try:
      yield value
    finally:
      del self._values[name]
      del self._defaults[name]

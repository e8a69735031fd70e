"""Meshes, logical-axis rules and sharding helpers.

Parameters are annotated with *logical* axis names when they are created,
`nnx.Param(w, logical_axes=("embed", "mlp"))`; a rules table (in the config)
maps each logical name to mesh axes of a `(data, fsdp, tensor)` mesh. The
same model code thus runs unsharded on one CPU, data-parallel on a GPU host,
or FSDP x tensor-parallel on a TPU pod, by changing only the config.

Logical names used across the codebase:
  batch     examples in a batch              vocab    token / item table rows
  length    sequence positions               embed    model width
  mlp       feed-forward hidden width        heads    attention (query) heads
  kv        per-head width                   kv_heads key/value heads (GQA)
  (others: replicated)

A dimension is only sharded over mesh axes whose total size divides it;
otherwise that dimension is replicated (e.g. 1,683 MovieLens item rows on a
2-way tensor axis), so odd vocabulary sizes never make a config unusable.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator, Mapping, Sequence

from flax import nnx
import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("length", None),
)


class _Context(threading.local):
  rules: Rules = DEFAULT_RULES


_context = _Context()


def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh with `AxisType.Auto` axes.

  Args:
    shape: mesh axis -> size; one size may be -1 (all remaining devices).
      None means all devices on `data`.
    devices: devices to use (default: all).

  Raises:
    ValueError: unknown axis names or sizes that do not multiply to the
      number of devices.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = dict(shape or {"data": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} are not in {MESH_AXES}.")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shape}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {shape} does not divide {len(devices)} devices.")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs "
                     f"{math.prod(sizes)} devices, have {len(devices)}.")
  return jax.make_mesh(
      tuple(sizes),
      MESH_AXES,
      axis_types=(AxisType.Auto,) * len(MESH_AXES),
      devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | None = None) -> Iterator[Mesh]:
  """Sets the mesh (jax.set_mesh) and the logical rules for `constrain`."""
  previous = _context.rules
  _context.rules = tuple(rules) if rules is not None else DEFAULT_RULES
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _context.rules = previous


def logical_to_spec(logical_axes: Sequence[str | None],
                    shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None,
                    rules: Rules | None = None) -> P:
  """Maps logical axis names to a PartitionSpec under the rules.

  Mesh axes already used by an earlier dimension are not reused, and, when
  `shape` and `mesh` are given, mesh axes that do not divide a dimension are
  dropped for it (that dimension is replicated).
  """
  table = dict(rules if rules is not None else _context.rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if axes and shape is not None and mesh is not None:
      if shape[dim] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """NamedShardings for a pytree of (abstract) arrays and nnx Variables.

  Variables carrying `logical_axes` metadata are sharded by the rules;
  everything else (scalars, optimizer counters, norms) is replicated. Works
  for model state and for optax states built from it, whose moment trees
  keep the parameters' metadata.
  """

  def one(x):
    if _is_variable(x):
      axes = x.get_metadata().get("logical_axes")
      value = x.get_value()
      if not hasattr(value, "ndim"):
        # No array inside: e.g. optax's MaskedNode, the moment slot of a
        # frozen parameter (`train.optimizer`), an empty pytree.
        return x
      if axes is None:
        return x.replace(NamedSharding(mesh, P()))
      if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match shape "
                         f"{value.shape}.")
      return x.replace(
          NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules)))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree, is_leaf=_is_variable)


def data_sharding(mesh: Mesh,
                  ndim: int,
                  rules: Rules | None = None,
                  shape: Sequence[int] | None = None) -> NamedSharding:
  """Sharding of a batch array: leading axis on the `batch` rule."""
  axes = ("batch",) + (None,) * (ndim - 1)
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def process_rows(mesh: Mesh,
                 rows: int,
                 rules: Rules | None = None) -> slice:
  """The block of a global batch of `rows` rows that this process's devices
  hold under the batch sharding (all rows in a single-process run).

  Raises:
    ValueError: this process's rows are not one contiguous block (a mesh
      whose batch axes interleave processes).
  """
  spec = data_sharding(mesh, 1, rules, (rows,))
  held = sorted({(s[0].start or 0, rows if s[0].stop is None else s[0].stop)
                 for s in spec.addressable_devices_indices_map(
                     (rows,)).values()})
  end = held[0][0]
  for start, stop in held:
    if start != end:
      raise ValueError(f"process {jax.process_index()} holds rows {held} of "
                       "the batch: not one block; order the mesh devices by "
                       "process.")
    end = stop
  return slice(held[0][0], end)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_to_spec(logical_axes, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)

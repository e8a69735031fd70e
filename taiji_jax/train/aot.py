"""Ahead-of-time memory check of the SFT train step, without any parameters.

`train_step_memory(model_cfg, mesh, rules, batch_size, seq_len)` answers
"does this model, at this batch and sequence length, fit on this mesh?"
before a single weight is allocated: the train state is built abstractly
(`jax.eval_shape`), its shardings come from the parameters' logical axes
(`sharding.tree_shardings`), and the very train step the SFT trainer runs
(`task.make_train_step` + `task.jit_train_step`, state donated) is lowered on
`jax.ShapeDtypeStruct` inputs that carry those shardings and compiled. XLA's
`memory_analysis()` of the compiled SPMD program then gives the bytes each
device needs.

Because only compilation is needed, a pod-sized mesh can be checked on a
laptop with fake CPU devices (`jax.config.update("jax_num_cpu_devices", N)`
before the backend starts; `experiments/aot_memory.py --fake_cpu_devices`).
The CPU compiler's scheduling and fusion differ from the GPU/TPU ones, so
temp bytes there are an estimate of the accelerator figure, and a high one
under FSDP: for Llama-3.2-1B on 8 fake CPU devices (fsdp 8, batch 8) the
temps are 9.2 GiB at 128 tokens and 13.1 GiB at 1,024, remat or not, i.e.
about the full f32 parameters and gradients (2 x 4.6 GiB) per device rather
than one gathered layer at a time. The state bytes are exact on any backend.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import optax

from taiji_jax import sharding
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.sidlm import task

_MEMORY_FIELDS = {
    "argument_bytes": "argument_size_in_bytes",
    "output_bytes": "output_size_in_bytes",
    "temp_bytes": "temp_size_in_bytes",
    "generated_code_bytes": "generated_code_size_in_bytes",
    "alias_bytes": "alias_size_in_bytes",
}


def shard_bytes(abstract_tree: Any, shardings: Any) -> int:
  """Bytes one device holds of a pytree: each leaf's shard shape x itemsize.

  With uneven shardings this is the largest shard (what the busiest device
  holds).
  """
  leaves = jax.tree.leaves(abstract_tree)
  specs = jax.tree.leaves(shardings)
  if len(leaves) != len(specs):
    raise ValueError(f"{len(leaves)} leaves but {len(specs)} shardings.")
  total = 0
  for leaf, spec in zip(leaves, specs):
    shape = spec.shard_shape(leaf.shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _tree_bytes(abstract_tree: Any) -> int:
  return sum(
      math.prod(x.shape) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(abstract_tree))


def _memory(compiled) -> dict[str, Any]:
  """Per-device byte counts of `compiled.memory_analysis()`, or why not."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError) as e:
    return {"memory_analysis": f"unavailable: {type(e).__name__}: {e}"}
  if stats is None:
    return {"memory_analysis": "unavailable: the backend returned None"}
  out: dict[str, Any] = {"memory_analysis": "ok"}
  for name, attr in _MEMORY_FIELDS.items():
    value = getattr(stats, attr, None)
    out[name] = int(value) if value is not None else None
  parts = [out[k] for k in ("argument_bytes", "output_bytes", "temp_bytes")]
  if all(p is not None for p in parts):
    out["peak_bytes"] = sum(parts) - (out["alias_bytes"] or 0)
  else:
    out["peak_bytes"] = None
  return out


def _flops(compiled) -> float | None:
  """Total flops of the compiled program (per device for SPMD), if known."""
  try:
    cost = compiled.cost_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def abstract_batch(mesh: jax.sharding.Mesh, rules: sharding.Rules | None,
                   batch_size: int, seq_len: int) -> dict[str, Any]:
  """`{"tokens", "loss_mask"}` ShapeDtypeStructs sharded on the batch axes."""
  shape = (batch_size, seq_len)
  spec = sharding.data_sharding(mesh, 2, rules, shape)
  return {
      "tokens": jax.ShapeDtypeStruct(shape, np.int32, sharding=spec),
      "loss_mask": jax.ShapeDtypeStruct(shape, np.bool_, sharding=spec),
  }


def train_step_memory(
    model_cfg: decoder_lib.DecoderConfig,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules | None,
    batch_size: int,
    seq_len: int,
    tx: optax.GradientTransformation | None = None,
    pad_id: int = 0,
    compiler_options: dict[str, Any] | None = None) -> dict[str, Any]:
  """Compiles the SFT train step abstractly; returns per-device memory.

  Args:
    model_cfg: the decoder.
    mesh: the (data, fsdp, tensor) mesh to compile for.
    rules: logical-axis rules (None: `sharding.DEFAULT_RULES`).
    batch_size: global batch B (sharded on the `batch` rule's axes when
      they divide it).
    seq_len: tokens per row T (the model runs on T - 1 inputs).
    tx: the optimizer; default `optax.adamw(1e-4)` (two f32-shaped moments
      per parameter, in the parameters' dtype).
    pad_id: padding id of the rows.
    compiler_options: XLA options for `compile`, e.g.
      {"xla_backend_optimization_level": 0} for faster CPU compiles in tests
      (it changes code generation, not the buffer assignment).

  Returns:
    A JSON-able dict. Byte fields are per device: `state_bytes` (params +
    optimizer state + step, from the shard shapes), `params_bytes`,
    `opt_state_bytes`, and from XLA's memory analysis `argument_bytes`,
    `output_bytes`, `temp_bytes`, `generated_code_bytes`, `alias_bytes`
    and `peak_bytes` = argument + output + temp - alias (donated state is
    aliased to the output). `memory_analysis` is "ok", or says why these are
    missing (then they are absent). Also `num_params`, `mesh` (axis ->
    size), `num_devices`, `flops_per_device` (XLA cost analysis; None if
    unavailable), `state_bytes_total` (unsharded) and the shapes.
  """
  rules = tuple(rules) if rules is not None else sharding.DEFAULT_RULES
  tx = tx if tx is not None else optax.adamw(1e-4)
  graphdef, init_state = task.state_init_fn(model_cfg, tx, seed=0)
  abstract_state = jax.eval_shape(init_state)
  state_shardings = sharding.tree_shardings(abstract_state, mesh, rules)
  state_in = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state, state_shardings)
  batch_in = abstract_batch(mesh, rules, batch_size, seq_len)
  step = task.jit_train_step(
      task.make_train_step(graphdef, tx, pad_id), state_shardings, mesh)
  with sharding.use_mesh(mesh, rules):
    compiled = step.lower(state_in, batch_in).compile(compiler_options)

  params_bytes = shard_bytes(abstract_state["params"],
                             state_shardings["params"])
  opt_bytes = shard_bytes(abstract_state["opt_state"],
                          state_shardings["opt_state"])
  state_bytes = shard_bytes(abstract_state, state_shardings)
  return {
      "num_params": int(decoder_lib.count_params(model_cfg)),
      "mesh": {
          k: int(v) for k, v in mesh.shape.items()
      },
      "num_devices": int(mesh.size),
      "platform": mesh.devices.flat[0].platform,
      "batch_size": int(batch_size),
      "seq_len": int(seq_len),
      "dtype": model_cfg.dtype,
      "param_dtype": model_cfg.param_dtype,
      "remat": bool(model_cfg.remat),
      "state_bytes": state_bytes,
      "params_bytes": params_bytes,
      "opt_state_bytes": opt_bytes,
      "state_bytes_total": _tree_bytes(abstract_state),
      **_memory(compiled),
      "flops_per_device": _flops(compiled),
  }

"""The train state shared by the trainers: build it sharded, step it.

A train state is {"params", "opt_state", "step"}. Every trainer builds it
the same way (abstract first, then sharded: `jax.eval_shape` of the init,
shardings from the parameters' logical axes, `jax.jit(init,
out_shardings=...)`), applies one optax update per step, places host
batches on the mesh and keeps a copy of the best parameters. These are
those shared pieces; the trainers add their model and loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from taiji_jax import sharding


@dataclasses.dataclass
class Setup:
  """Everything compiled for one run: model structure, steps, shardings.

  `second_eval_step` is the trainer's other evaluation: SFT's with the
  format check (its final test evaluation), SASRec's under the other
  history-masking protocol (reported beside, for comparison with RecBole).
  """
  graphdef: Any
  state: Any
  state_shardings: Any
  train_step: Any
  eval_step: Any
  second_eval_step: Any
  copy_params: Any
  put_batch: Any
  mesh: Any


def params_graphdef(abstract_model: nnx.Module) -> Any:
  """The graphdef of a model that must hold only parameters.

  Raises:
    ValueError: the model holds other state (it would not be saved).
  """
  graphdef, _, rest = nnx.split(abstract_model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"{type(abstract_model).__name__} must hold only "
                     "parameters; found other state.")
  return graphdef


def init_fn(make_model: Callable[[], nnx.Module],
            tx: optax.GradientTransformation) -> Callable[[], dict]:
  """`init_state()` -> {"params", "opt_state", "step": 0} of a new model."""

  def init_state():
    params = nnx.state(make_model(), nnx.Param)
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32)
    }

  return init_state


def init_sharded(init_state: Callable[[], dict], mesh: jax.sharding.Mesh,
                 rules: sharding.Rules) -> tuple[dict, Any]:
  """(state, state_shardings): shardings from the abstract state, then the
  state initialised directly into them (no unsharded copy)."""
  shardings = sharding.tree_shardings(jax.eval_shape(init_state), mesh, rules)
  with sharding.use_mesh(mesh, rules):
    state = jax.jit(init_state, out_shardings=shardings)()
  return state, shardings


def apply_gradients(state: dict, grads: Any,
                    tx: optax.GradientTransformation) -> dict:
  """One optax update of `state` with `grads`; the step counter + 1."""
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  return {
      "params": optax.apply_updates(state["params"], updates),
      "opt_state": opt_state,
      "step": state["step"] + 1
  }


def batch_putter(mesh: jax.sharding.Mesh, rules: sharding.Rules):
  """`put(batch, rows=None)`: a host batch onto the batch sharding.

  With `rows` None the batch is the global one and this process keeps its
  block (`sharding.process_rows`); with `rows` set the batch is already this
  process's block of a global batch of `rows` rows (the training pipelines
  gather only their own rows). Each process contributes its block and
  `jax.make_array_from_process_local_data` assembles the global array; in a
  single-process run this is a plain device_put.
  """

  blocks = {}  # global rows -> this process's block (same every batch)

  def put(batch: dict, rows: int | None = None) -> dict:
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      total = len(v) if rows is None else int(rows)
      global_shape = (total,) + v.shape[1:]
      spec = sharding.data_sharding(mesh, v.ndim, rules, global_shape)
      if rows is None:
        if total not in blocks:
          blocks[total] = sharding.process_rows(mesh, total, rules)
        v = v[blocks[total]]
      out[k] = jax.make_array_from_process_local_data(spec, v, global_shape)
    return out

  return put


def params_copier(state_shardings: Any):
  """A jitted copy of the parameters (the best-so-far snapshot), so the
  donated train state never aliases it."""
  return jax.jit(
      lambda p: jax.tree.map(jnp.copy, p),
      out_shardings=state_shardings["params"])

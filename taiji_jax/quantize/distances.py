"""Distances and nearest-centroid assignment over row blocks (k-means core).

`pairwise_sq_dists` (matmul expansion), `map_row_blocks` (apply a function
over fixed-size row blocks so 1M x 384 points never hold more than
chunk * K distances at once), `assign` (nearest centroid), and the input
checks shared by the k-means functions. Re-exported by `kmeans`.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Rows per block in `assign`; the distance block is DEFAULT_CHUNK x K floats.
DEFAULT_CHUNK = 4096


def check_matrix(name: str, a: jax.Array) -> None:
  if a.ndim != 2:
    raise ValueError(f"{name} must be 2-D, got shape {tuple(a.shape)}.")


def as_float(a) -> jax.Array:
  a = jnp.asarray(a)
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def is_concrete(a) -> bool:
  return not isinstance(a, jax.core.Tracer)


def check_points(x_nd, k: int | None = None, name: str = "x_nd") -> None:
  """Raises ValueError on a bad point matrix; a no-op on tracers.

  Checks that `x_nd` is 2-D with at least one row, that every row is finite
  (naming how many are not and the first such index) and, when `k` is given,
  that there are at least `k` points and at least `k` distinct points (k-means
  with more clusters than distinct points leaves duplicate centroids).

  Args:
    x_nd: (N, D) points.
    k: number of clusters that will be fitted, or None.
    name: how to call the array in messages.
  """
  x_nd = jnp.asarray(x_nd)
  if x_nd.ndim != 2:
    raise ValueError(f"{name} must be 2-D (N, D), got shape "
                     f"{tuple(x_nd.shape)}.")
  n = x_nd.shape[0]
  if n == 0 or x_nd.shape[1] == 0:
    raise ValueError(f"{name} is empty, shape {tuple(x_nd.shape)}.")
  if k is not None:
    if k < 1:
      raise ValueError(f"k must be >= 1, got k={k}.")
    if k > n:
      raise ValueError(f"k={k} clusters need at least k points, got N={n}.")
  if not is_concrete(x_nd):
    return
  finite_n = np.asarray(jnp.isfinite(x_nd).all(axis=1))
  if not finite_n.all():
    bad = np.flatnonzero(~finite_n)
    raise ValueError(f"{name} has {bad.size} of {n} rows with NaN or inf "
                     f"values; the first is row {bad[0]}.")
  if k is not None and k > 1:
    distinct = _count_distinct_rows_at_least(x_nd, k)
    if distinct < k:
      raise ValueError(f"k={k} exceeds the number of distinct points "
                       f"({distinct}) among N={n} points.")


def _count_distinct_rows_at_least(x_nd: jax.Array, k: int) -> int:
  """Counts distinct rows, cheaply when there are clearly at least k.

  A random projection maps distinct rows to (almost surely) distinct
  numbers and equal rows to equal ones, so the number of distinct projections
  is a lower bound computed in O(N D); only when that bound is below k do we
  pay for an exact `np.unique(axis=0)`.
  """
  rng = np.random.default_rng(0)
  proj_d = jnp.asarray(rng.standard_normal(x_nd.shape[1]), x_nd.dtype)
  hashes_n = np.asarray(x_nd @ proj_d)
  lower = np.unique(hashes_n).size
  if lower >= k:
    return lower
  return int(np.unique(np.asarray(x_nd), axis=0).shape[0])


def pairwise_sq_dists(x_nd: jax.Array, c_kd: jax.Array) -> jax.Array:
  """Squared Euclidean distances (N, K) as ||x||^2 - 2 x.c + ||c||^2.

  The expansion turns the work into one matmul (run at full float32
  precision so that TPU/GPU defaults of bf16/tf32 passes do not flip
  argmins); cancellation can make it slightly negative, hence the clamp.
  """
  x_nd, c_kd = as_float(x_nd), as_float(c_kd)
  check_matrix("x_nd", x_nd)
  check_matrix("c_kd", c_kd)
  if x_nd.shape[1] != c_kd.shape[1]:
    raise ValueError(f"x_nd has dim {x_nd.shape[1]} but c_kd has dim "
                     f"{c_kd.shape[1]}.")
  x2_n1 = jnp.sum(x_nd * x_nd, axis=1, keepdims=True)
  c2_1k = jnp.sum(c_kd * c_kd, axis=1)[None, :]
  xc_nk = jnp.matmul(x_nd, c_kd.T, precision=lax.Precision.HIGHEST)
  return jnp.maximum(x2_n1 - 2.0 * xc_nk + c2_1k, 0.0)


def map_row_blocks(fn, rows, chunk: int):
  """Applies `fn` to blocks of `chunk` rows and stitches the outputs.

  `rows` is a pytree of arrays sharing the leading dim N; `fn` maps a block
  (the same pytree with leading dim chunk) to a pytree of arrays with leading
  dim chunk. Blocks run in a `lax.fori_loop` reading with
  `lax.dynamic_slice`; the last block starts at N - chunk and so overlaps
  its predecessor, recomputing a few rows with identical results. That
  avoids padding (a copy of the whole input, 1.5 GB for 1M x 384 floats)
  while keeping every block the same static shape.
  """
  leaves = jax.tree.leaves(rows)
  n = leaves[0].shape[0]
  chunk = max(1, min(int(chunk), n))
  num_blocks = -(-n // chunk)
  if num_blocks == 1:
    return fn(rows)
  block_shapes = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((chunk,) + a.shape[1:], a.dtype), rows)
  out_shapes = jax.eval_shape(fn, block_shapes)
  outs = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape[1:], s.dtype),
                      out_shapes)

  def body(i, outs):
    start = jnp.minimum(i * chunk, n - chunk)
    block = jax.tree.map(
        lambda a: lax.dynamic_slice_in_dim(a, start, chunk, axis=0), rows)
    res = fn(block)
    return jax.tree.map(
        lambda o, r: lax.dynamic_update_slice_in_dim(o, r, start, axis=0), outs,
        res)

  return lax.fori_loop(0, num_blocks, body, outs)


@functools.partial(jax.jit, static_argnames=("chunk",))
def assign(x_nd: jax.Array,
           c_kd: jax.Array,
           chunk: int = DEFAULT_CHUNK) -> tuple[jax.Array, jax.Array]:
  """Nearest centroid of every point, computed over row blocks.

  Args:
    x_nd: (N, D) points.
    c_kd: (K, D) centroids.
    chunk: rows per block; peak extra memory is chunk * K floats.

  Returns:
    codes_n: (N,) int32 index of the nearest centroid (lowest index on ties).
    sq_dist_n: (N,) squared distance to it.
  """
  x_nd, c_kd = as_float(x_nd), as_float(c_kd)
  check_matrix("x_nd", x_nd)
  check_matrix("c_kd", c_kd)

  def block(xb_cd):
    d_ck = pairwise_sq_dists(xb_cd, c_kd)
    codes_c = jnp.argmin(d_ck, axis=1).astype(jnp.int32)
    return codes_c, jnp.take_along_axis(d_ck, codes_c[:, None], axis=1)[:, 0]

  return map_row_blocks(block, x_nd, chunk)

"""Residual quantisation shared by RQ-KMeans and the RQ-VAE.

Given L codebooks (level l holds K_l vectors of dim D), a vector is encoded
greedily: level 1 picks the codeword nearest to x, level 2 the codeword
nearest to what is left (the residual), and so on; its code is the tuple of
picked indices and its reconstruction the sum of the picked codewords
(TIGER Sec. 3.1, OneRec's RQ-Kmeans). Levels may have different sizes, e.g.
256/256/256 or GR4AD's shrinking multi-resolution 1024/256/64.

Both functions are pure and jit-able; the codebooks are a tuple (a pytree),
so `jax.jit(residual_encode, static_argnames="chunk")` works directly.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from taiji_jax.quantize import kmeans


def _check_codebooks(codebooks: Sequence[jax.Array],
                     dim: int | None) -> tuple[jax.Array, ...]:
  codebooks = tuple(jnp.asarray(cb) for cb in codebooks)
  if not codebooks:
    raise ValueError("need at least one codebook, got none.")
  for level, cb_kd in enumerate(codebooks):
    if cb_kd.ndim != 2 or cb_kd.shape[0] < 1:
      raise ValueError(f"codebook {level} must be 2-D (K, D) with K >= 1, "
                       f"got shape {tuple(cb_kd.shape)}.")
    if dim is not None and cb_kd.shape[1] != dim:
      raise ValueError(f"codebook {level} has dim {cb_kd.shape[1]}, "
                       f"expected {dim}.")
  return codebooks


def residual_encode(
    codebooks: Sequence[jax.Array],
    x_nd: jax.Array,
    chunk: int = kmeans.DEFAULT_CHUNK
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Greedy residual quantisation of `x_nd` with the given codebooks.

  Args:
    codebooks: L arrays, level l of shape (K_l, D).
    x_nd: (N, D) vectors.
    chunk: rows per block of the nearest-codeword search.

  Returns:
    codes_nl: (N, L) int32, codes_nl[:, l] indexes codebooks[l].
    quantized_nd: (N, D) sum of the picked codewords, added in the same
      order as `residual_decode(codebooks, codes_nl)` does.
    residual_norms_l1: (L + 1,) mean L2 norm of the residual before each
      level and, last, after the last level (entry 0 is the mean norm of x).
  """
  x_nd = jnp.asarray(x_nd)
  if x_nd.ndim != 2:
    raise ValueError(f"x_nd must be 2-D (N, D), got shape "
                     f"{tuple(x_nd.shape)}.")
  x_nd = x_nd.astype(jnp.promote_types(x_nd.dtype, jnp.float32))
  codebooks = _check_codebooks(codebooks, x_nd.shape[1])
  residual_nd = x_nd
  quantized_nd = jnp.zeros_like(x_nd)
  codes, norms = [], [jnp.mean(jnp.linalg.norm(residual_nd, axis=1))]
  for cb_kd in codebooks:
    codes_n, _ = kmeans.assign(residual_nd, cb_kd, chunk)
    picked_nd = jnp.take(cb_kd, codes_n, axis=0).astype(x_nd.dtype)
    quantized_nd = quantized_nd + picked_nd
    residual_nd = residual_nd - picked_nd
    codes.append(codes_n)
    norms.append(jnp.mean(jnp.linalg.norm(residual_nd, axis=1)))
  return jnp.stack(codes, axis=1), quantized_nd, jnp.stack(norms)


def residual_decode(codebooks: Sequence[jax.Array],
                    codes_nl: jax.Array) -> jax.Array:
  """Sum over levels of the codewords the codes pick: (N, D).

  Args:
    codebooks: L arrays, level l of shape (K_l, D).
    codes_nl: (N, L) integer codes, 0 <= codes_nl[:, l] < K_l. Concrete
      codes are range-checked; under jit an out-of-range code gives a NaN
      row (the fill mode of `jnp.take`).

  Raises:
    ValueError: on a shape mismatch or a concrete out-of-range code.
  """
  codebooks = _check_codebooks(codebooks, None)
  codes_nl = jnp.asarray(codes_nl)
  if codes_nl.ndim != 2 or codes_nl.shape[1] != len(codebooks):
    raise ValueError(f"codes_nl must be (N, {len(codebooks)}) for "
                     f"{len(codebooks)} codebooks, got shape "
                     f"{tuple(codes_nl.shape)}.")
  dim = codebooks[0].shape[1]
  codebooks = _check_codebooks(codebooks, dim)
  if not isinstance(codes_nl, jax.core.Tracer):
    for level, cb_kd in enumerate(codebooks):
      col_n = codes_nl[:, level]
      if col_n.size and (int(col_n.min()) < 0 or
                         int(col_n.max()) >= cb_kd.shape[0]):
        raise ValueError(f"codes of level {level} must be in [0, "
                         f"{cb_kd.shape[0]}), got range [{int(col_n.min())}, "
                         f"{int(col_n.max())}].")
  dtype = jnp.promote_types(codebooks[0].dtype, jnp.float32)
  quantized_nd = jnp.zeros((codes_nl.shape[0], dim), dtype)
  for level, cb_kd in enumerate(codebooks):
    quantized_nd = quantized_nd + jnp.take(
        cb_kd, codes_nl[:, level], axis=0).astype(dtype)
  return quantized_nd

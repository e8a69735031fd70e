"""RQ-KMeans (OneRec, arXiv 2502.18965 / 2506.13695): residual k-means SIDs.

Level 1 runs k-means on the item embeddings; each item's code is its
cluster and its residual the embedding minus that centroid; level l + 1 runs
k-means on the level-l residuals:

  R^(1) = X,  C^(l) = KMeans(R^(l), K_l),
  s_i^l = argmin_k ||R_i^(l) - c_k^(l)||,  R_i^(l+1) = R_i^(l) - c_{s_i^l}^(l).

Unlike the RQ-VAE there is no network to train, so the codebooks use every
code and reconstruct well; OneRec reports better utilisation and balance
than RQ-VAE. Level sizes may differ (GR4AD's multi-resolution 16384 -> 4096
-> 1024 shrinks them). With `balanced=True` each level's clusters are
capacity-constrained to ceil(N / K_l) items (OneRec's balanced k-means).

`fit` is a host-level driver: it checks the input once, then runs one jitted
k-means per level (each a single `lax.while_loop`) and records per-level
timings; `encode`/`decode` are the pure residual functions of `residual.py`.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from taiji_jax.quantize import kmeans
from taiji_jax.quantize import residual


class RQKMeans(NamedTuple):
  """A fitted RQ-KMeans tokenizer.

  Attributes:
    codebooks: L arrays, level l of shape (K_l, D).
    codes: (N, L) int32 codes of the fitted items. Without `balanced` they
      equal `encode(model, x_nd)`; with it they are the capacity-constrained
      assignment, while `encode` of new items takes the nearest codeword.
    stats: host values per level - "inertia" (sum of squared distances),
      "mse" (inertia / N), "iterations" (Lloyd steps), "utilisation"
      (fraction of codes used), "seconds" (wall time of the level) - and
      "residual_norms" (L + 1 mean residual norms, before each level and
      after the last).
    normalize: whether inputs are L2-normalised before quantisation;
      `encode` applies the same normalisation.
  """
  codebooks: tuple[jax.Array, ...]
  codes: jax.Array
  stats: dict[str, Any]
  normalize: bool = False


def _l2_normalize(x_nd: jax.Array) -> jax.Array:
  norms_n1 = jnp.linalg.norm(x_nd, axis=1, keepdims=True)
  return x_nd / jnp.maximum(norms_n1, 1e-12)


def _check_sizes(codebook_sizes: Sequence[int]) -> tuple[int, ...]:
  sizes = tuple(int(k) for k in codebook_sizes)
  if not sizes or any(k < 1 for k in sizes):
    raise ValueError(f"codebook_sizes must be a non-empty sequence of "
                     f"positive ints, got {tuple(codebook_sizes)}.")
  return sizes


def fit(key: jax.Array,
        x_nd: jax.Array,
        codebook_sizes: Sequence[int],
        iters: int = 25,
        balanced: bool = False,
        *,
        tol: float = 1e-4,
        normalize: bool = False,
        chunk: int = kmeans.DEFAULT_CHUNK,
        kmeanspp_max_points: int = kmeans.KMEANSPP_MAX_POINTS) -> RQKMeans:
  """Fits residual k-means codebooks and codes the items.

  Args:
    key: PRNG key; level l seeds its k-means++ with fold_in(key, l).
    x_nd: (N, D) item embeddings.
    codebook_sizes: K_l per level, e.g. (256, 256, 256).
    iters: maximum Lloyd steps per level.
    balanced: capacity-constrained (balanced) clusters at every level.
    tol: relative inertia change that stops a level early.
    normalize: L2-normalise the rows first. Off by default because text
      encoders usually emit normalised vectors already and fused
      content/collaborative vectors may carry meaningful norms.
    chunk: rows per block of the distance computations.
    kmeanspp_max_points: subsample cap of the k-means++ seeding.

  Returns:
    An RQKMeans.

  Raises:
    ValueError: on NaN/inf rows, a non-2-D input, bad sizes, or a codebook
      larger than the number of (distinct) items.
  """
  sizes = _check_sizes(codebook_sizes)
  x_nd = jnp.asarray(x_nd)
  x_nd = x_nd.astype(jnp.promote_types(x_nd.dtype, jnp.float32))
  kmeans.check_points(x_nd, max(sizes))
  if normalize:
    x_nd = _l2_normalize(x_nd)
  n = x_nd.shape[0]
  residual_nd = x_nd
  codebooks, codes = [], []
  stats = {
      "inertia": [],
      "mse": [],
      "iterations": [],
      "utilisation": [],
      "seconds": [],
      "residual_norms": [float(jnp.mean(jnp.linalg.norm(x_nd, axis=1)))],
  }
  for level, k in enumerate(sizes):
    start = time.perf_counter()
    result = kmeans.fit(
        jax.random.fold_in(key, level),
        residual_nd,
        k,
        iters=iters,
        tol=tol,
        balanced=balanced,
        chunk=chunk,
        kmeanspp_max_points=kmeanspp_max_points,
        check_inputs=False)
    residual_nd, residual_norm = _next_residual(residual_nd, result.centroids,
                                                result.codes)
    residual_norm = float(residual_norm)
    stats["seconds"].append(time.perf_counter() - start)
    codebooks.append(result.centroids)
    codes.append(result.codes)
    inertia = float(result.inertia)
    stats["inertia"].append(inertia)
    stats["mse"].append(inertia / n)
    stats["iterations"].append(int(result.iterations))
    used = np.unique(np.asarray(result.codes)).size
    stats["utilisation"].append(used / k)
    stats["residual_norms"].append(residual_norm)
  return RQKMeans(
      tuple(codebooks), jnp.stack(codes, axis=1), stats, bool(normalize))


@jax.jit
def _next_residual(residual_nd, centroids_kd, codes_n):
  """Residual after one level and its mean norm, fused (no (N, D) temp)."""
  residual_nd = residual_nd - jnp.take(centroids_kd, codes_n, axis=0)
  return residual_nd, jnp.mean(jnp.linalg.norm(residual_nd, axis=1))


def encode(model: RQKMeans,
           x_nd: jax.Array,
           chunk: int = kmeans.DEFAULT_CHUNK) -> jax.Array:
  """(N, L) int32 codes of `x_nd` by greedy residual quantisation."""
  x_nd = jnp.asarray(x_nd)
  x_nd = x_nd.astype(jnp.promote_types(x_nd.dtype, jnp.float32))
  if model.normalize:
    x_nd = _l2_normalize(x_nd)
  codes_nl, _, _ = _encode_jit(model.codebooks, x_nd, chunk=chunk)
  return codes_nl


def decode(model: RQKMeans, codes_nl: jax.Array) -> jax.Array:
  """(N, D) reconstruction: the sum of the coded centroids of each level.

  In the normalised space when the model was fitted with `normalize=True`.
  """
  return residual.residual_decode(model.codebooks, codes_nl)


_encode_jit = jax.jit(residual.residual_encode, static_argnames=("chunk",))

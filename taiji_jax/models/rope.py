"""Rotary position embeddings (rotate-half layout, Hugging Face semantics).

Inverse frequencies with optional linear or llama3 long-context scaling,
cos/sin tables for (B, T) positions, and their application to (B, T, N, H)
queries and keys in float32. Re-exported by `taiji_jax.models.decoder`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from taiji_jax.models.decoder_config import RopeScaling


def rope_inv_freq(head_dim: int,
                  theta: float,
                  scaling: RopeScaling | None = None) -> jax.Array:
  """Inverse frequencies (H / 2,) of rotary embeddings, float32."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta**exponents)
  if scaling is None:
    return inv_freq
  if scaling.rope_type == "linear":
    return inv_freq / scaling.factor
  # llama3: wavelengths longer than the pre-training context / low factor
  # are stretched by `factor`, shorter than context / high factor are kept.
  old_len = scaling.original_max_position_embeddings
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old_len / low, inv_freq / scaling.factor,
                     inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(medium, smoothed, scaled)


def rope_tables(positions_bt: jax.Array,
                inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each (B, T, H), in the rotate-half layout [f, f]."""
  angles_btf = positions_bt.astype(jnp.float32)[..., None] * inv_freq
  angles_bth = jnp.concatenate([angles_btf, angles_btf], axis=-1)
  return jnp.cos(angles_bth), jnp.sin(angles_bth)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array,
               sin_bth: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin, computed in float32 (HF convention)."""
  x = x_btnh.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_bth[:, :, None] + rotated * sin_bth[:, :, None]
  return out.astype(x_btnh.dtype)

"""Random collision-free semantic IDs for tests and notebooks."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from taiji_jax.quantize import semantic_ids as sid_lib


def random_semantic_ids(num_items: int,
                        sizes: Sequence[int],
                        seed: int = 0,
                        fingerprint: str | None = None
                       ) -> sid_lib.SemanticIds:
  """`num_items` distinct random SIDs of codebooks `sizes` (row 0 padding)."""
  rng = np.random.default_rng(seed)
  flat = rng.choice(np.prod(sizes), num_items, replace=False)
  codes = np.stack(np.unravel_index(flat, tuple(sizes)), 1)
  padded = np.concatenate([np.full((1, len(sizes)), -1), codes])
  if fingerprint is None:
    return sid_lib.SemanticIds(padded, tuple(sizes))
  return sid_lib.SemanticIds(padded, tuple(sizes), fingerprint)

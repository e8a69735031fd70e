"""Non-learned reference recommenders evaluated with the same protocol."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def popularity_scores(train_sequences: Sequence[np.ndarray],
                      num_items: int) -> np.ndarray:
  """(num_items + 1,) training-interaction counts; index 0 (padding) is 0.

  Ties are broken toward the lower item id by the top-k, deterministically.
  """
  counts = np.zeros(num_items + 1, np.float32)
  for seq in train_sequences:
    np.add.at(counts, np.asarray(seq), 1.0)
  counts[0] = 0.0
  return counts


def constant_score_fn(scores_v: np.ndarray):
  """A score_fn(params, histories) giving every user the same scores."""
  table = jnp.asarray(scores_v)

  def score_fn(params, histories_bt):
    del params
    return jnp.broadcast_to(table, (histories_bt.shape[0], table.shape[0]))

  return score_fn

"""Collision statistics and resolution for semantic codes.

Two quantized items can land on the same code tuple. Generative retrieval
needs SID -> item to be a function, so collisions must be resolved. Both
methods here add one final level and are collision-free by construction:

* ``extra_level`` (TIGER): items sharing a semantic tuple get 0, 1, 2, ...
  in the order of their item ids; items without a collision get 0. The level
  has as many codes as the largest collision group.
* ``hash`` (GR4AD UA-SID): the final level is a non-semantic hash of the
  item's raw id into [0, K). Inside one semantic group, hash clashes are
  resolved by linear probing (in item-id order), so the result is unique as
  long as no group is larger than K, which is checked. An item's last code
  depends only on its own raw id and its group, not on the catalogue order.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

METHODS = ("extra_level", "hash")


def collision_stats(codes_nl: np.ndarray) -> dict[str, float]:
  """How many items share their full code tuple with another item.

  Returns:
    collision_rate: fraction of items in a group of size > 1;
    colliding_groups: number of such groups;
    max_group: size of the largest group;
    distinct_codes: number of distinct tuples / number of items.
  """
  codes_nl = np.asarray(codes_nl)
  _, inverse, counts = np.unique(
      codes_nl, axis=0, return_inverse=True, return_counts=True)
  sizes = counts[inverse.reshape(-1)]
  return {
      "collision_rate": float(np.mean(sizes > 1)),
      "colliding_groups": int(np.sum(counts > 1)),
      "max_group": int(counts.max()),
      "distinct_codes": float(len(counts) / len(codes_nl)),
  }


def stable_hash(raw_id, modulus: int) -> int:
  """A process-independent hash of a raw id into [0, modulus)."""
  digest = hashlib.blake2b(str(raw_id).encode("utf-8"), digest_size=8)
  return int.from_bytes(digest.digest(), "little") % modulus


def resolve(codes_nl: np.ndarray,
            method: str,
            raw_ids: Sequence | None = None,
            hash_size: int = 256) -> tuple[np.ndarray, int]:
  """Appends a disambiguating level so every row is unique.

  Args:
    codes_nl: (N, L) semantic codes of items 1..N (row n = item n + 1).
    method: "extra_level" or "hash" (module docstring).
    raw_ids: (N,) raw item ids, required by "hash".
    hash_size: K of the hash level.

  Returns:
    ((N, L + 1) int32 unique codes, size of the added level).
  """
  codes_nl = np.asarray(codes_nl)
  if codes_nl.ndim != 2:
    raise ValueError(f"codes must be (N, L), got shape {codes_nl.shape}")
  n = len(codes_nl)
  _, group = np.unique(codes_nl, axis=0, return_inverse=True)
  group = group.reshape(-1)
  extra = np.zeros(n, np.int64)
  order = np.argsort(group, kind="stable")  # item-id order within a group
  if method == "extra_level":
    starts = np.r_[0, np.flatnonzero(np.diff(group[order])) + 1]
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    extra[order] = rank
    size = int(extra.max()) + 1
  elif method == "hash":
    if raw_ids is None or len(raw_ids) != n:
      raise ValueError(
          f"hash collision resolution needs the {n} raw item ids, got "
          f"{None if raw_ids is None else len(raw_ids)}")
    largest = int(np.bincount(group).max())
    if largest > hash_size:
      raise ValueError(
          f"hash collision resolution: {largest} items share one semantic "
          f"code but the hash level has only {hash_size} codes; raise "
          "hash_size or use method='extra_level'")
    used: dict[int, set[int]] = {}
    for i in order:
      taken = used.setdefault(int(group[i]), set())
      slot = stable_hash(raw_ids[i], hash_size)
      while slot in taken:
        slot = (slot + 1) % hash_size
      taken.add(slot)
      extra[i] = slot
    size = hash_size
  else:
    raise ValueError(f"unknown collision method {method!r}; known {METHODS}")
  return np.concatenate([codes_nl, extra[:, None]], 1).astype(np.int32), size

"""Semantic IDs: unique per-item code tuples, their maps and a prefix trie.

A `SemanticIds` holds `codes` (num_items + 1, L) int32 where row i is the SID
of internal item id i (row 0 is padding and holds -1 at every level), the
codebook size of each level, and a prefix trie stored as flat arrays so that
constrained decoding runs inside `jax.jit`. Level l of the trie is a
`TrieLevel` in compressed-sparse-row form over the distinct prefixes of
length l (numbered in sorted order; level 0 has the single empty prefix):

  offsets  (P_l + 1,) the edges of prefix p are offsets[p]:offsets[p + 1]
  tokens   (E_l,)     the next token of each edge, sorted within a prefix
  children (E_l,)     the prefix (node) at depth l + 1 the edge leads to;
                      at the last level, the item id itself

Memory is O(number of edges) = O(levels x items), whatever the codebook sizes
(a dense (P_l, K_l) table would need 1.9 GB for 1M items when the
disambiguation level grows to 800 codes). A decoder keeps one int per beam
(its node) and calls `trie_valid_mask(level, node)` -> (B, K_l) to mask
logits and `trie_next(level, node, token)` to move; after L tokens the node
is the item. Every path through the trie is the SID of an item and every
prefix of every SID is a path: nothing else is stored.

Uniqueness is checked on construction (and guaranteed by the collision
resolution in `collisions.py`); loading SIDs that were built for a different
item catalogue is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FORMAT_VERSION = 1
FILE_NAME = "semantic_ids.npz"


class SemanticIdError(ValueError):
  """Invalid, non-unique or mismatched semantic IDs."""


def catalogue_fingerprint(item_raw_ids: Sequence) -> str:
  """SHA-256 over the raw item ids in internal-id order (row 0 skipped)."""
  h = hashlib.sha256()
  for raw in item_raw_ids[1:]:
    h.update(str(raw).encode("utf-8"))
    h.update(b"\x00")
  return h.hexdigest()


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("offsets", "tokens", "children", "leaves"),
    meta_fields=("vocab_size", "max_degree"))
@dataclasses.dataclass(frozen=True)
class TrieLevel:
  """One level of the prefix trie (module docstring); a jax pytree.

  Attributes:
    offsets: (P + 1,) int32 edge ranges of the P prefixes of this length.
    tokens: (E,) int32 next tokens, sorted within each prefix.
    children: (E,) int32 node (or item, at the last level) each edge reaches.
    leaves: (E,) int32 number of items below each edge (1 at the last level).
    vocab_size: K of this level (static).
    max_degree: the most edges of one prefix (static; the gather width).
  """
  offsets: Any
  tokens: Any
  children: Any
  leaves: Any
  vocab_size: int
  max_degree: int

  @property
  def num_prefixes(self) -> int:
    return self.offsets.shape[0] - 1

  @property
  def nbytes(self) -> int:
    return sum(
        int(np.asarray(a).nbytes)
        for a in (self.offsets, self.tokens, self.children))

  def to_dense(self) -> np.ndarray:
    """(P, K) table of children, -1 where invalid (for tests and debugging)."""
    table = np.full((self.num_prefixes, self.vocab_size), -1, np.int32)
    prefix = np.repeat(np.arange(self.num_prefixes), np.diff(self.offsets))
    table[prefix, np.asarray(self.tokens)] = np.asarray(self.children)
    return table


def build_trie(
    codes_nl: np.ndarray, item_ids: np.ndarray,
    codebook_sizes: Sequence[int]) -> tuple[tuple[TrieLevel, ...], np.ndarray]:
  """The per-level CSR trie of unique codes (see the module docstring).

  Args:
    codes_nl: (N, L) codes of the N items, unique rows.
    item_ids: (N,) the item id each row belongs to (the leaf value).
    codebook_sizes: K_l per level.

  Returns:
    (trie levels, path_nl) where path_nl[n, l] is the node at depth l + 1 on
    row n's path (the item id at the last level), in the input row order.
  """
  n, levels = codes_nl.shape
  order = np.lexsort(codes_nl.T[::-1])  # rows in lexicographic code order
  codes_nl, item_ids = codes_nl[order], np.asarray(item_ids)[order]
  out = []
  path_nl = np.zeros((n, levels), np.int64)
  parent = np.zeros(n, np.int64)  # depth-0 prefix of every row: the root
  for l in range(levels):
    # Rows are sorted, so the distinct length-(l+1) prefixes are the rows
    # where the prefix changes; each is one edge out of its parent prefix.
    if l + 1 < levels:
      new = np.r_[True, np.any(np.diff(codes_nl[:, :l + 1], axis=0), axis=1)]
      child = np.cumsum(new) - 1
      edge_child = child[new]
      leaves = np.bincount(child)
    else:
      new = np.ones(n, bool)
      child = item_ids.astype(np.int64)
      edge_child = item_ids
      leaves = np.ones(n, np.int64)
    path_nl[:, l] = child
    edge_parent = parent[new]
    num_parents = int(parent[-1]) + 1
    degree = np.bincount(edge_parent, minlength=num_parents)
    out.append(
        TrieLevel(
            offsets=np.r_[0, np.cumsum(degree)].astype(np.int32),
            tokens=codes_nl[new, l].astype(np.int32),
            children=edge_child.astype(np.int32),
            leaves=leaves.astype(np.int32),
            vocab_size=int(codebook_sizes[l]),
            max_degree=int(degree.max())))
    parent = child
  unsorted = np.empty_like(path_nl)
  unsorted[order] = path_nl
  return tuple(out), unsorted.astype(np.int32)


def _edge_window(level: TrieLevel, node_b, xp):
  """(B, max_degree) edge indices of each node, and which of them exist."""
  start = xp.take(level.offsets, node_b)
  stop = xp.take(level.offsets, node_b + 1)
  edge_bd = start[:, None] + xp.arange(level.max_degree)[None, :]
  exists_bd = edge_bd < stop[:, None]
  return xp.minimum(edge_bd, level.tokens.shape[0] - 1), exists_bd


def trie_children(level: TrieLevel,
                  node_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(B, K) child reached by each token (-1 if none) and its item count."""
  edge_bd, exists_bd = _edge_window(level, node_b, jnp)
  tokens_bd = jnp.take(level.tokens, edge_bd)
  rows_bd = jnp.broadcast_to(
      jnp.arange(node_b.shape[0])[:, None], tokens_bd.shape)
  # Edges that do not exist write out of bounds and are dropped.
  cols_bd = jnp.where(exists_bd, tokens_bd, level.vocab_size)
  empty = jnp.full((node_b.shape[0], level.vocab_size), -1, jnp.int32)
  children = empty.at[rows_bd, cols_bd].set(
      jnp.take(level.children, edge_bd), mode="drop")
  leaves = jnp.zeros_like(empty).at[rows_bd, cols_bd].set(
      jnp.take(level.leaves, edge_bd), mode="drop")
  return children, leaves


def trie_valid_mask(level: TrieLevel, node_b: jax.Array) -> jax.Array:
  """(B, K) bool: the tokens that continue each node's prefix to an item."""
  return trie_children(level, node_b)[0] >= 0


def trie_next(level: TrieLevel, node_b, token_b, xp=None):
  """(B,) node reached by appending `token_b` to `node_b`, -1 if invalid.

  `xp` is numpy or jax.numpy (default), so this runs on the host or in jit.
  """
  xp = jnp if xp is None else xp
  edge_bd, exists_bd = _edge_window(level, node_b, xp)
  hit_bd = exists_bd & (xp.take(level.tokens, edge_bd) == token_b[:, None])
  first = xp.argmax(hit_bd, axis=1)
  edge_b = xp.take_along_axis(edge_bd, first[:, None], axis=1)[:, 0]
  return xp.where(hit_bd.any(1), xp.take(level.children, edge_b), -1)


@dataclasses.dataclass(frozen=True, eq=False)
class SemanticIds:
  """Unique semantic IDs of an item catalogue, with maps and a trie.

  Attributes:
    codes: (num_items + 1, L) int32; row 0 (padding) is all -1.
    codebook_sizes: K_l per level (the token vocabulary of each level).
    catalogue: SHA-256 fingerprint of the item raw ids these SIDs are for.
    trie: per-level CSR `TrieLevel`s (module docstring).
    paths: (num_items + 1, L) int32 node of item i at depth l + 1 (the item
      id itself at the last level; row 0 = -1); used to exclude items
      (e.g. a user's history) from constrained decoding.
    meta: free-form description (quantizer, fusion, collision method).
  """
  codes: np.ndarray
  codebook_sizes: tuple[int, ...]
  catalogue: str = ""
  meta: dict = dataclasses.field(default_factory=dict)
  trie: tuple[TrieLevel, ...] = dataclasses.field(init=False, repr=False)
  paths: np.ndarray = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    codes = np.asarray(self.codes)
    if codes.ndim != 2 or codes.shape[0] < 2:
      raise SemanticIdError(
          f"codes must be (num_items + 1, levels) with at least one item; "
          f"got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
      raise SemanticIdError(f"codes must be integers, got {codes.dtype}")
    sizes = tuple(int(k) for k in self.codebook_sizes)
    if len(sizes) != codes.shape[1]:
      raise SemanticIdError(f"{len(sizes)} codebook sizes for "
                            f"{codes.shape[1]} levels")
    if np.any(codes[0] != -1):
      raise SemanticIdError(f"row 0 (padding) must be all -1, got {codes[0]}")
    items = codes[1:]
    for l, k in enumerate(sizes):
      bad = np.flatnonzero((items[:, l] < 0) | (items[:, l] >= k))
      if bad.size:
        raise SemanticIdError(
            f"level {l}: item {bad[0] + 1} has code {items[bad[0], l]} "
            f"outside [0, {k}) ({bad.size} items out of range)")
    uniq, inverse, counts = np.unique(
        items, axis=0, return_inverse=True, return_counts=True)
    if len(uniq) != len(items):
      dup = np.flatnonzero(counts[inverse.reshape(-1)] > 1)[:2] + 1
      raise SemanticIdError(
          f"SIDs are not unique: {len(items) - len(uniq)} duplicate rows, "
          f"e.g. items {dup.tolist()} both have {items[dup[0] - 1].tolist()}; "
          "resolve collisions first (quantize.collisions.resolve)")
    codes = codes.astype(np.int32)
    object.__setattr__(self, "codes", codes)
    object.__setattr__(self, "codebook_sizes", sizes)
    trie, paths = build_trie(codes[1:], np.arange(1, len(codes)), sizes)
    object.__setattr__(self, "trie", trie)
    object.__setattr__(
        self, "paths",
        np.concatenate([np.full((1, len(sizes)), -1, np.int32), paths]))
    object.__setattr__(self, "_lookup", {
        tuple(row): i for i, row in enumerate(items.tolist(), 1)
    })

  @property
  def num_items(self) -> int:
    return self.codes.shape[0] - 1

  @property
  def levels(self) -> int:
    return self.codes.shape[1]

  def item_to_sid(self, item: int) -> tuple[int, ...]:
    """The SID of internal item id `item` (1..num_items)."""
    if not 1 <= int(item) <= self.num_items:
      raise KeyError(f"item id {item} outside 1..{self.num_items}")
    return tuple(int(c) for c in self.codes[int(item)])

  def sid_to_item(self, sid: Sequence[int]) -> int:
    """The item whose SID is `sid`; KeyError for a SID no item has."""
    key = tuple(int(c) for c in sid)
    try:
      return self._lookup[key]
    except KeyError:
      raise KeyError(f"no item has SID {key}") from None

  def lookup(self, codes_bl) -> np.ndarray:
    """(B, L) codes -> (B,) item ids, 0 where the SID is not an item.

    Walks the trie, so it also works on jax arrays inside jit when called
    through `walk_trie`.
    """
    return np.asarray(walk_trie(self.trie, np.asarray(codes_bl), np))

  def save(self, directory: os.PathLike | str) -> pathlib.Path:
    """Writes `<directory>/semantic_ids.npz` atomically; returns its path."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    tmp = directory / (FILE_NAME + ".tmp.npz")
    np.savez(
        tmp,
        codes=self.codes,
        codebook_sizes=np.asarray(self.codebook_sizes, np.int64),
        header=np.asarray(
            json.dumps({
                "format_version": FORMAT_VERSION,
                "catalogue": self.catalogue,
                "meta": self.meta,
            })))
    os.replace(tmp, path)
    return path

  @classmethod
  def load(cls,
           path: os.PathLike | str,
           item_raw_ids: Sequence | None = None) -> "SemanticIds":
    """Reads what `save` wrote (a directory or the .npz file itself).

    Args:
      path: the directory holding `semantic_ids.npz`, or the file.
      item_raw_ids: the catalogue these SIDs must belong to
        (`Dataset.item_raw_ids`); when given, a different catalogue (other
        items, other order, other size) raises SemanticIdError.
    """
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / FILE_NAME
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no semantic IDs saved here")
    with np.load(path, allow_pickle=False) as f:
      missing = {"codes", "codebook_sizes", "header"} - set(f.files)
      if missing:
        raise SemanticIdError(f"{path}: missing arrays {sorted(missing)}")
      header = json.loads(str(f["header"]))
      codes, sizes = f["codes"], tuple(f["codebook_sizes"].tolist())
    if header.get("format_version") != FORMAT_VERSION:
      raise SemanticIdError(
          f"{path}: format version {header.get('format_version')}, this code "
          f"reads {FORMAT_VERSION}")
    if item_raw_ids is not None:
      if len(item_raw_ids) != len(codes):
        raise SemanticIdError(
            f"{path}: SIDs for {len(codes) - 1} items, the catalogue has "
            f"{len(item_raw_ids) - 1}; rebuild the SIDs for this dataset")
      want = catalogue_fingerprint(item_raw_ids)
      if header["catalogue"] != want:
        raise SemanticIdError(
            f"{path}: SIDs were built for another item catalogue "
            f"(fingerprint {header['catalogue'][:12]}..., this dataset "
            f"{want[:12]}...); rebuild the SIDs for this dataset")
    try:
      return cls(codes, sizes, header["catalogue"], header.get("meta", {}))
    except SemanticIdError as e:
      raise SemanticIdError(f"{path}: {e}") from None


def walk_trie(trie: Sequence[TrieLevel], codes_bl, xp=None):
  """Follows (B, L) codes through the trie -> (B,) item ids, 0 if invalid.

  `xp` is numpy or jax.numpy (default: jax.numpy), so this runs inside jit.
  """
  xp = jnp if xp is None else xp
  node = xp.zeros(codes_bl.shape[:1], xp.int32)
  valid = xp.ones(codes_bl.shape[:1], bool)
  for l, level in enumerate(trie):
    nxt = trie_next(level, xp.where(valid, node, 0), codes_bl[:, l], xp)
    valid = valid & (nxt >= 0)
    node = xp.where(valid, nxt, 0)
  return node

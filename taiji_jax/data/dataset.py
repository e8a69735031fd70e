"""The in-memory interaction dataset every loader produces.

All loaders (MovieLens, Amazon, synthetic) parse their raw files into the same
columns and hand them to `Dataset.from_interactions`, so the preprocessing
protocol lives in exactly one place:

1. Interactions are kept in file order; nothing is filtered here (the loaders
   report any filtering they do, with counts, in `Dataset.report`).
2. User and item raw ids are remapped to 1..N in order of first appearance in
   the interaction file (RecBole's `pd.factorize` order); id 0 is padding.
   The item catalogue is the set of items that occur in the interactions;
   metadata rows of items that never occur are counted and ignored.
3. Interactions are sorted by (user, timestamp) with a stable sort, so ties
   keep their file order.

`split_leave_one_out` then follows RecBole's sequential protocol
(`eval_args.split = {'LS': 'valid_and_test'}`, `order = 'TO'`); see its
docstring.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, Mapping, Sequence

import numpy as np

PAD_RAW_ID = "[PAD]"
# Bump when the parsed representation changes; older saves are re-parsed.
SAVE_FORMAT = "taiji-dataset-v1"


@dataclasses.dataclass(frozen=True)
class Dataset:
  """User-item interactions with item text and user profiles.

  Attributes:
    name: dataset name as passed to `load_dataset`.
    source: human-readable description of where the files came from.
    user_raw_ids: (num_users + 1,) str, `user_raw_ids[u]` is the original id
      of internal user u; index 0 is "[PAD]".
    item_raw_ids: (num_items + 1,) str, same for items.
    inter_users: (N,) int32 internal user ids, sorted by (user, time).
    inter_items: (N,) int32 internal item ids, same order.
    inter_times: (N,) int64 timestamps (seconds), same order.
    inter_ratings: (N,) float32 ratings (NaN where the source has none).
    item_features: field -> tuple of length num_items + 1 (index 0 = None),
      e.g. "title", "year", "genres" (tuple of str) for MovieLens.
    user_features: field -> tuple of length num_users + 1 (index 0 = None).
    report: counts of everything the loader read, dropped or repaired.
  """

  name: str
  source: str
  user_raw_ids: np.ndarray
  item_raw_ids: np.ndarray
  inter_users: np.ndarray
  inter_items: np.ndarray
  inter_times: np.ndarray
  inter_ratings: np.ndarray
  item_features: Mapping[str, tuple[Any, ...]]
  user_features: Mapping[str, tuple[Any, ...]]
  report: Mapping[str, Any]

  @property
  def num_users(self) -> int:
    """Number of real users (ids 1..num_users)."""
    return len(self.user_raw_ids) - 1

  @property
  def num_items(self) -> int:
    """Number of real items (ids 1..num_items)."""
    return len(self.item_raw_ids) - 1

  @property
  def num_interactions(self) -> int:
    return len(self.inter_items)

  @classmethod
  def from_interactions(
      cls,
      *,
      name: str,
      source: str,
      raw_users: Sequence[str],
      raw_items: Sequence[str],
      times: Sequence[int],
      ratings: Sequence[float] | None = None,
      item_table: Mapping[str, Mapping[str, Any]] | None = None,
      user_table: Mapping[str, Mapping[str, Any]] | None = None,
      item_fields: Sequence[str] = (),
      user_fields: Sequence[str] = (),
      report: Mapping[str, Any] | None = None,
  ) -> Dataset:
    """Remaps ids, sorts and attaches side information (the shared protocol).

    Args:
      name: dataset name.
      source: where the files came from (shown to the user).
      raw_users: (N,) raw user id of each interaction, in file order.
      raw_items: (N,) raw item id of each interaction, in file order.
      times: (N,) integer timestamps.
      ratings: (N,) ratings, or None.
      item_table: raw item id -> {field: value}; missing items get None.
      user_table: raw user id -> {field: value}.
      item_fields: fields of `item_table` to keep, in display order.
      user_fields: fields of `user_table` to keep, in display order.
      report: loader counts to carry along (copied, then extended).

    Returns:
      The dataset.

    Raises:
      ValueError: on empty input or columns of different lengths.
    """
    n = len(raw_items)
    if n == 0:
      raise ValueError(f"{name}: no interactions were read ({source}).")
    if len(raw_users) != n or len(times) != n or (ratings is not None and
                                                  len(ratings) != n):
      raise ValueError(
          f"{name}: interaction columns differ in length: users="
          f"{len(raw_users)}, items={n}, times={len(times)}, ratings="
          f"{None if ratings is None else len(ratings)}.")
    user_raw, users = _factorize(raw_users)
    item_raw, items = _factorize(raw_items)
    times = np.asarray(times, dtype=np.int64)
    ratings = (
        np.full(n, np.nan, np.float32) if ratings is None else np.asarray(
            ratings, dtype=np.float32))
    # Stable lexicographic sort by (user, time): ties keep file order.
    order = np.lexsort((times, users))
    report = dict(report or {})
    item_features, missing_items, unused_items = _side_table(
        item_raw, item_table or {}, item_fields)
    user_features, missing_users, unused_users = _side_table(
        user_raw, user_table or {}, user_fields)
    if item_table is not None:
      report["items_without_metadata"] = missing_items
      report["metadata_items_without_interactions"] = unused_items
    if user_table is not None:
      report["users_without_profile"] = missing_users
      report["profiles_without_interactions"] = unused_users
    pairs = users.astype(np.int64) * (len(item_raw) + 1) + items
    report["duplicate_user_item_interactions"] = int(n - len(np.unique(pairs)))
    return cls(
        name=name,
        source=source,
        user_raw_ids=np.asarray([PAD_RAW_ID] + user_raw, dtype=object),
        item_raw_ids=np.asarray([PAD_RAW_ID] + item_raw, dtype=object),
        inter_users=users[order],
        inter_items=items[order],
        inter_times=times[order],
        inter_ratings=ratings[order],
        item_features=item_features,
        user_features=user_features,
        report=report,
    )

  def save(self, directory: os.PathLike | str) -> None:
    """Writes the dataset as `arrays.npz` + `side.json` (atomically)."""
    directory = pathlib.Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.savez(
        tmp / "arrays.npz",
        user_raw_ids=self.user_raw_ids.astype(str),
        item_raw_ids=self.item_raw_ids.astype(str),
        inter_users=self.inter_users,
        inter_items=self.inter_items,
        inter_times=self.inter_times,
        inter_ratings=self.inter_ratings)
    side = {
        "format": SAVE_FORMAT,
        "name": self.name,
        "source": self.source,
        "item_features": {
            k: list(v) for k, v in self.item_features.items()
        },
        "user_features": {
            k: list(v) for k, v in self.user_features.items()
        },
        "report": dict(self.report),
    }
    (tmp / "side.json").write_text(json.dumps(side))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)

  @classmethod
  def load(cls, directory: os.PathLike | str) -> Dataset:
    """Reads what `save` wrote; lists in features come back as tuples."""
    directory = pathlib.Path(directory)
    side = json.loads((directory / "side.json").read_text())
    if side.get("format") != SAVE_FORMAT:
      raise ValueError(f"{directory}: saved format {side.get('format')!r}, "
                       f"expected {SAVE_FORMAT!r}.")
    with np.load(directory / "arrays.npz") as arrays:
      a = {k: arrays[k] for k in arrays.files}

    def column(values):
      return tuple(tuple(v) if isinstance(v, list) else v for v in values)

    return cls(
        name=side["name"],
        source=side["source"],
        user_raw_ids=a["user_raw_ids"].astype(object),
        item_raw_ids=a["item_raw_ids"].astype(object),
        inter_users=a["inter_users"],
        inter_items=a["inter_items"],
        inter_times=a["inter_times"],
        inter_ratings=a["inter_ratings"],
        item_features={
            k: column(v) for k, v in side["item_features"].items()
        },
        user_features={
            k: column(v) for k, v in side["user_features"].items()
        },
        report=side["report"])

  def sequences(self) -> list[np.ndarray]:
    """Each user's items in time order; index u is user u (index 0 empty)."""
    bounds = np.searchsorted(
        self.inter_users, np.arange(self.num_users + 2), side="left")
    return [
        self.inter_items[bounds[u]:bounds[u + 1]]
        for u in range(self.num_users + 1)
    ]

  def item_text(self, item: int) -> str:
    """One line describing the item from all its fields, for text encoders."""
    return _describe(self.item_features, item)

  def user_text(self, user: int) -> str:
    """One line describing the user's profile."""
    return _describe(self.user_features, user)

  def statistics(self) -> dict[str, Any]:
    """Sizes and sparsity, as printed in the README's dataset table."""
    lengths = np.bincount(self.inter_users, minlength=self.num_users + 1)[1:]
    return {
        "users": self.num_users,
        "items": self.num_items,
        "interactions": self.num_interactions,
        "density": self.num_interactions / (self.num_users * self.num_items),
        "avg_seq_len": float(lengths.mean()),
        "min_seq_len": int(lengths.min()),
        "max_seq_len": int(lengths.max()),
    }

  def split_leave_one_out(self, max_len: int = 50) -> dict[str, dict]:
    """RecBole's sequential leave-one-out split.

    RecBole turns each user's time-ordered sequence s_1..s_n into n - 1
    samples (history s_<t, target s_t for t = 2..n) and then, per user, sends
    the last sample to test and the second-to-last to valid, keeping at least
    one sample in train (`_split_index_by_leave_one_out`). Hence:

      n >= 4: train targets s_2..s_{n-2}, valid target s_{n-1}, test s_n.
      n == 3: train target s_2, no valid sample, test target s_3.
      n <= 2: everything is train; the user is not evaluated.

    Histories are the previous items truncated to the last `max_len`,
    right-aligned: the most recent item is in the last column and zeros pad
    the left. `seen_items` holds *all* earlier items (not truncated), 0-padded
    on the right, for masking in full-ranking evaluation.

    Args:
      max_len: history length (RecBole's MAX_ITEM_LIST_LENGTH, default 50).

    Returns:
      {"train": {"users": (U,), "sequences": list of (n_u,) arrays: each
        user's training items in time order},
       "valid"/"test": {"users": (B,), "histories": (B, max_len),
        "targets": (B,), "seen_items": (B, S)}}, int32 throughout; plus
      "counts" with the number of users in each part.
    """
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1, got {max_len}.")
    seqs = self.sequences()
    train_users, train_seqs = [], []
    parts = {"valid": ([], []), "test": ([], [])}
    for u in range(1, self.num_users + 1):
      s = seqs[u]
      n = len(s)
      if n == 0:
        continue
      n_valid = 1 if n >= 4 else 0
      n_test = 1 if n >= 3 else 0
      n_train_items = n - n_valid - n_test
      train_users.append(u)
      train_seqs.append(s[:n_train_items].astype(np.int32))
      if n_valid:
        parts["valid"][0].append(u)
        parts["valid"][1].append(n - 2)
      if n_test:
        parts["test"][0].append(u)
        parts["test"][1].append(n - 1)
    out = {
        "train": {
            "users": np.asarray(train_users, np.int32),
            "sequences": train_seqs
        }
    }
    for part, (users, positions) in parts.items():
      out[part] = _eval_part(seqs, users, positions, max_len)
    out["counts"] = {
        "train_users": len(train_users),
        "train_targets": int(sum(max(len(x) - 1, 0) for x in train_seqs)),
        "valid_users": len(parts["valid"][0]),
        "test_users": len(parts["test"][0]),
    }
    return out


def _eval_part(seqs: list[np.ndarray], users: list[int], positions: list[int],
               max_len: int) -> dict[str, np.ndarray]:
  """Histories/targets/seen items for the target at `positions[i]`."""
  b = len(users)
  width = max(positions, default=0)
  histories = np.zeros((b, max_len), np.int32)
  seen = np.zeros((b, max(width, 1)), np.int32)
  targets = np.zeros((b,), np.int32)
  for row, (u, t) in enumerate(zip(users, positions)):
    s = seqs[u]
    hist = s[max(0, t - max_len):t]
    histories[row, max_len - len(hist):] = hist
    seen[row, :t] = s[:t]
    targets[row] = s[t]
  return {
      "users": np.asarray(users, np.int32),
      "histories": histories,
      "targets": targets,
      "seen_items": seen,
  }


def _factorize(raw: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """Maps raw ids to 1..K in order of first appearance."""
  index: dict[str, int] = {}
  ids = np.empty(len(raw), np.int32)
  for pos, key in enumerate(raw):
    ids[pos] = index.setdefault(key, len(index) + 1)
  return list(index), ids


def _side_table(raw_ids: list[str], table: Mapping[str, Mapping[str, Any]],
                fields: Sequence[str]):
  """Columns of side information aligned with internal ids (index 0 = None)."""
  columns = {f: [None] for f in fields}
  missing = 0
  for raw in raw_ids:
    row = table.get(raw)
    if row is None:
      missing += 1
    for f in fields:
      columns[f].append(None if row is None else row.get(f))
  unused = len(set(table) - set(raw_ids))
  return {f: tuple(v) for f, v in columns.items()}, missing, unused


def _describe(features: Mapping[str, tuple[Any, ...]], index: int) -> str:
  parts = []
  for field, column in features.items():
    value = column[index]
    if value is None or value == "" or value == ():
      continue
    if isinstance(value, (tuple, list)):
      value = ", ".join(str(v) for v in value)
    parts.append(f"{field.replace('_', ' ')}: {value}")
  return "; ".join(parts)

"""Semantic metrics beside Recall/NDCG: does the recommendation "mean" right?

Taiji reports Category_L{1,2,3}_ACC (the recommended item's category equals
the target's) and Title_Hit-Rate@K next to its preference hit rates. Here:

* `label_table(dataset, field)` - a (num_items + 1, num_labels) bool table
  of an item feature holding labels (MovieLens "genres", Amazon
  "categories", the synthetic "category"); row 0 (padding) has none.
* `label_metrics(items_bk, targets_b, labels_vl)` - per user, whether the
  top-1 item shares a label with the target (`label_acc@1`, the
  Category_L1_ACC analogue; equal to exact match for single-label fields),
  whether its label set equals the target's (`label_exact@1`) and their
  Jaccard overlap (`label_jaccard@1`).
* `title_table(dataset)` / `title_hits(items_bk, targets_b, title_ids_v, ks)`
  - per user, whether an item with the target's title (case- and
  space-normalised, so re-releases and duplicate entries count) is among
  the top k (`title_hit@k`); with unique titles this equals Recall@k.

The array functions are pure and jit-able; average them over the valid rows
with `metrics.mean_metrics`, like the ranking metrics.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def item_labels(value) -> tuple[str, ...]:
  """Labels of one feature value: a str -> (str,), a sequence -> its
  distinct non-empty entries in order, None -> ()."""
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,) if value.strip() else ()
  if isinstance(value, (tuple, list)):
    return tuple(dict.fromkeys(str(v) for v in value if v not in (None, "")))
  return (str(value),)


def label_table(dataset, field: str) -> tuple[np.ndarray, list[str]]:
  """(num_items + 1, L) bool table of `field`'s labels, and the L labels.

  Raises:
    ValueError: the dataset has no such item feature (names the ones it
      has).
  """
  values = dataset.item_features.get(field)
  if values is None:
    raise ValueError(f"dataset {dataset.name!r} has no item feature "
                     f"{field!r}; its item features: "
                     f"{sorted(dataset.item_features)}")
  per_item = [
      ()
  ] + [item_labels(values[i]) for i in range(1, dataset.num_items + 1)]
  names = sorted({label for labels in per_item for label in labels})
  index = {name: j for j, name in enumerate(names)}
  table = np.zeros((dataset.num_items + 1, len(names)), bool)
  for i, labels in enumerate(per_item):
    table[i, [index[label] for label in labels]] = True
  return table, names


def label_metrics(items_bk: jax.Array, targets_b: jax.Array,
                  labels_vl: jax.Array) -> dict[str, jax.Array]:
  """Per-user label agreement of the top-1 item with the target.

  Args:
    items_bk: (B, K) ranked item ids (0 = none).
    targets_b: (B,) target item ids (0 = padding row).
    labels_vl: (V, L) bool `label_table`.

  Returns:
    {"label_acc@1", "label_exact@1", "label_jaccard@1"}, each (B,) float32;
    0 where the top-1 slot is empty or either item has no label.
  """
  labels_vl = jnp.asarray(labels_vl)  # a NumPy table indexes traced ids too
  top = labels_vl[items_bk[:, 0]]  # (B, L)
  want = labels_vl[targets_b]  # (B, L)
  both = jnp.sum(top & want, axis=-1)
  either = jnp.sum(top | want, axis=-1)
  labelled = (jnp.sum(top, -1) > 0) & (jnp.sum(want, -1) > 0)
  exact = jnp.all(top == want, axis=-1) & labelled
  return {
      "label_acc@1": (both > 0).astype(jnp.float32),
      "label_exact@1":
          exact.astype(jnp.float32),
      "label_jaccard@1":
          jnp.where(labelled, both / jnp.maximum(either, 1),
                    0.0).astype(jnp.float32),
  }


def normalise_title(title: str) -> str:
  """Case- and whitespace-insensitive form of a title."""
  return " ".join(str(title).lower().split())


def title_table(dataset) -> np.ndarray:
  """(num_items + 1,) int32 title id per item; equal titles share an id.

  Items without a title get ids of their own (never a hit by title unless
  they are the target itself); row 0 is -1.

  Raises:
    ValueError: the dataset has no "title" item feature.
  """
  titles = dataset.item_features.get("title")
  if titles is None:
    raise ValueError(f"dataset {dataset.name!r} has no 'title' item feature; "
                     f"its item features: {sorted(dataset.item_features)}")
  ids, out = {}, np.full(dataset.num_items + 1, -1, np.int32)
  for item in range(1, dataset.num_items + 1):
    key = normalise_title(titles[item]) if titles[item] else ("#", item)
    out[item] = ids.setdefault(key, len(ids))
  return out


def title_hits(
    items_bk: jax.Array,
    targets_b: jax.Array,
    title_ids_v: jax.Array,
    ks: Sequence[int] = (10,)) -> dict[str, jax.Array]:
  """Per-user `title_hit@k`: an item titled like the target in the top k.

  Args:
    items_bk: (B, K) ranked item ids (0 = none, never a hit).
    targets_b: (B,) target item ids.
    title_ids_v: (V,) `title_table`.
    ks: static cut-offs, each <= K.
  """
  ks = tuple(int(k) for k in ks)
  if not ks or min(ks) < 1 or max(ks) > items_bk.shape[1]:
    raise ValueError(f"ks {ks} must be in [1, {items_bk.shape[1]}].")
  title_ids_v = jnp.asarray(title_ids_v)
  same_bk = (title_ids_v[items_bk] == title_ids_v[targets_b][:, None]) & (
      items_bk > 0)
  return {
      f"title_hit@{k}": jnp.any(same_bk[:, :k], axis=1).astype(jnp.float32)
      for k in ks
  }

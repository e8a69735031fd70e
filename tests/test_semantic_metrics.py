"""Semantic metrics: label agreement of the top-1 item, title hit rate."""

import jax
import numpy as np
import pytest

from taiji_jax.data import load_dataset
from taiji_jax.evaluate import metrics
from taiji_jax.evaluate import semantic


class _Movies:
  """Five items: genres (multi-label), titles with one duplicate."""
  name = "movies"
  num_items = 5
  item_features = {
      "genres":
          (None, ("Comedy",), ("Comedy", "Drama"), ("Drama",), (), ("Horror",)),
      "title": (None, "Heat", "heat ", "Alien", None, "Jaws"),
  }


def test_label_table_marks_each_items_labels():
  table, names = semantic.label_table(_Movies(), "genres")
  assert names == ["Comedy", "Drama", "Horror"]
  np.testing.assert_array_equal(
      table.astype(int),
      [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]])
  with pytest.raises(ValueError, match="no item feature 'brand'.*genres"):
    semantic.label_table(_Movies(), "brand")


def test_label_metrics_by_hand():
  table, _ = semantic.label_table(_Movies(), "genres")
  items = np.array([[2, 1], [1, 3], [3, 2], [4, 1], [0, 0]])
  targets = np.array([1, 1, 2, 3, 3])
  out = jax.jit(semantic.label_metrics)(items, targets, table)
  # top-1 2={C,D} vs 1={C}: shares, not exact, J=1/2; 1 vs 1: exact;
  # 3={D} vs 2={C,D}: shares, J=1/2; 4 has no label; empty slot.
  np.testing.assert_array_equal(out["label_acc@1"], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(out["label_exact@1"], [0, 1, 0, 0, 0])
  np.testing.assert_allclose(out["label_jaccard@1"], [0.5, 1, 0.5, 0, 0])
  mean = metrics.mean_metrics(out, targets > 0)
  assert mean["label_acc@1"] == pytest.approx(3 / 5)


def test_title_hits_count_equal_titles_and_never_empty_slots():
  ids = semantic.title_table(_Movies())
  assert ids[1] == ids[2]  # "Heat" and "heat " are one title
  assert len({ids[1], ids[3], ids[4], ids[5]}) == 4 and ids[0] == -1
  items = np.array([[2, 3], [3, 5], [0, 0], [5, 4]])
  targets = np.array([1, 5, 4, 4])
  out = semantic.title_hits(items, targets, ids, ks=(1, 2))
  np.testing.assert_array_equal(out["title_hit@1"], [1, 0, 0, 0])
  np.testing.assert_array_equal(out["title_hit@2"], [1, 1, 0, 1])
  with pytest.raises(ValueError, match="ks"):
    semantic.title_hits(items, targets, ids, ks=(3,))


def test_with_unique_titles_title_hit_equals_recall():
  dataset = load_dataset("synthetic", num_users=20, num_items=30, seed=2)
  ids = semantic.title_table(dataset)
  if len(set(ids[1:].tolist())) != dataset.num_items:
    pytest.fail("the synthetic dataset's titles must be unique for this test")
  rng = np.random.default_rng(0)
  items = rng.integers(1, dataset.num_items + 1, (50, 10))
  targets = rng.integers(1, dataset.num_items + 1, 50)
  hits = semantic.title_hits(items, targets, ids, ks=(5, 10))
  recall = metrics.ranking_metrics(items, targets, (5, 10))
  for k in (5, 10):
    np.testing.assert_array_equal(hits[f"title_hit@{k}"], recall[f"recall@{k}"])
  table, _ = semantic.label_table(dataset, "category")
  assert table[1:].any(axis=1).all()


def test_numpy_tables_work_inside_jit():
  table, _ = semantic.label_table(_Movies(), "genres")
  ids = semantic.title_table(_Movies())
  items, targets = np.array([[2, 3]]), np.array([1])
  run = jax.jit(lambda i, t: {
      **semantic.label_metrics(i, t, table),
      **semantic.title_hits(i, t, ids, (1,))
  })
  out = run(items, targets)
  assert float(out["label_acc@1"][0]) == 1.0
  assert float(out["title_hit@1"][0]) == 1.0

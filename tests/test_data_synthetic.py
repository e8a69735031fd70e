"""Tests of the synthetic dataset generator and its planted structure."""

import numpy as np
import pytest

from taiji_jax import data as data_lib
from taiji_jax.data import synthetic

ARRAYS = ("user_raw_ids", "item_raw_ids", "inter_users", "inter_items",
          "inter_times")


@pytest.fixture(scope="module")
def default():
  return synthetic.make_synthetic()


def _transitions(dataset):
  """(previous, next) item pairs of consecutive interactions of each user."""
  seqs = [s for s in dataset.sequences()[1:] if len(s) > 1]
  return (np.concatenate([s[:-1] for s in seqs]),
          np.concatenate([s[1:] for s in seqs]))


def test_deterministic_given_seed(default):
  again = synthetic.make_synthetic()
  other = synthetic.make_synthetic(seed=1)
  for field in ARRAYS:
    np.testing.assert_array_equal(
        getattr(default, field), getattr(again, field))
  np.testing.assert_array_equal(default.inter_ratings, again.inter_ratings)
  assert default.item_features == again.item_features
  assert default.user_features == again.user_features
  assert default.report == again.report
  assert not np.array_equal(default.inter_items[:100], other.inter_items[:100])
  assert default.item_features != other.item_features


def test_sizes_and_metadata(default):
  assert default.name == "synthetic"
  assert default.source == (
      "generated: make_synthetic(num_users=200, num_items=300, "
      "num_clusters=6, min_len=8, max_len=40, drift=0.15, seed=0)")
  assert default.num_users == 200
  assert default.num_items == 300  # Every generated item is visited here.
  assert default.report["metadata_items_without_interactions"] == 0
  lengths = np.bincount(default.inter_users)[1:]
  assert lengths.min() >= 8 and lengths.max() <= 40
  assert lengths.sum() == default.report["interactions_generated"]
  assert np.isnan(default.inter_ratings).all()
  assert tuple(default.item_features) == ("title", "category", "tags")
  assert tuple(default.user_features) == ("age_group", "favorite_category")
  clusters = synthetic.item_cluster(default)
  assert clusters.shape == (301,) and clusters[0] == -1
  assert sorted(np.bincount(clusters[1:])) == [50] * 6
  small = synthetic.make_synthetic(
      num_users=3, num_items=40, num_clusters=4, min_len=3, max_len=3)
  assert small.num_users == 3 and small.num_interactions == 9
  assert small.num_items + small.report[
      "metadata_items_without_interactions"] == 40


def test_item_and_user_text_follow_clusters(default):
  clusters = synthetic.item_cluster(default)
  for item in range(1, default.num_items + 1):
    name = synthetic.cluster_name(clusters[item])
    vocabulary = dict(synthetic.GENRES)[name]
    title = default.item_features["title"][item]
    words = title.lower().split()
    assert words[0] in vocabulary and words[1] in vocabulary
    assert words[2] == str(int(default.item_raw_ids[item][1:]))
    assert set(default.item_features["tags"][item]) <= set(vocabulary)
    assert f"category: {name}" in default.item_text(item)
  assert "age group: " in default.user_text(1)
  assert "favorite category: " in default.user_text(1)
  # The walk starts in the favourite cluster.
  firsts = [s[0] for s in default.sequences()[1:]]
  favourites = default.user_features["favorite_category"][1:]
  assert [synthetic.cluster_name(clusters[i]) for i in firsts
         ] == list(favourites)


def test_cluster_names_round_trip():
  names = [synthetic.cluster_name(k) for k in range(30)]
  assert len(set(names)) == 30
  assert names[0] == "mystery" and names[12] == "mystery-2"
  assert [synthetic.cluster_index(n) for n in names] == list(range(30))
  with pytest.raises(ValueError, match="mystery-1"):
    synthetic.cluster_index("mystery-1")


def test_timestamps_strictly_increase_per_user(default):
  for u in range(1, default.num_users + 1):
    times = default.inter_times[default.inter_users == u]
    assert np.all(np.diff(times) > 0)
  assert np.all(np.diff(default.inter_users) >= 0)


@pytest.mark.parametrize("drift", [0.0, 0.15, 0.4, 1.0])
def test_cluster_stays_match_drift(drift):
  data = synthetic.make_synthetic(drift=drift, seed=3)
  clusters = synthetic.item_cluster(data)
  prev, nxt = _transitions(data)
  stay = np.mean(clusters[prev] == clusters[nxt])
  assert abs(stay - (1 - drift)) < 0.03
  assert data.report["cluster_switches"] == pytest.approx(
      drift * len(prev), abs=0.03 * len(prev))


def test_ring_successor_beats_popularity(default):
  successor = synthetic.ring_successor(default)
  clusters = synthetic.item_cluster(default)
  assert successor[0] == 0
  assert np.all(clusters[successor[1:]] == clusters[1:])
  assert sorted(successor[1:]) == list(range(1, 301))  # A permutation.
  prev, nxt = _transitions(default)
  ring_hits = np.mean(successor[prev] == nxt)
  top10 = np.argsort(-np.bincount(default.inter_items))[:10]
  popularity_hits = np.mean(np.isin(nxt, top10))
  # Stepping exactly one place happens with p = 0.8 * (1 - drift) = 0.68.
  assert ring_hits > 0.6
  assert ring_hits > 5 * popularity_hits  # Top-1 ring vs top-10 popularity.


@pytest.mark.parametrize("kwargs, message", [
    ({
        "num_users": 0
    }, "num_users must be >= 1, got 0"),
    ({
        "num_items": 0
    }, "num_items must be >= 1, got 0"),
    ({
        "num_clusters": 301
    }, r"num_clusters must be in \[1, num_items=300\], "
     "got 301"),
    ({
        "num_clusters": 0
    }, "num_clusters must be in"),
    ({
        "min_len": 2
    }, "min_len must be >= 3, got 2"),
    ({
        "max_len": 7
    }, "max_len must be >= min_len=8, got 7"),
    ({
        "drift": -0.1
    }, r"drift must be a number in \[0, 1\], got -0.1"),
    ({
        "drift": 1.5
    }, r"drift must be a number in \[0, 1\], got 1.5"),
    ({
        "drift": float("nan")
    }, "drift must be a number"),
    ({
        "drift": "0.1"
    }, "drift must be a number"),
    ({
        "seed": -1
    }, "seed must be >= 0, got -1"),
    ({
        "num_users": 2.5
    }, "num_users must be an integer, got 2.5"),
    ({
        "min_len": True
    }, "min_len must be an integer, got True"),
])
def test_argument_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    synthetic.make_synthetic(**kwargs)


def test_one_cluster_and_numpy_arguments():
  data = synthetic.make_synthetic(
      num_users=np.int64(5), num_items=7, num_clusters=1, drift=0.5)
  assert data.num_users == 5
  assert set(synthetic.item_cluster(data)[1:]) == {0}


def test_leave_one_out_split(default):
  split = default.split_leave_one_out(max_len=10)
  assert split["counts"]["valid_users"] == 200
  assert split["counts"]["test_users"] == 200
  seqs = default.sequences()
  test = split["test"]
  assert test["histories"].shape == (200, 10)
  for row, u in enumerate(test["users"]):
    history = seqs[u][-11:-1]
    np.testing.assert_array_equal(test["histories"][row, 10 - len(history):],
                                  history)
    assert not test["histories"][row, :10 - len(history)].any()
    assert test["targets"][row] == seqs[u][-1]
    assert split["valid"]["targets"][row] == seqs[u][-2]
  assert all(
      len(s) == len(seqs[u]) - 2
      for u, s in zip(split["train"]["users"], split["train"]["sequences"]))


def test_load_dataset_dispatch():
  data = data_lib.load_dataset("synthetic", num_users=10, seed=4)
  expected = synthetic.make_synthetic(num_users=10, seed=4)
  np.testing.assert_array_equal(data.inter_items, expected.inter_items)

"""Held-out judges: item-kNN by hand, the min-max preference judge, the
centred semantic judge, and the settings that would make a judge the
reward."""

import ml_collections
import numpy as np
import pytest

from taiji_jax.rl import data as rl_data
from taiji_jax.rl import judges


def test_item_knn_is_the_cosine_over_training_users():
  # Users: {1, 2}, {1, 2, 3}, {3}; items 1..4 (4 never seen).
  sim = judges.item_knn([[1, 2], [2, 1, 3], [3]], 4, neighbours=0)
  assert sim.shape == (5, 5)
  assert sim[1, 2] == pytest.approx(1.0)  # same two users
  assert sim[1, 3] == pytest.approx(1 / (np.sqrt(2) * np.sqrt(2)))
  assert np.all(sim[4] == 0) and np.all(sim[:, 0] == 0)
  assert np.all(np.diag(sim) == 0)
  np.testing.assert_allclose(sim, sim.T)
  top1 = judges.item_knn([[1, 2], [2, 1, 3], [3]], 4, neighbours=1)
  assert top1[1, 2] == pytest.approx(1.0) and top1[1, 3] == 0.0


def test_item_knn_names_bad_ids():
  with pytest.raises(ValueError, match="sequence 1 has item ids outside"):
    judges.item_knn([[1], [5]], 4)


def test_preference_judge_min_maxes_knn_scores_over_unseen_items():
  sim = judges.item_knn([[1, 2], [2, 1, 3], [3, 4], [4, 5]], 5, neighbours=0)
  seen = np.array([[1, 0, 0]], np.int32)
  raw = sim[1]  # the user saw item 1 only
  unseen = [2, 3, 4, 5]
  lo, hi = raw[unseen].min(), raw[unseen].max()
  items = np.array([[2, 3, 5, 0]], np.int32)
  out = judges.judge_metrics({"judge_item_knn": sim}, items, np.array([3]),
                             seen, names=("preference",), ks=(1, 4))
  want = [(raw[i] - lo) / (hi - lo) for i in (2, 3, 5)] + [0.0]
  assert float(out["judge/preference@1"][0]) == pytest.approx(want[0])
  assert float(out["judge/preference@4"][0]) == pytest.approx(np.mean(want))


def test_semantic_judge_is_the_centred_cosine():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 4)) + 5.0  # a large shared direction
  table = judges.centred_rows(x)
  assert np.all(table[0] == 0)
  c = x - x.mean(0)
  c /= np.linalg.norm(c, axis=1, keepdims=True)
  out = judges.judge_metrics({"judge_item_embeddings": table},
                             np.array([[2, 3]]), np.array([1]),
                             np.zeros((1, 1), np.int32), names=("semantic",),
                             ks=(1, 2))
  assert float(out["judge/semantic@1"][0]) == pytest.approx(c[1] @ c[0],
                                                            abs=1e-5)
  assert float(out["judge/semantic@2"][0]) == pytest.approx(
      (c[1] @ c[0] + c[2] @ c[0]) / 2, abs=1e-5)


def _config(**judges_cfg):
  return ml_collections.ConfigDict({
      "progress_bar": False,
      "text_encoder": {"name": "all-MiniLM-L6-v2", "path": ""},
      "judges": {
          "names": ("semantic",),
          "text_encoder": {"name": "all-MiniLM-L6-v2", "path": "",
                           "batch_size": 8},
          "knn_neighbours": 10,
          "knn_shrink": 0.0,
          **judges_cfg
      }
  })


def test_a_judge_that_is_the_reward_or_unknown_is_refused(tmp_path):
  with pytest.raises(ValueError, match="is the semantic reward's encoder"):
    rl_data.judge_tables(_config(), None, None, tmp_path, tmp_path)
  with pytest.raises(ValueError, match="unknown \\['ctr'\\]"):
    rl_data.judge_tables(_config(names=("ctr",)), None, None, tmp_path,
                         tmp_path)

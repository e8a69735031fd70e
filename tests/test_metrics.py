"""Tests for taiji_jax.evaluate.metrics: full-sort top-k and ranking metrics."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taiji_jax.evaluate import metrics

KS = (5, 10, 20)
NAMES = ("recall", "ndcg", "mrr")

# Jitted once here: one compile per shape is much cheaper than eager
# op-by-op dispatch. `test_jit_matches_eager` covers the eager path.
_jit_topk = jax.jit(metrics.full_sort_topk, static_argnames="k")
_jit_rank = jax.jit(metrics.ranking_metrics, static_argnames="ks")


def _topk(scores, seen, k):
  """Jitted `full_sort_topk` with numpy inputs and outputs."""
  return jax.device_get(_jit_topk(jnp.asarray(scores), jnp.asarray(seen), k=k))


def _rank(topk, target, ks=KS):
  """Jitted `ranking_metrics` with numpy inputs and outputs."""
  out = _jit_rank(
      jnp.asarray(topk, jnp.int32), jnp.asarray(target, jnp.int32), ks=ks)
  return jax.device_get(out)


def _row(ids, length=25):
  """A top-k row holding `ids` first, then distinct filler ids >= 900."""
  ids = list(ids)
  return ids + [900 + i for i in range(length - len(ids))]


def _expected(rank, ks=KS):
  """Metric values for a target at 1-based `rank` (None for a miss)."""
  out = {}
  for k in ks:
    hit = rank is not None and rank <= k
    out[f"recall@{k}"] = 1.0 if hit else 0.0
    out[f"ndcg@{k}"] = 1.0 / math.log2(rank + 1) if hit else 0.0
    out[f"mrr@{k}"] = 1.0 / rank if hit else 0.0
  return out


def test_keys_shapes_and_dtypes():
  out = _rank([_row([7]), _row([8]), _row([9]), _row([1])], [7, 3, 9, 0])
  assert set(out) == {f"{n}@{k}" for n in NAMES for k in KS}
  for value in out.values():
    assert value.shape == (4,)
    assert value.dtype == np.float32


def test_rank_one_two_three_and_miss():
  topk = [_row([7, 2, 3]), _row([4, 5, 9]), _row([4, 5, 6]), _row([4, 6])]
  out = _rank(topk, [7, 9, 1, 6])
  for name in out:
    assert out[name][0] == pytest.approx(1.0), name
    assert out[name][2] == 0.0, name
  for k in KS:
    assert out[f"recall@{k}"][1] == 1.0
    assert out[f"ndcg@{k}"][1] == pytest.approx(0.5)  # 1 / log2(4)
    assert out[f"mrr@{k}"][1] == pytest.approx(1.0 / 3.0)
    assert out[f"recall@{k}"][3] == 1.0
    assert out[f"ndcg@{k}"][3] == pytest.approx(1.0 / math.log2(3.0))
    assert out[f"mrr@{k}"][3] == pytest.approx(0.5)


@pytest.mark.parametrize("k", KS)
def test_target_exactly_at_and_just_past_each_cutoff(k):
  target = 77
  at_k = _row([1000 + i for i in range(k - 1)] + [target])
  past_k = _row([1000 + i for i in range(k)] + [target])
  # Two padding rows keep the batch shape of the other tests (one compile).
  out = _rank([at_k, past_k, at_k, at_k], [target, target, 0, 0])
  for row, rank in ((0, k), (1, k + 1)):
    want = _expected(rank)
    for name, value in want.items():
      assert out[name][row] == pytest.approx(value, rel=1e-6), (name, row)
  assert out[f"recall@{k}"][0] == 1.0
  assert out[f"mrr@{k}"][0] == pytest.approx(1.0 / k)
  assert out[f"ndcg@{k}"][0] == pytest.approx(1.0 / math.log2(k + 1))
  assert out[f"recall@{k}"][1] == 0.0
  assert out[f"ndcg@{k}"][1] == 0.0
  assert out[f"mrr@{k}"][1] == 0.0


def test_padding_rows_and_padding_slots():
  topk = [
      _row([0, 0, 5]),  # padding slots occupy positions 1-2; target at 3.
      _row([0, 5, 6]),  # padding row (target 0) holding a 0 slot.
      _row([0, 0, 0]),  # padding row, only 0 slots in front.
      [0] * 25,  # a real target but an empty list.
  ]
  out = _rank(topk, [5, 0, 0, 5])
  want = _expected(3)
  for name in out:
    assert out[name][0] == pytest.approx(want[name]), name
    assert out[name][1] == 0.0, name
    assert out[name][2] == 0.0, name
    assert out[name][3] == 0.0, name


def test_duplicate_items_only_first_occurrence_counts():
  topk = [
      _row([5, 5, 5]),
      _row([2, 5, 5, 5]),
      _row([2, 2, 5]),
      _row([3, 1, 3, 2, 1])
  ]
  out = _rank(topk, [5, 5, 5, 2])
  for row, rank in ((0, 1), (1, 2), (2, 3), (3, 4)):
    for name, value in _expected(rank).items():
      assert out[name][row] == pytest.approx(value), (name, row)
  for value in out.values():
    assert np.all(value <= 1.0)


def test_k_larger_than_list_raises_naming_k_and_K():
  topk = jnp.ones((3, 10), jnp.int32)
  target = jnp.ones((3,), jnp.int32)
  with pytest.raises(ValueError, match=r"k=20.*K=10"):
    metrics.ranking_metrics(topk, target, (5, 20))
  jitted = jax.jit(functools.partial(metrics.ranking_metrics, ks=(11,)))
  with pytest.raises(ValueError, match=r"k=11.*K=10"):
    jitted(topk, target)
  with pytest.raises(ValueError):
    metrics.ranking_metrics(topk, target, (0,))
  # k == K is allowed.
  out = _rank(topk, target, (10,))
  np.testing.assert_array_equal(out["recall@10"], np.ones(3, np.float32))


def test_full_sort_masks_padding_and_seen_items():
  # Scores favour the seen items and the padding column.
  scores = jnp.array([
      [100.0, 9.0, 8.0, 1.0, 7.0, 2.0, 3.0],
      [100.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
  ])
  seen = jnp.array([
      [1, 2, 2, 0, 0],  # duplicate 2, 0-padding
      [6, 0, 6, 5, 0],
  ])
  items, top_scores = _topk(scores, seen, 4)
  assert items.dtype == jnp.int32
  assert items.shape == (2, 4) and top_scores.shape == (2, 4)
  np.testing.assert_array_equal(items, [[4, 6, 5, 3], [4, 3, 2, 1]])
  np.testing.assert_allclose(top_scores, [[7, 3, 2, 1], [4, 3, 2, 1]])
  for row, seen_row in enumerate(np.asarray(seen)):
    assert not set(np.asarray(items[row])) & set(seen_row.tolist())


def test_full_sort_ties_break_toward_lower_id():
  scores = jnp.array([
      [0.0, 1.0, 5.0, 3.0, 5.0, 5.0, 0.5],
      [9.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
  ])
  seen = jnp.array([[0, 0, 0, 0, 0], [3, 0, 3, 0, 0]])
  items, _ = _topk(scores, seen, 4)
  np.testing.assert_array_equal(items, [[2, 4, 5, 3], [1, 2, 4, 5]])
  # Tied items 2 and 4: the lower id gets rank 1, the other rank 2.
  out = _rank(items, jnp.array([4, 1]), (1, 4))
  assert out["recall@1"][0] == 0.0
  assert out["recall@4"][0] == 1.0
  assert out["mrr@4"][0] == pytest.approx(0.5)
  assert out["ndcg@4"][0] == pytest.approx(1.0 / math.log2(3.0))
  assert out["mrr@1"][1] == 1.0
  assert out["ndcg@1"][1] == 1.0


def test_full_sort_fewer_than_k_candidates_pads_with_zero():
  scores = jnp.array([
      [5.0, 1.0, 4.0, 3.0, 2.0, 6.0],
      [5.0, 1.0, 4.0, 3.0, 2.0, 6.0],
      [5.0, 1.0, -jnp.inf, 3.0, 2.0, 6.0],
  ])
  seen = jnp.array([
      [5, 2, 3, 0],  # leaves items 4 and 1.
      [1, 2, 3, 5],  # leaves only item 4.
      [5, 0, 0, 0],  # item 2 is already -inf: leaves 3, 4 and 1.
  ])
  items, top_scores = _topk(scores, seen, 5)
  np.testing.assert_array_equal(
      items, [[4, 1, 0, 0, 0], [4, 0, 0, 0, 0], [3, 4, 1, 0, 0]])
  assert np.all(np.isneginf(np.asarray(top_scores)[np.asarray(items) == 0]))
  # Metrics on the 0-padded lists: row 2's target was masked, so a miss.
  out = _rank(items, [1, 4, 2], (1, 5))
  np.testing.assert_allclose(out["mrr@5"], [0.5, 1.0, 0.0])
  np.testing.assert_allclose(out["recall@1"], [0.0, 1.0, 0.0])
  # k == N + 1 is the largest allowed.
  items, _ = _topk(scores, np.zeros((3, 4), np.int32), 6)
  np.testing.assert_array_equal(items[:, -1], [0, 0, 0])
  with pytest.raises(ValueError, match="k=7"):
    _topk(scores, seen, 7)


def _random_case(seed, batch=37, num_items=101, num_seen=15, k=20):
  rng = np.random.default_rng(seed)
  # Integer-valued scores in a small range produce many ties.
  scores = rng.integers(0, 30, size=(batch, num_items + 1)).astype(np.float32)
  seen = rng.integers(1, num_items + 1, size=(batch, num_seen))
  seen[rng.random(seen.shape) < 0.3] = 0
  target = rng.integers(1, num_items + 1, size=(batch,))
  target[rng.random(batch) < 0.15] = 0
  # Put some targets near the top so that every cut-off sees hits.
  boost = rng.random(batch) < 0.5
  scores[boost, target[boost]] = 29.0
  return scores, seen, target, k


def _reference(scores, seen, target, ks):
  """Straightforward numpy leave-one-out metrics via a stable argsort."""
  batch, num_columns = scores.shape
  out = {f"{n}@{k}": np.zeros(batch) for n in NAMES for k in ks}
  for b in range(batch):
    excluded = set(seen[b].tolist()) | {0}
    order = np.argsort(-scores[b], kind="stable")  # ties: lower id first.
    ranked = [int(i) for i in order if int(i) not in excluded]
    if target[b] == 0 or target[b] not in ranked:
      continue
    rank = ranked.index(int(target[b])) + 1
    for k in ks:
      if rank <= k:
        out[f"recall@{k}"][b] = 1.0
        out[f"ndcg@{k}"][b] = 1.0 / np.log2(rank + 1)
        out[f"mrr@{k}"][b] = 1.0 / rank
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cross_check_against_numpy_reference(seed):
  scores, seen, target, k = _random_case(seed)
  items, _ = _topk(scores, seen, k)
  # The top-k list itself matches the reference ordering.
  for b in range(scores.shape[0]):
    excluded = set(seen[b].tolist()) | {0}
    order = np.argsort(-scores[b], kind="stable")
    ranked = [int(i) for i in order if int(i) not in excluded][:k]
    np.testing.assert_array_equal(np.asarray(items[b]), ranked)
  got = _rank(items, jnp.asarray(target), KS)
  want = _reference(scores, seen, target, KS)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)
  assert want["recall@20"].sum() > 0  # the case exercises hits.
  valid = target > 0
  means = metrics.mean_metrics(got, valid)
  for name in want:
    assert means[name] == pytest.approx(want[name][valid].mean(), rel=1e-6)


def test_jit_matches_eager():
  scores, seen, target, k = _random_case(7)  # cross-check shapes: cached jit.
  scores, seen, target = map(jnp.asarray, (scores, seen, target))
  eager_items, eager_scores = metrics.full_sort_topk(scores, seen, k)
  jit_items, jit_scores = _jit_topk(scores, seen, k=k)
  np.testing.assert_array_equal(jit_items, eager_items)
  np.testing.assert_array_equal(jit_scores, eager_scores)
  eager = metrics.ranking_metrics(eager_items, target, KS)
  got = _jit_rank(jit_items, target, ks=KS)
  assert set(got) == set(eager)
  for name in eager:
    np.testing.assert_array_equal(got[name], eager[name])


def test_mean_metrics_uses_only_valid_rows():
  per_user = {
      "recall@5": jnp.array([1.0, 0.0, 1.0, 0.0]),
      "mrr@5": np.array([0.5, 0.0, 1.0, 0.25]),
  }
  valid = jnp.array([True, True, False, True])
  means = metrics.mean_metrics(per_user, valid)
  assert means == {
      "recall@5": pytest.approx(1.0 / 3.0),
      "mrr@5": pytest.approx(0.25),
  }
  assert all(isinstance(v, float) for v in means.values())
  empty = metrics.mean_metrics(per_user, np.zeros(4, bool))
  assert all(math.isnan(v) for v in empty.values())
  with pytest.raises(ValueError, match="recall@5"):
    metrics.mean_metrics({"recall@5": np.zeros(3)}, valid)

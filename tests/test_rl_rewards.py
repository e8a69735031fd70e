"""RL rewards against numpy computations written out by hand."""

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from taiji_jax.models import sasrec as sasrec_lib
from taiji_jax.rl import rewards as rewards_lib

NUM_ITEMS = 11


def _inputs(**kw):
  n = len(kw["items"])
  base = dict(
      targets=np.ones(n, np.int32),
      seen=np.zeros((n, 3), np.int32),
      pref_histories=np.zeros((n, 5), np.int32),
      format_ok=np.ones(n, bool),
      beam_items=np.zeros((n, 0), np.int32))
  base.update(kw)
  return rewards_lib.RewardInputs(**{k: jnp.asarray(v) for k, v in base.items()})


def test_semantic_reward_is_the_cosine_of_item_embeddings():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(NUM_ITEMS + 1, 7)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  emb[0] = 0
  items = np.array([3, 5, 0, 5])
  targets = np.array([3, 2, 2, 9])
  fn = rewards_lib.make_reward_fn(["semantic"])
  got = np.asarray(
      fn({"item_embeddings": jnp.asarray(emb)},
         _inputs(items=items, targets=targets)))[:, 0]
  want = [1.0, emb[5] @ emb[2], 0.0, emb[5] @ emb[9]]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_preference_reward_is_sasrec_min_max_over_unseen_items():
  cfg = sasrec_lib.SASRecConfig.tiny(NUM_ITEMS, max_len=5)
  model = sasrec_lib.SASRec(cfg, rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model, nnx.Param)
  hist = np.array([[0, 0, 1, 2, 3], [0, 4, 5, 6, 7], [0, 0, 0, 0, 9]],
                  np.int32)
  seen = np.array([[1, 2, 3], [4, 5, 0], [9, 0, 0]], np.int32)
  items = np.array([4, 8, 0], np.int32)
  fn = rewards_lib.make_reward_fn(["preference"], graphdef)
  got = np.asarray(
      fn({"sasrec_params": params},
         _inputs(items=items, seen=seen, pref_histories=hist)))[:, 0]
  scores = np.asarray(sasrec_lib.score(model, jnp.asarray(hist)))
  want = []
  for row in range(3):
    candidates = [
        i for i in range(1, NUM_ITEMS + 1) if i not in set(seen[row].tolist())
    ]
    s = scores[row, candidates]
    value = (scores[row, items[row]] - s.min()) / (s.max() - s.min())
    want.append(value if items[row] else 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert ((got >= 0) & (got <= 1)).all()


def test_preference_needs_a_model():
  with pytest.raises(ValueError, match="SASRec"):
    rewards_lib.make_reward_fn(["preference"])


def test_hit_uses_the_beam_when_there_is_one_and_format_the_flag():
  items = np.array([2, 3, 4, 0])
  targets = np.array([2, 5, 6, 6])
  hit = rewards_lib.make_reward_fn(["hit", "format"])
  plain = np.asarray(
      hit({},
          _inputs(
              items=items,
              targets=targets,
              format_ok=np.array([1, 0, 1, 1], bool))))
  np.testing.assert_array_equal(plain[:, 0], [1, 0, 0, 0])
  np.testing.assert_array_equal(plain[:, 1], [1, 0, 1, 0])  # no answer: 0
  beam = np.array([[7, 2], [5, 1], [1, 2], [6, 6]])
  beamed = np.asarray(
      hit({}, _inputs(items=items, targets=targets, beam_items=beam)))
  np.testing.assert_array_equal(beamed[:, 0], [1, 1, 0, 0])


def test_unknown_or_repeated_rewards_are_refused():
  with pytest.raises(ValueError, match="known"):
    rewards_lib.make_reward_fn(["semantic", "ctr"])
  with pytest.raises(ValueError, match="repeated"):
    rewards_lib.make_reward_fn(["hit", "hit"])


def test_stats_ignore_non_finite_values_and_count_them():
  r = jnp.asarray([[1.0, 0.0], [np.nan, 2.0], [3.0, np.inf], [5.0, 4.0]])
  stats = rewards_lib.reward_stats(r, ["a", "b"])
  assert stats["reward/a/mean"] == pytest.approx(3.0)
  assert stats["reward/a/std"] == pytest.approx(np.std([1.0, 3.0, 5.0]))
  assert stats["reward/a/nonfinite"] == pytest.approx(0.25)
  assert stats["reward/b/min"] == 0.0 and stats["reward/b/max"] == 4.0
  np.testing.assert_array_equal(
      rewards_lib.finite_rows(r), [True, False, False, True])

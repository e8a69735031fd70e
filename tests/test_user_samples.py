"""Fixed user samples: evaluation (`eval.num_users`) and CoT examples
(`cot.num_users`) measure every run and seed on the same users."""

import ml_collections
import numpy as np
import pytest

from taiji_jax.sidlm import rows
from taiji_jax.sidlm import task


def _part(num_users=40, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "users": np.arange(1, num_users + 1, dtype=np.int32),
      "histories": rng.integers(1, 50, (num_users, 6)).astype(np.int32),
      "targets": rng.integers(1, 50, num_users).astype(np.int32),
      "seen_items": rng.integers(0, 50, (num_users, 9)).astype(np.int32),
  }


def _config(num_users):
  return ml_collections.ConfigDict({"eval": {"num_users": num_users}})


def test_a_sampled_user_keeps_all_its_rows_and_the_sample_is_fixed():
  users = np.repeat(np.arange(1, 31), 3)  # 3 rows per user
  keep = rows.fixed_users(users, 7, "cot.num_users")
  assert len(np.unique(users[keep])) == 7 and keep.sum() == 21
  # The same users whatever the rows' order (a function of the set).
  perm = np.random.default_rng(1).permutation(len(users))
  again = rows.fixed_users(users[perm], 7, "cot.num_users")
  assert set(users[perm][again]) == set(users[keep])
  assert rows.fixed_users(users, 0, "cot.num_users").all()
  assert rows.fixed_users(users, 30, "cot.num_users").all()


@pytest.mark.parametrize("size", [-1, 31])
def test_a_sample_size_out_of_range_is_named(size):
  with pytest.raises(ValueError, match=rf"cot.num_users={size}: must be in "
                     r"\[0, 30\]"):
    rows.fixed_users(np.arange(1, 31), size, "cot.num_users")


def test_eval_users_subsets_every_field_alike_and_the_same_for_valid_and_test():
  valid, test = _part(seed=0), _part(seed=1)
  a = task.eval_users(valid, _config(12))
  b = task.eval_users(test, _config(12))
  np.testing.assert_array_equal(a["users"], b["users"])
  assert len(a["users"]) == 12
  idx = a["users"] - 1  # users 1..40 at rows 0..39
  for key in valid:
    np.testing.assert_array_equal(a[key], valid[key][idx])
  # 0, and a config.json written before the setting existed: every user.
  assert task.eval_users(valid, _config(0)) is valid
  no_key = ml_collections.ConfigDict({"eval": {"batch_size": 8}})
  assert task.eval_users(valid, no_key) is valid
  with pytest.raises(ValueError, match="eval.num_users=41"):
    task.eval_users(valid, _config(41))

"""Tests of the RecBole leave-one-out split and the input pipelines."""

import numpy as np
import pytest

from taiji_jax.data import dataset as dataset_lib
from taiji_jax.data import pipeline

# Users 1..5 have sequences of these lengths. Items are numbered in file
# order, so user 1 = [1], 2 = [2, 3], 3 = [4, 5, 6], 4 = [7..10],
# 5 = [11..70].
LENGTHS = (1, 2, 3, 4, 60)


def _seq(user):
  start = 1 + sum(LENGTHS[:user - 1])
  return list(range(start, start + LENGTHS[user - 1]))


@pytest.fixture(name="ds", scope="module")
def _ds():
  users, items, times = [], [], []
  for user in range(1, len(LENGTHS) + 1):
    for item in _seq(user):
      users.append(f"u{user}")
      items.append(f"i{item}")
      times.append(1000 + item)
  return dataset_lib.Dataset.from_interactions(
      name="toy", source="test", raw_users=users, raw_items=items, times=times)


def _row(values, width):
  """Right-aligns values in a zero row of the given width."""
  row = np.zeros(width, np.int32)
  if values:
    row[-len(values):] = values
  return row


def _left(values, width):
  """Left-aligns values in a zero row of the given width."""
  row = np.zeros(width, np.int32)
  row[:len(values)] = values
  return row


def test_fixture_ids(ds):
  assert list(ds.item_raw_ids[1:]) == [f"i{i}" for i in range(1, 71)]
  expected = [_seq(u) for u in range(1, 6)]
  assert [list(s) for s in ds.sequences()[1:]] == expected


def test_split_users_and_train_sequences(ds):
  split = ds.split_leave_one_out(max_len=50)
  np.testing.assert_array_equal(split["train"]["users"], [1, 2, 3, 4, 5])
  train = [list(s) for s in split["train"]["sequences"]]
  # n <= 2: all train; n == 3: drop the test target; n >= 4: drop two.
  assert train == [[1], [2, 3], [4, 5], [7, 8], list(range(11, 69))]
  assert all(s.dtype == np.int32 for s in split["train"]["sequences"])
  np.testing.assert_array_equal(split["valid"]["users"], [4, 5])
  np.testing.assert_array_equal(split["test"]["users"], [3, 4, 5])
  np.testing.assert_array_equal(split["valid"]["targets"], [9, 69])
  np.testing.assert_array_equal(split["test"]["targets"], [6, 10, 70])
  assert split["counts"] == {
      "train_users": 5,
      "train_targets": 0 + 1 + 1 + 1 + 57,
      "valid_users": 2,
      "test_users": 3,
  }


def test_every_interaction_is_used_once(ds):
  """Train targets + valid + test = all interactions but each first one."""
  split = ds.split_leave_one_out()
  counts = split["counts"]
  assert (counts["train_targets"] + counts["valid_users"] +
          counts["test_users"]) == ds.num_interactions - ds.num_users


def test_split_histories_right_aligned_and_truncated(ds):
  split = ds.split_leave_one_out(max_len=50)
  valid, test = split["valid"], split["test"]
  assert valid["histories"].shape == (2, 50)
  assert test["histories"].shape == (3, 50)
  np.testing.assert_array_equal(valid["histories"][0], _row([7, 8], 50))
  # 58 earlier items, the last 50 kept.
  np.testing.assert_array_equal(valid["histories"][1], range(19, 69))
  np.testing.assert_array_equal(test["histories"][0], _row([4, 5], 50))
  # Test histories include the valid target.
  np.testing.assert_array_equal(test["histories"][1], _row([7, 8, 9], 50))
  np.testing.assert_array_equal(test["histories"][2], range(20, 70))
  for part in (valid, test):
    for key in ("users", "histories", "targets", "seen_items"):
      assert part[key].dtype == np.int32, key


def test_split_seen_items_not_truncated(ds):
  split = ds.split_leave_one_out(max_len=50)
  valid, test = split["valid"], split["test"]
  # Width = the longest history; rows are left-aligned and 0-padded.
  assert valid["seen_items"].shape == (2, 58)
  assert test["seen_items"].shape == (3, 59)
  np.testing.assert_array_equal(valid["seen_items"][0], _left([7, 8], 58))
  np.testing.assert_array_equal(valid["seen_items"][1], range(11, 69))
  np.testing.assert_array_equal(test["seen_items"][0], _left([4, 5], 59))
  np.testing.assert_array_equal(test["seen_items"][1], _left([7, 8, 9], 59))
  np.testing.assert_array_equal(test["seen_items"][2], range(11, 70))


@pytest.mark.parametrize("max_len", [1, 2, 3, 59, 60, 100])
def test_split_history_lengths(ds, max_len):
  test = ds.split_leave_one_out(max_len=max_len)["test"]
  assert test["histories"].shape == (3, max_len)
  for row, user in enumerate([3, 4, 5]):
    before = _seq(user)[:-1]
    np.testing.assert_array_equal(test["histories"][row],
                                  _row(before[-max_len:], max_len))
  # Truncation never affects the seen items.
  np.testing.assert_array_equal(test["seen_items"][2], range(11, 70))


def test_split_rejects_bad_max_len(ds):
  with pytest.raises(ValueError, match="max_len"):
    ds.split_leave_one_out(max_len=0)


def test_split_follows_time_not_file_order():
  # One user whose file lists items newest first; "c" and "b" tie in time.
  ds = dataset_lib.Dataset.from_interactions(
      name="toy",
      source="test",
      raw_users=["x"] * 5,
      raw_items=["e", "d", "c", "b", "a"],
      times=[50, 40, 30, 30, 10])
  assert list(ds.item_raw_ids[1:]) == ["e", "d", "c", "b", "a"]
  np.testing.assert_array_equal(ds.sequences()[1], [5, 3, 4, 2, 1])
  split = ds.split_leave_one_out(max_len=3)
  assert [list(s) for s in split["train"]["sequences"]] == [[5, 3, 4]]
  np.testing.assert_array_equal(split["valid"]["histories"], [[5, 3, 4]])
  np.testing.assert_array_equal(split["valid"]["targets"], [2])
  np.testing.assert_array_equal(split["test"]["histories"], [[3, 4, 2]])
  np.testing.assert_array_equal(split["test"]["seen_items"], [[5, 3, 4, 2]])
  np.testing.assert_array_equal(split["test"]["targets"], [1])


def test_split_without_evaluated_users():
  ds = dataset_lib.Dataset.from_interactions(
      name="toy",
      source="test",
      raw_users=["x", "x", "y"],
      raw_items=["a", "b", "a"],
      times=[1, 2, 3])
  split = ds.split_leave_one_out(max_len=4)
  for part in ("valid", "test"):
    assert split[part]["histories"].shape == (0, 4)
    assert split[part]["targets"].shape == (0,)
  assert split["counts"]["train_targets"] == 1


def test_from_interactions_rejects_bad_columns():
  with pytest.raises(ValueError, match="no interactions"):
    dataset_lib.Dataset.from_interactions(
        name="toy", source="t", raw_users=[], raw_items=[], times=[])
  with pytest.raises(ValueError, match="differ in length"):
    dataset_lib.Dataset.from_interactions(
        name="toy",
        source="t",
        raw_users=["a"],
        raw_items=["x", "y"],
        times=[1, 2])
  with pytest.raises(ValueError, match="differ in length"):
    dataset_lib.Dataset.from_interactions(
        name="toy",
        source="t",
        raw_users=["a"],
        raw_items=["x"],
        times=[1],
        ratings=[1.0, 2.0])


def test_statistics(ds):
  stats = ds.statistics()
  assert stats["users"] == 5 and stats["items"] == 70
  assert stats["interactions"] == 70
  assert stats["density"] == pytest.approx(70 / (5 * 70))
  assert stats["avg_seq_len"] == pytest.approx(14.0)
  assert (stats["min_seq_len"], stats["max_seq_len"]) == (1, 60)


# (max_len, stride, sequence lengths).
WINDOW_CASES = [
    (3, None, (1,)),
    (3, None, (2,)),
    (3, None, (3, 4, 5)),
    (3, None, (10,)),
    (5, 5, (1, 2, 6, 7, 11, 12)),
    (4, 1, (10,)),
    (4, 2, (9, 10, 3)),
    (5, 3, (17, 2, 5)),
    (1, 1, (5,)),
    (2, 1, (1, 7)),
    (50, 10, (60, 4)),
]


def _sequences(lengths):
  """Sequences of globally unique items so that a target names its position."""
  out, start = [], 1
  for n in lengths:
    out.append(np.arange(start, start + n, dtype=np.int32))
    start += n
  return out


@pytest.mark.parametrize("max_len, stride, lengths", WINDOW_CASES)
def test_training_windows_cover_every_target_once(max_len, stride, lengths):
  seqs = _sequences(lengths)
  windows = pipeline.training_windows(seqs, max_len, stride)
  inputs, targets = windows["inputs"], windows["targets"]
  assert inputs.dtype == np.int32 and targets.dtype == np.int32
  assert inputs.shape == targets.shape
  assert inputs.shape[1] == max_len
  expected = np.sort(np.concatenate([s[1:] for s in seqs]))
  np.testing.assert_array_equal(np.sort(targets[targets != 0]), expected)
  where = {int(s[j]): (s, j) for s in seqs for j in range(len(s))}
  effective = max_len if stride is None else stride
  for w, p in zip(*np.nonzero(targets)):
    seq, j = where[int(targets[w, p])]
    assert inputs[w, p] == seq[j - 1]
    # The context before the target is the sequence's preceding items,
    # right-aligned; overlap gives at least max_len - stride + 1 of them.
    context = inputs[w, :p + 1]
    context = context[context != 0]
    np.testing.assert_array_equal(context, seq[j - len(context):j])
    assert len(context) >= min(j, max_len - effective + 1)
  # Every window ends in a target and is right-aligned.
  assert (targets[:, -1] != 0).all()
  assert (inputs[:, -1] != 0).all()
  for row in inputs:
    nonzero = np.nonzero(row)[0]
    assert nonzero.size and (np.diff(nonzero) == 1).all()
    assert nonzero[-1] == max_len - 1


@pytest.mark.parametrize("lengths", [(1,), (2,), (4,), (9,), (10,), (11,)])
def test_training_windows_count_without_overlap(lengths):
  windows = pipeline.training_windows(_sequences(lengths), 3)
  assert len(windows["inputs"]) == -(-(lengths[0] - 1) // 3)


def test_training_windows_exact_rows():
  windows = pipeline.training_windows([np.array([5, 6, 7, 8, 9])], 3, 2)
  np.testing.assert_array_equal(windows["inputs"], [[6, 7, 8], [0, 5, 6]])
  np.testing.assert_array_equal(windows["targets"], [[0, 8, 9], [0, 6, 7]])


def test_training_windows_empty_and_bad_stride():
  windows = pipeline.training_windows([np.array([3]), np.array([], int)], 4)
  assert windows["inputs"].shape == (0, 4)
  assert windows["targets"].shape == (0, 4)
  for stride in (0, 5):
    with pytest.raises(ValueError, match="stride"):
      pipeline.training_windows([np.arange(1, 9)], 4, stride)


def _rows(batch):
  """Row ids of a batch (0 for padding rows)."""
  return [int(x) for x in batch["row"]]


def _table(num_rows, width=3):
  """Rows whose every column identifies the row (1-based)."""
  ids = np.arange(1, num_rows + 1, dtype=np.int32)
  return {
      "row": ids,
      "inputs": np.repeat(ids[:, None], width, axis=1),
      "targets": np.repeat(-ids[:, None], width, axis=1),
  }


@pytest.mark.parametrize("num_rows, batch_size", [(10, 4), (12, 4), (3, 8),
                                                  (7, 1)])
def test_train_batches_are_epoch_aligned(num_rows, batch_size):
  epochs = 3
  ds = pipeline.train_batches(
      _table(num_rows), batch_size, seed=0, num_epochs=epochs)
  per_epoch = -(-num_rows // batch_size)
  batches = list(ds)
  assert len(ds) == len(batches) == per_epoch * epochs
  orders = []
  for e in range(epochs):
    rows = []
    for batch in batches[e * per_epoch:(e + 1) * per_epoch]:
      assert batch["row"].shape == (batch_size,)
      assert batch["inputs"].shape == (batch_size, 3)
      assert batch["targets"].shape == (batch_size, 3)
      # Each row is gathered whole; padding rows are all zeros.
      np.testing.assert_array_equal(batch["inputs"][:, 0], batch["row"])
      np.testing.assert_array_equal(batch["targets"][:, 2], -batch["row"])
      rows += _rows(batch)
    assert sorted(r for r in rows if r) == list(range(1, num_rows + 1))
    assert rows.count(0) == per_epoch * batch_size - num_rows
    orders.append(rows)
  if num_rows > 2:
    assert orders[0] != orders[1] and orders[1] != orders[2]


def test_train_batches_seeded():

  def order(seed):
    ds = pipeline.train_batches(_table(10), 4, seed=seed, num_epochs=2)
    return [_rows(b) for b in ds]

  assert order(3) == order(3)
  assert order(3) != order(4)


@pytest.mark.parametrize("consumed", [0, 2, 3, 7])
def test_train_batches_iterator_state_resumes(consumed):
  ds = pipeline.train_batches(_table(10), 4, seed=5, num_epochs=3)
  total = len(ds)
  iterator = iter(ds.to_iter_dataset())
  for _ in range(consumed):
    next(iterator)
  state = iterator.get_state()
  expected = [_rows(next(iterator)) for _ in range(total - consumed)]
  with pytest.raises(StopIteration):
    next(iterator)
  resumed = iter(
      pipeline.train_batches(_table(10), 4, seed=5,
                             num_epochs=3).to_iter_dataset())
  resumed.set_state(state)
  assert [_rows(next(resumed)) for _ in range(total - consumed)] == expected
  # And the replay equals what an uninterrupted pass sees.
  assert expected == [_rows(b) for b in list(ds)[consumed:]]


def test_train_batches_rejects_bad_arrays():
  with pytest.raises(ValueError, match="differ in length"):
    pipeline.train_batches({"a": np.zeros(3), "b": np.zeros(4)}, 2, 0, 1)
  with pytest.raises(ValueError, match="no training rows"):
    pipeline.train_batches({"a": np.zeros((0, 2))}, 2, 0, 1)


def test_eval_batches_pad_and_mask(ds):
  test = ds.split_leave_one_out(max_len=4)["test"]  # 3 rows.
  batches = list(pipeline.eval_batches(test, 2))
  assert len(batches) == 2
  for batch in batches:
    assert batch["histories"].shape == (2, 4)
    assert batch["seen_items"].shape == (2, test["seen_items"].shape[1])
    assert batch["targets"].shape == (2,)
    assert batch["users"].shape == (2,)
    assert batch["valid"].dtype == bool
  np.testing.assert_array_equal(batches[0]["valid"], [True, True])
  np.testing.assert_array_equal(batches[1]["valid"], [True, False])
  for key in ("histories", "targets", "seen_items", "users"):
    joined = np.concatenate([b[key] for b in batches])
    np.testing.assert_array_equal(joined[:3], test[key])
    assert not joined[3].any()
    assert joined.dtype == test[key].dtype
  exact = list(pipeline.eval_batches(test, 3))
  assert len(exact) == 1 and exact[0]["valid"].all()
  single = list(pipeline.eval_batches(test, 8))
  assert len(single) == 1
  np.testing.assert_array_equal(single[0]["valid"], [True] * 3 + [False] * 5)

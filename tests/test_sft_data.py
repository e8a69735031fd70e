"""SFT rows: every training interaction is a target once, prompts, alignment."""

import numpy as np
import pytest

from taiji_jax.data import load_dataset
from taiji_jax.sidlm import rows as sid_rows
from taiji_jax.testing import sids as testing_sids
from taiji_jax.text import vocab as vocab_lib

SIZES = (8, 8, 6)


@pytest.fixture(scope="module")
def setup():
  dataset = load_dataset("synthetic", num_users=30, num_items=40, seed=1)
  sids = testing_sids.random_semantic_ids(dataset.num_items, SIZES)
  texts = [dataset.item_text(i) for i in range(1, dataset.num_items + 1)]
  texts += [dataset.user_text(u) for u in range(1, dataset.num_users + 1)]
  vocab = vocab_lib.Vocab.build(texts, SIZES, vocab_size=400)
  split = dataset.split_leave_one_out(max_len=20)
  return dataset, sids, vocab, split


def _items_of(tokens, vocab, levels=3):
  sid = tokens.reshape(-1, levels)
  return [tuple(vocab.ids_to_codes(np.asarray(s)).tolist()) for s in sid]


def _rows(setup, max_items):
  dataset, sids, vocab, split = setup
  users = np.arange(1, dataset.num_users + 1)
  seqs = split["train"]["sequences"]
  prefixes = sid_rows.user_prefixes(dataset, vocab, users, max_prefix=40)
  rows = sid_rows.next_item_rows(
      seqs, users, vocab.item_token_table(sids), prefixes,
      max_items=max_items, max_prefix=40, pad_id=0)
  return users, seqs, prefixes, rows


def test_every_training_target_appears_once_with_its_history(setup):
  dataset, sids, vocab, split = setup
  users, seqs, prefixes, rows = _rows(setup, max_items=6)
  assert rows["tokens"].shape[1] == 40 + 7 * 3
  want = sum(max(len(s) - 1, 0) for s in seqs)
  assert rows["num_targets"] == want
  # Rebuild (user, target position) pairs from the rows: each training
  # target of each user is predicted exactly once, after its true history.
  seen = []
  row_of_user = {}
  for tokens, mask, u in zip(rows["tokens"], rows["loss_mask"], rows["users"]):
    u = int(u)
    prefix = prefixes[u]
    start = int(np.argmax(tokens != 0))
    assert tokens[start:start + len(prefix)].tolist() == prefix
    assert not mask[:start + len(prefix)].any()
    body = tokens[start + len(prefix):]
    items = [sids.sid_to_item(c) for c in _items_of(body, vocab)]
    body_mask = mask[start + len(prefix):].reshape(-1, 3)
    assert np.all(body_mask.all(1) | ~body_mask.any(1))  # whole SIDs only
    # Windows of a user run backwards from the end, max_items apart: the
    # r-th one ends at the sequence's position len - 1 - 6 r, and its items
    # are the contiguous run of the sequence before that.
    r = row_of_user[u] = row_of_user.get(u, -1) + 1
    seq = list(seqs[u - 1])
    last = len(seq) - 1 - 6 * r
    first = last - len(items) + 1
    assert first >= 0 and seq[first:last + 1] == items
    seen += [(u, first + j) for j in np.flatnonzero(body_mask[:, 0])]
  assert len(seen) == len(set(seen)) == want
  assert set(seen) == {
      (u, p) for u, s in zip(users, seqs) for p in range(1, len(s))
  }


def test_most_recent_rows_keep_each_users_last_windows(setup):
  """`rows_per_user`: every user keeps exactly their k windows nearest the
  end of the training sequence; the targets are recounted."""
  _, seqs, _, rows = _rows(setup, max_items=4)
  assert sid_rows.most_recent_rows(rows, 0, 3) is rows
  for k in (1, 2):
    kept = sid_rows.most_recent_rows(rows, k, 3)
    per_user = np.bincount(rows["users"])
    assert np.array_equal(np.bincount(kept["users"], minlength=len(per_user)),
                          np.minimum(per_user, k))
    # The kept rows are the first k of each user's rows (the latest windows).
    first = {}
    want = [i for i, u in enumerate(rows["users"].tolist())
            if first.setdefault(u, i) > i - k]
    np.testing.assert_array_equal(kept["tokens"], rows["tokens"][want])
    assert kept["num_targets"] == kept["loss_mask"].sum() // 3
    assert kept["num_targets"] == sum(min(len(s) - 1, 4 * k) for s in seqs)


def test_prompts_end_with_the_latest_history_sids(setup):
  dataset, sids, vocab, split = setup
  item_tokens = vocab.item_token_table(sids)
  test = split["test"]
  prefixes = sid_rows.user_prefixes(dataset, vocab, test["users"], 40)
  prompts = sid_rows.prompt_rows(test["histories"], test["users"], item_tokens,
                                 prefixes, 5, 40, 0)
  assert prompts.shape == (len(test["users"]), 40 + 15)
  for row, hist in zip(prompts, test["histories"]):
    last = hist[hist > 0][-5:]
    np.testing.assert_array_equal(row[-15:][-3 * len(last):],
                                  item_tokens[last].reshape(-1))
    assert row[-1] != 0


def test_long_profiles_are_cut_keeping_bos_and_the_template_end(setup):
  dataset, _, vocab, _ = setup
  tail = len(vocab.encode(" History:"))
  full = sid_rows.user_prefixes(dataset, vocab, [1], max_prefix=500)[1]
  assert vocab.decode(full[1:]) == f"User: {dataset.user_text(1)}. History:"
  ids = sid_rows.user_prefixes(dataset, vocab, [1], max_prefix=tail + 4)[1]
  assert len(ids) == tail + 4 and ids[0] == vocab.bos_id
  assert ids[1:4] == full[1:4]
  assert vocab.decode(ids[1:]).endswith(" History:")
  with pytest.raises(ValueError, match="cannot hold <bos>"):
    sid_rows.user_prefixes(dataset, vocab, [1], max_prefix=tail)


def test_alignment_rows_have_loss_on_the_answer_only(setup):
  dataset, sids, vocab, _ = setup
  item_tokens = vocab.item_token_table(sids)
  rows = sid_rows.alignment_rows(dataset, vocab, item_tokens, "item_to_sid", 64)
  assert len(rows["tokens"]) == dataset.num_items
  for item, (tokens,
             mask) in enumerate(zip(rows["tokens"], rows["loss_mask"]), 1):
    target = tokens[mask]
    assert target[:3].tolist() == item_tokens[item].tolist()
    assert target[3:].tolist() == [vocab.answer_end_id, vocab.eos_id]
    assert tokens[~mask & (tokens != 0)][-1] == vocab.answer_id
  titles = sid_rows.alignment_rows(dataset, vocab, item_tokens, "sid_to_title",
                                   64)
  first = titles["tokens"][0][titles["loss_mask"][0]]
  assert vocab.decode(first[:-2]) == " " + dataset.item_features["title"][1]
  with pytest.raises(ValueError, match="unknown alignment task"):
    sid_rows.alignment_rows(dataset, vocab, item_tokens, "x", 64)


def test_history_titles_follow_each_sid_and_stay_out_of_the_loss(setup):
  dataset, sids, vocab, split = setup
  item_tokens = vocab.item_token_table(sids)
  users = np.arange(1, dataset.num_users + 1)
  seqs = split["train"]["sequences"]
  prefixes = sid_rows.user_prefixes(dataset, vocab, users, max_prefix=40)
  titles = sid_rows.item_titles(dataset, vocab, max_tokens=4)
  assert titles[0] == [] and all(0 < len(t) <= 4 for t in titles[1:])
  plain = sid_rows.next_item_rows(seqs, users, item_tokens, prefixes, 6, 40, 0)
  rows = sid_rows.next_item_rows(
      seqs, users, item_tokens, prefixes, 6, 40, 0, titles=titles, max_title=4)
  assert rows["tokens"].shape[1] == 40 + 7 * (3 + 4)
  assert rows["num_targets"] == plain["num_targets"]
  # Same targets with the same SID tokens in the loss, in the same rows.
  for a, ma, b, mb in zip(plain["tokens"], plain["loss_mask"], rows["tokens"],
                          rows["loss_mask"]):
    np.testing.assert_array_equal(a[ma], b[mb])
    # Each SID is followed by exactly its item's title; without the titles
    # the row is the plain one.
    sid_lo = vocab.level_offsets[0]
    is_sid = (b >= sid_lo) & (b < sid_lo + sum(SIZES))
    i, sid_tokens = int(np.argmax(is_sid)), []
    while i < len(b):
      sid = b[i:i + 3]
      assert is_sid[i:i + 3].all()
      item = sids.sid_to_item(tuple(vocab.ids_to_codes(sid).tolist()))
      title = titles[item]
      assert b[i + 3:i + 3 + len(title)].tolist() == title
      sid_tokens += sid.tolist()
      i += 3 + len(title)
    assert sid_tokens == a[a != 0][-len(sid_tokens):].tolist()
    assert (a != 0).sum() - len(sid_tokens) == int(np.argmax(is_sid)) - int(
        np.argmax(b != 0))  # the same prefix before the first SID
  prompts = sid_rows.prompt_rows(
      split["test"]["histories"],
      split["test"]["users"],
      item_tokens,
      prefixes,
      5,
      40,
      0,
      titles=titles,
      max_title=4)
  assert prompts.shape[1] == 40 + 5 * 7
  for row, hist in zip(prompts, split["test"]["histories"]):
    last = hist[hist > 0][-1]
    tail = item_tokens[last].tolist() + titles[last]
    assert row[-len(tail):].tolist() == tail


def test_history_titles_need_a_title_feature(setup):
  dataset, _, vocab, _ = setup

  class NoTitles:
    name = "no-titles"
    item_features = {"genres": ()}
    num_items = 3

  with pytest.raises(ValueError, match="no 'title' item feature.*genres"):
    sid_rows.item_titles(NoTitles(), vocab, 4)
  assert dataset.item_features["title"][1]

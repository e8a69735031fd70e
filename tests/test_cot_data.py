"""CoT examples, rationale budgets, reasoning rows and the LM teacher."""

from flax import nnx
import numpy as np
import pytest

from taiji_jax.cot import data as cot_data
from taiji_jax.cot import lm_teacher
from taiji_jax.cot import orft
from taiji_jax.cot import teachers
from taiji_jax.data import load_dataset
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.sidlm import rows as sid_rows
from taiji_jax.testing import sids as testing_sids
from taiji_jax.text import vocab as vocab_lib

SIZES = (8, 8, 6)
MAX_LEN = 6


@pytest.fixture(scope="module")
def setup():
  dataset = load_dataset("synthetic", num_users=30, num_items=40, seed=1)
  sids = testing_sids.random_semantic_ids(dataset.num_items, SIZES)
  split = dataset.split_leave_one_out(max_len=MAX_LEN)
  texts = [dataset.item_text(i) for i in range(1, dataset.num_items + 1)]
  texts += [dataset.user_text(u) for u in range(1, dataset.num_users + 1)]
  texts += cot_data.vocabulary_texts(dataset, None, split, 20)
  vocab = vocab_lib.Vocab.build(texts, SIZES, vocab_size=500)
  return dataset, sids, vocab, split


def test_examples_are_each_users_last_targets_after_their_history(setup):
  _, _, _, split = setup
  ex = cot_data.next_item_examples(split, per_user=3, max_len=MAX_LEN)
  train = split["train"]
  want = []
  for u, seq in zip(train["users"], train["sequences"]):
    for j in range(max(1, len(seq) - 3), len(seq)):
      want.append((int(u), tuple(seq[:j][-MAX_LEN:]), int(seq[j])))
  got = [(int(u), tuple(h[h > 0]), int(t))
         for u, h, t in zip(ex["users"], ex["histories"], ex["targets"])]
  assert got == want
  assert ex["histories"].shape == (len(want), MAX_LEN)
  # Right-aligned: zeros only on the left.
  for h in ex["histories"]:
    nz = np.flatnonzero(h)
    assert nz.size and nz[-1] == MAX_LEN - 1 and np.all(np.diff(nz) == 1)
  with pytest.raises(ValueError, match="per_user"):
    cot_data.next_item_examples(split, 0, MAX_LEN)


def test_rationale_budget_cuts_after_whole_sentences(setup):
  _, _, vocab, _ = setup
  text = ("Its genre Drama appears in 3 of their 8 past items. "
          "Most recently they chose Alpha. They have 8 items in their "
          "history.")
  full = vocab.encode(text)
  assert cot_data.rationale_tokens(vocab, text, len(full)) == full
  two = vocab.encode(text.rsplit(" They have", 1)[0])
  one = vocab.encode(text.split(" Most", 1)[0])
  assert cot_data.rationale_tokens(vocab, text, len(two)) == two
  assert cot_data.rationale_tokens(vocab, text, len(two) - 1) == one
  # A first sentence longer than the budget is cut at a word boundary.
  cut = cot_data.rationale_tokens(vocab, text, len(one) - 1)
  assert len(cut) <= len(one) - 1
  assert text.startswith(vocab.decode(cut) + " ")


def test_reasoning_rows_put_the_loss_on_think_and_answer(setup):
  dataset, sids, vocab, split = setup
  ex = cot_data.next_item_examples(split, 2, MAX_LEN)
  item_tokens = vocab.item_token_table(sids)
  users = np.arange(1, dataset.num_users + 1)
  prefixes = sid_rows.user_prefixes(dataset, vocab, users, 24)
  prompts = sid_rows.prompt_rows(ex["histories"], ex["users"], item_tokens,
                                 prefixes, MAX_LEN, 24, vocab.pad_id)
  ids = [0, 0, 3]
  texts = ["They like tags.", "", "Most recently they chose it."]
  length = prompts.shape[1] + 20 + 4 + 3
  rows = cot_data.rows_for(ex, ids, texts, prompts, item_tokens, vocab, 20,
                           "reasoning", length)
  score = cot_data.rows_for(ex, ids, texts, prompts, item_tokens, vocab, 20,
                            "answer", length)
  np.testing.assert_array_equal(rows["tokens"], score["tokens"])
  for r, (i, text) in enumerate(zip(ids, texts)):
    tokens, mask = rows["tokens"][r], rows["loss_mask"][r]
    prompt = prompts[i][prompts[i] != vocab.pad_id].tolist()
    sid = item_tokens[ex["targets"][i]].tolist()
    body = [vocab.think_id, *vocab.encode(text), vocab.think_end_id,
            vocab.answer_id, *sid, vocab.answer_end_id]
    real = tokens[tokens != vocab.pad_id].tolist()
    assert real == prompt + body
    # Loss on exactly the part after the prompt; ORFT scores the SID only.
    assert mask.sum() == len(body) and mask[-len(body):].all()
    answer = score["loss_mask"][r]
    assert tokens[answer].tolist() == sid
  with pytest.raises(ValueError, match="target"):
    orft.reasoning_rows(prompts[:1], [[]], item_tokens[1:2], vocab,
                        target="both")


def test_vocabulary_texts_are_true_teacher_rationales(setup):
  dataset, _, vocab, split = setup
  texts = cot_data.vocabulary_texts(dataset, None, split, 5, k=2, seed=3)
  assert len(texts) == 5 * 2 * 2  # RUPR and direct, k each
  assert texts == cot_data.vocabulary_texts(dataset, None, split, 5, 2, 3)
  assert cot_data.vocabulary_texts(dataset, None, split, 0) == []
  # Reasoning words are learned pieces, not bytes: far fewer tokens than
  # characters.
  n_tokens = sum(len(vocab.encode(t)) for t in texts)
  assert n_tokens < 0.4 * sum(len(t) for t in texts)


@pytest.fixture(scope="module")
def lm(setup):
  dataset, sids, vocab, _ = setup
  cfg = decoder_lib.DecoderConfig.tiny(vocab_size=vocab.size, max_seq_len=128)
  model = decoder_lib.Decoder(cfg, rngs=nnx.Rngs(params=0))
  item_tokens = vocab.item_token_table(sids)

  def make(direct, **kw):
    return lm_teacher.LMTeacher(
        model,
        vocab,
        dataset,
        item_tokens,
        max_items=MAX_LEN,
        max_prefix=24,
        max_new_tokens=12,
        direct=direct,
        batch_size=8,
        **kw)

  return make, item_tokens


def test_lm_teacher_samples_k_text_only_rationales(setup, lm):
  _, _, vocab, split = setup
  make, item_tokens = lm
  ex = cot_data.next_item_examples(split, 1, MAX_LEN)
  ex = {k: v[:5] for k, v in ex.items()}
  teacher = make(direct=False)
  out = cot_data.candidate_rationales(teacher, ex, 3, seed=0)
  assert len(out["texts"]) == 15
  assert out["example"].tolist() == np.repeat(np.arange(5), 3).tolist()
  again = cot_data.candidate_rationales(teacher, ex, 3, seed=0)
  assert again["texts"] == out["texts"]
  other = cot_data.candidate_rationales(teacher, ex, 3, seed=1)
  assert other["texts"] != out["texts"]
  assert len(set(out["texts"])) > 1  # sampled, so candidates differ
  for text in out["texts"]:
    ids = vocab.encode(text)
    # No SID or marker token can appear in a rationale.
    assert all(i >= vocab.text_offset for i in ids), text
  # The one-example interface is the batched one.
  single = teacher.rationales(
      int(ex["users"][0]), ex["histories"][0], int(ex["targets"][0]), 3, 0)
  assert len(single) == 3


def test_rupr_prompts_hold_the_target_and_direct_ones_do_not(setup, lm):
  _, _, vocab, split = setup
  make, item_tokens = lm
  ex = cot_data.next_item_examples(split, 1, MAX_LEN)
  rupr = make(direct=False).prompts(ex["users"], ex["histories"],
                                    ex["targets"])
  direct = make(direct=True).prompts(ex["users"], ex["histories"], None)
  for r, d, target in zip(rupr, direct, ex["targets"]):
    sid = item_tokens[target].tolist()
    d_real = d[d != vocab.pad_id].tolist()
    r_real = r[r != vocab.pad_id].tolist()
    tail = vocab.encode(lm_teacher.TARGET_TEMPLATE) + sid
    assert r_real[:len(d_real)] == d_real  # the same context first
    assert r_real[len(d_real):len(d_real) + len(tail)] == tail
    assert "Next:" not in vocab.decode(d_real)
  with pytest.raises(ValueError, match="RUPR teacher needs"):
    make(direct=False).rationales_batch(ex["users"][:1], ex["histories"][:1],
                                        None, 2, 0)
  with pytest.raises(ValueError, match="temperature"):
    make(direct=False, temperature=0.0)


def test_attribute_teacher_candidates_feed_the_rows(setup):
  dataset, _, _, split = setup
  ex = cot_data.next_item_examples(split, 2, MAX_LEN)
  teacher = teachers.AttributeTeacher(dataset)
  out = cot_data.candidate_rationales(teacher, ex, 2, seed=0)
  assert len(out["texts"]) == 2 * len(ex["targets"])
  for e, text in zip(out["example"][::2], out["texts"][::2]):
    u, h, t = ex["users"][e], ex["histories"][e], ex["targets"][e]
    assert text in teacher.rationales(int(u), h[h > 0], int(t), 2, 0)

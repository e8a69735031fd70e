"""The SID-LLM vocabulary: layout, exact round trips, SID tokens, saving."""

import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taiji_jax.data import load_dataset
from taiji_jax.quantize import SemanticIds
from taiji_jax.text import vocab as vocab_lib
from taiji_jax.text.vocab import Vocab
from taiji_jax.text.vocab import VocabError

SIZES = (64, 64, 64, 3)  # Levels of different sizes; the last one is tiny.
VOCAB_SIZE = 600  # Enough pieces for the synthetic corpus' characters.

TRICKY_TEXTS = (
    "Bicycle Thief, The (Ladri di biciclette) (1948)",
    "Délicatessen (1991)",
    "Cité des enfants perdus, La (1995)",
    "Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb "
    "(1963); genres: Sci-Fi, War; a very long title indeed, 100% true!",
    "Naïve café — «quotes», ‘single’, 3.14159, -42, 1e-9, $5 & 50¢",
    "e\u0301 (decomposed) vs \u00e9 (composed)",
    "日本語のタイトル (2001) 🎬🍿",
    "  leading, double  and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "ﬁ ligature and ＦＵＬＬ width",  # NFKC would rewrite these.
    "a ▁ meta symbol▁▁in text",
    "brackets <b> a<b>c <0x41> <thinking> <a_x> <a_> a_1> <A_1> < > <<>>",
    "\x00 control \x7f chars <text_unk>",
    "",
)


def _prompt(rng, sizes):
  sid = vocab_lib.sid_string([rng.integers(k) for k in sizes])
  return (f"The user watched {sid} and {sid}.\n<think>They like sci-fi."
          f"</think><answer>{sid}</answer><eos>")


def _corpus():
  data = load_dataset("synthetic")
  rng = np.random.default_rng(0)
  texts = [data.item_text(i) for i in range(1, data.num_items + 1)]
  texts += [data.user_text(u) for u in range(1, data.num_users + 1)]
  # Prompts full of SID and special strings: they must not reach the model.
  texts += [_prompt(rng, SIZES) for _ in range(300)]
  return texts + list(TRICKY_TEXTS)


@pytest.fixture(scope="module")
def corpus():
  return _corpus()


@pytest.fixture(scope="module", params=vocab_lib.MODEL_TYPES)
def vocab(request, corpus):
  return Vocab.build(
      corpus, SIZES, vocab_size=VOCAB_SIZE, model_type=request.param)


def _sid_ids(vocab, ids):
  return [i for i in ids if vocab.sid_offset <= i < vocab.text_offset]


def test_layout_and_size_accounting(vocab):
  n_special = len(vocab_lib.SPECIAL_TOKENS)
  assert vocab.specials == vocab_lib.SPECIAL_TOKENS
  assert vocab.sid_offset == n_special
  np.testing.assert_array_equal(vocab.level_offsets,
                                n_special + np.array([0, 64, 128, 192]))
  np.testing.assert_array_equal(vocab.level_sizes, SIZES)
  assert vocab.text_offset == n_special + sum(SIZES)
  assert vocab.size == n_special + sum(SIZES) + vocab.num_text_pieces
  assert 300 < vocab.num_text_pieces <= VOCAB_SIZE
  # The text ids, as every caller asks for them (never by offset).
  np.testing.assert_array_equal(
      np.flatnonzero(vocab.text_mask()),
      np.arange(vocab.text_offset, vocab.size))
  assert [vocab.sid_id_range(l) for l in range(4)] == [(8, 72), (72, 136),
                                                       (136, 200), (200, 203)]
  assert (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.unk_id,
          vocab.think_id, vocab.think_end_id, vocab.answer_id,
          vocab.answer_end_id) == tuple(range(8))
  assert vocab.special_id("</answer>") == vocab.answer_end_id
  # Every id has a distinct string, and ids past the end are rejected.
  tokens = [vocab.id_to_token(i) for i in range(vocab.size)]
  assert len(set(tokens)) == vocab.size
  with pytest.raises(VocabError, match="outside"):
    vocab.id_to_token(vocab.size)
  with pytest.raises(VocabError, match="outside"):
    vocab.decode([vocab.size])


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_text_round_trips_exactly(vocab, text):
  ids = vocab.encode(text)
  assert vocab.decode(ids) == text
  assert all(vocab.text_offset <= i < vocab.size for i in ids)
  assert vocab.unk_id not in ids


def test_dataset_texts_round_trip_and_never_hit_unk(vocab, corpus):
  for text in corpus[:600]:
    ids = vocab.encode(text)
    assert vocab.decode(ids) == text
    assert vocab.unk_id not in ids
  # The model learned words: a text is much shorter in pieces than in bytes.
  text = corpus[0]
  assert len(vocab.encode(text)) < len(text.encode()) / 2


def test_sid_and_special_tokens_are_single_ids(vocab):
  text = ("User <a_3><b_0><c_63><d_2> likes Délicatessen. <think>hmm\n"
          "</think><answer><a_63><b_63><c_0><d_0></answer><eos><pad>")
  ids = vocab.encode(text)
  assert vocab.decode(ids) == text
  sid_ids = _sid_ids(vocab, ids)
  assert sid_ids == (
      vocab.sid_tokens((3, 0, 63, 2)) + vocab.sid_tokens((63, 63, 0, 0)))
  assert sid_ids == [
      8 + 3, 72 + 0, 136 + 63, 200 + 2, 8 + 63, 72 + 63, 136, 200
  ]
  # The two SIDs are contiguous runs of 4 ids, and the specials are in place.
  first = ids.index(sid_ids[0])
  assert ids[first:first + 4] == sid_ids[:4]
  answer = ids.index(vocab.answer_id)
  assert ids[answer:] == [vocab.answer_id] + sid_ids[4:] + [
      vocab.answer_end_id, vocab.eos_id, vocab.pad_id
  ]
  assert ids.count(vocab.think_id) == ids.count(vocab.think_end_id) == 1
  # Encoding is segment-wise: a token string splits the text around it.
  assert vocab.encode("x<b_5>y") == (
      vocab.encode("x") + [vocab.sid_token_id(1, 5)] + vocab.encode("y"))
  assert vocab.decode(
      ids, skip_specials=True) == (
          "User <a_3><b_0><c_63><d_2> likes Délicatessen. hmm\n"
          "<a_63><b_63><c_0><d_0>")
  assert vocab.encode(
      "t", add_bos=True,
      add_eos=True) == ([vocab.bos_id] + vocab.encode("t") + [vocab.eos_id])


def test_no_text_piece_contains_a_token_string(vocab):
  forbidden = [f"<{c}_" for c in "abcdefgh"] + list(vocab.specials)
  for j in range(vocab.num_text_pieces):
    piece = vocab.id_to_token(vocab.text_offset + j)
    if piece.startswith("<0x") and len(piece) == 6:  # A byte piece.
      continue
    assert not any(f in piece for f in forbidden), (j, piece)
    # "<" and ">" are single pieces: nothing learned can contain them.
    assert piece in (
        "<", ">", vocab_lib.TEXT_UNK_PIECE) or not set(piece) & set("<>"), piece


def test_sid_edges_of_every_level(vocab):
  for l, k in enumerate(SIZES):
    lo, hi = vocab.sid_id_range(l)
    for code in (0, k - 1):
      token = f"<{'abcd'[l]}_{code}>"
      i = vocab.sid_token_id(l, code)
      assert i == vocab.level_offsets[l] + code and lo <= i < hi
      assert vocab.encode(token) == [i]
      assert vocab.id_to_token(i) == token == vocab.decode([i])
    with pytest.raises(VocabError, match="outside"):
      vocab.sid_token_id(l, k)
    with pytest.raises(VocabError, match="outside"):
      vocab.sid_token_id(l, -1)
  with pytest.raises(VocabError, match="level 4"):
    vocab.sid_token_id(4, 0)
  # Ranges tile [sid_offset, text_offset) without gaps.
  ranges = [vocab.sid_id_range(l) for l in range(4)]
  assert ranges[0][0] == vocab.sid_offset and ranges[-1][1] == vocab.text_offset
  assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_sid_round_trips_and_array_maps_work_in_jit(vocab):
  rng = np.random.default_rng(1)
  codes = np.stack([rng.integers(0, k, 50) for k in SIZES], 1)
  codes[0] = 0
  codes[1] = np.array(SIZES) - 1
  for sid in codes.tolist():
    ids = vocab.sid_tokens(sid)
    assert vocab.tokens_to_sid(ids) == tuple(sid)
    assert vocab.decode(ids) == vocab.item_sid_string(sid)
    assert vocab.encode(vocab.item_sid_string(sid)) == ids
  ids = jax.jit(vocab.codes_to_ids)(jnp.asarray(codes, jnp.int32))
  np.testing.assert_array_equal(ids, [vocab.sid_tokens(s) for s in codes])
  np.testing.assert_array_equal(jax.jit(vocab.ids_to_codes)(ids), codes)
  assert np.all(vocab.is_sid_id(np.asarray(ids)))
  assert not np.any(vocab.is_sid_id(np.array([0, 7, vocab.text_offset])))
  assert vocab_lib.sid_string((12, 7, 0)) == "<a_12><b_7><c_0>"


def test_tokens_to_sid_errors(vocab):
  good = vocab.sid_tokens((5, 6, 7, 2))
  with pytest.raises(VocabError, match="3 ids"):
    vocab.tokens_to_sid(good[:3])
  with pytest.raises(VocabError, match="5 ids"):
    vocab.tokens_to_sid(good + [good[-1]])
  swapped = [good[1], good[0]] + good[2:]
  with pytest.raises(VocabError, match=r"position 0.*'<b_6>'.*level-a"):
    vocab.tokens_to_sid(swapped)
  # The first id of the next level, and the first text id, are one too far.
  with pytest.raises(VocabError, match=r"position 0.*'<b_0>'"):
    vocab.tokens_to_sid([vocab.sid_id_range(0)[1]] + good[1:])
  with pytest.raises(VocabError, match=r"position 3.*a text piece"):
    vocab.tokens_to_sid(good[:3] + [vocab.sid_id_range(3)[1]])
  with pytest.raises(VocabError, match=r"position 2.*a special.*'<eos>'"):
    vocab.tokens_to_sid(good[:2] + [vocab.eos_id] + good[3:])
  with pytest.raises(VocabError, match=r"position 3.*a text piece"):
    vocab.tokens_to_sid(good[:3] + [vocab.text_offset + 300])
  with pytest.raises(VocabError, match="out of range"):
    vocab.tokens_to_sid(good[:3] + [vocab.size])
  with pytest.raises(VocabError, match="this vocab has 4"):
    vocab.sid_tokens((1, 2, 3))
  with pytest.raises(VocabError, match="outside"):
    vocab.item_sid_string((1, 2, 3, 3))


@pytest.mark.parametrize("text", ["<d_3>", "x <e_0> y", "<a_64>", "<a_07>"])
def test_sid_strings_this_vocab_lacks_are_errors(vocab, text):
  with pytest.raises(VocabError, match="shaped like a SID token"):
    vocab.encode(text)


def test_build_is_deterministic(corpus):
  for model_type in vocab_lib.MODEL_TYPES:
    a = Vocab.build(corpus, SIZES, vocab_size=VOCAB_SIZE, model_type=model_type)
    b = Vocab.build(
        list(corpus), SIZES, vocab_size=VOCAB_SIZE, model_type=model_type)
    assert a.model_proto == b.model_proto
  # Subsampling is seeded: same seed, same model; another seed, another one.
  kw = dict(vocab_size=VOCAB_SIZE, max_sentences=400)
  s0 = Vocab.build(corpus, SIZES, seed=0, **kw).model_proto
  assert Vocab.build(corpus, SIZES, seed=0, **kw).model_proto == s0
  assert Vocab.build(corpus, SIZES, seed=1, **kw).model_proto != s0
  # SID strings in the texts do not influence the text model.
  rng = np.random.default_rng(5)
  other_sids = [_prompt(rng, SIZES) for _ in range(300)]
  rng = np.random.default_rng(6)
  assert [_prompt(rng, SIZES) for _ in range(300)] != other_sids
  base = corpus[:-300 - len(TRICKY_TEXTS)]
  assert (Vocab.build(base + other_sids, SIZES,
                      vocab_size=VOCAB_SIZE).model_proto == Vocab.build(
                          base + [_prompt(rng, SIZES) for _ in range(300)],
                          SIZES,
                          vocab_size=VOCAB_SIZE).model_proto)


def test_save_load_round_trip(vocab, corpus, tmp_path):
  assert vocab.save(tmp_path / "v") == tmp_path / "v"
  assert sorted(p.name for p in (tmp_path / "v").iterdir()) == [
      "vocab.json", "vocab.model"
  ]
  loaded = Vocab.load(tmp_path / "v")
  assert loaded.model_proto == vocab.model_proto
  assert loaded.codebook_sizes == SIZES and loaded.size == vocab.size
  assert loaded.specials == vocab.specials
  assert loaded.build_info == vocab.build_info
  for text in corpus[-40:]:
    assert loaded.encode(text) == vocab.encode(text)
  header = json.loads((tmp_path / "v" / "vocab.json").read_text())
  assert header["codebook_sizes"] == list(SIZES)
  assert header["size"] == vocab.size
  # Saving again over an existing save works; pickling keeps the model.
  vocab.save(tmp_path / "v")
  assert Vocab.load(tmp_path / "v").model_proto == vocab.model_proto
  assert pickle.loads(pickle.dumps(vocab)).encode(corpus[0]) == vocab.encode(
      corpus[0])


def test_load_errors(vocab, corpus, tmp_path):
  with pytest.raises(FileNotFoundError, match="no saved vocabulary"):
    Vocab.load(tmp_path / "missing")
  d = vocab.save(tmp_path / "v")
  (d / "vocab.model").unlink()
  with pytest.raises(FileNotFoundError, match="vocab.model"):
    Vocab.load(d)
  # A model file from another build next to this header.
  other = Vocab.build(corpus[:400], SIZES, vocab_size=350)
  vocab.save(d)
  (d / "vocab.model").write_bytes(other.model_proto)
  with pytest.raises(VocabError, match="different builds"):
    Vocab.load(d)
  vocab.save(d)
  header = json.loads((d / "vocab.json").read_text())

  def write(**changes):
    (d / "vocab.json").write_text(json.dumps(dict(header, **changes)))

  write(format_version=99)
  with pytest.raises(VocabError, match="format version 99"):
    Vocab.load(d)
  write(num_text_pieces=header["num_text_pieces"] + 1)
  with pytest.raises(VocabError, match="pieces, the header says"):
    Vocab.load(d)
  write(codebook_sizes=[64, 0])
  with pytest.raises(VocabError, match="codebook sizes must be >= 1"):
    Vocab.load(d)
  write(specials=["<pad>"])
  with pytest.raises(VocabError, match="specials must start with"):
    Vocab.load(d)
  (d / "vocab.json").write_text("{not json")
  with pytest.raises(VocabError, match="unreadable header"):
    Vocab.load(d)


def test_check_compatible_and_item_token_table(vocab):
  codes = np.array([[-1, -1, -1, -1], [0, 0, 0, 0], [63, 63, 63, 2],
                    [5, 6, 7, 1]])
  sids = SemanticIds(codes, SIZES)
  vocab.check_compatible(sids)
  vocab.check_compatible(SIZES)
  table = vocab.item_token_table(sids)
  assert table.shape == (4, 4) and table.dtype == np.int32
  np.testing.assert_array_equal(table[0], vocab.pad_id)
  for item in (1, 2, 3):
    assert vocab.tokens_to_sid(table[item]) == sids.item_to_sid(item)
  with pytest.raises(VocabError, match=r"\(64, 64, 64, 4\) do not fit"):
    vocab.check_compatible(SemanticIds(codes, (64, 64, 64, 4)))
  with pytest.raises(VocabError, match="do not fit"):
    vocab.check_compatible((64, 64, 64))


def test_workdir_caches_the_build(corpus, tmp_path):
  kw = dict(vocab_size=VOCAB_SIZE, workdir=tmp_path)
  first = Vocab.build(corpus, SIZES, **kw)
  model_file = tmp_path / "vocab.model"
  stamp = model_file.stat().st_mtime_ns
  again = Vocab.build(corpus, SIZES, **kw)
  assert again.model_proto == first.model_proto
  assert model_file.stat().st_mtime_ns == stamp  # Loaded, not rewritten.
  changed = Vocab.build(corpus[:-2], SIZES, **kw)
  assert changed.build_info["fingerprint"] != first.build_info["fingerprint"]
  assert Vocab.load(tmp_path).build_info == changed.build_info


def test_extra_specials_and_build_errors(corpus):
  v = Vocab.build(
      corpus[:400], (5, 7), vocab_size=350, extra_specials=("<user>", "<sid>"))
  assert v.specials[-2:] == ("<user>", "<sid>") and v.sid_offset == 10
  assert v.level_offsets.tolist() == [10, 15]
  text = "<user> 42 <sid><a_4><b_6>"
  ids = v.encode(text)
  assert v.decode(ids) == text and ids[0] == v.special_id("<user>")
  assert v.tokens_to_sid(ids[-2:]) == (4, 6)
  with pytest.raises(KeyError, match="not a special token"):
    v.special_id("<item>")
  with pytest.raises(VocabError, match="model_type"):
    Vocab.build(corpus, SIZES, model_type="word")
  with pytest.raises(VocabError, match="no text"):
    Vocab.build(["<a_1><think>", ""], SIZES)
  with pytest.raises(VocabError, match="not str"):
    Vocab.build(["ok", 3], SIZES)
  with pytest.raises(VocabError, match="max_sentences"):
    Vocab.build(corpus, SIZES, max_sentences=0)
  with pytest.raises(VocabError, match="vocab_size=270"):
    Vocab.build(corpus, SIZES, vocab_size=270)
  with pytest.raises(VocabError, match="SID token"):
    Vocab.build([], SIZES, extra_specials=("<a_1>",))
  with pytest.raises(VocabError, match="duplicate"):
    Vocab.build([], SIZES, extra_specials=("<think>",))
  with pytest.raises(VocabError, match=">= 1"):
    Vocab.build([], (64, 0))  # Checked before training.

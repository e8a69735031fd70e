"""The SID-LLM vocabulary's two implementations behind one interface: the
sentencepiece `Vocab` (text after the SID block) and `PretrainedVocab` (a
pretrained tokenizer's ids first, the markers and SIDs after them)."""

import pickle

from flax import nnx
import numpy as np
import pytest

from taiji_jax.generate import think
from taiji_jax.models import decoder
from taiji_jax.models import gguf_import
from taiji_jax.testing import gguf as gguf_testing
from taiji_jax.testing import sids as sid_testing
from taiji_jax.text import gguf_tokenizer
from taiji_jax.text import pretrained_vocab as pv
from taiji_jax.text import sid_tokens
from taiji_jax.text import vocab as vocab_lib

SIZES = (5, 4, 3)
TEXT = "the cat in the hat, 1994: naïve café ☕"


def _tokenizer():
  tokens, types, merges = gguf_testing.tiny_tokenizer()
  return gguf_tokenizer.from_metadata({
      "tokenizer.ggml.model": "gpt2",
      "tokenizer.ggml.pre": "smollm",
      "tokenizer.ggml.tokens": tokens,
      "tokenizer.ggml.token_type": types,
      "tokenizer.ggml.merges": merges,
  })


@pytest.fixture(scope="module")
def pretrained():
  return pv.PretrainedVocab(_tokenizer(), SIZES)


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
  texts = [TEXT, "a dog and a cat", "the hat of the cat"] * 20
  return vocab_lib.Vocab.build(texts, SIZES, vocab_size=300,
                               workdir=tmp_path_factory.mktemp("sp"))


@pytest.fixture(params=["sentencepiece", "pretrained"])
def vocab(request):
  return request.getfixturevalue(request.param)


def test_pretrained_layout_keeps_the_tokenizer_ids_and_adds_the_block(
    pretrained):
  tok = pretrained.tokenizer
  t = tok.get_vocab_size(with_added_tokens=True)
  assert pretrained.num_text_pieces == t
  assert pretrained.pad_id == t and pretrained.answer_end_id == t + 7
  np.testing.assert_array_equal(pretrained.level_offsets,
                                t + 8 + np.array([0, 5, 9]))
  assert pretrained.size == t + 8 + sum(SIZES)
  # Plain text gets exactly the tokenizer's own ids (no BOS/EOS added).
  assert pretrained.encode(TEXT) == tok.encode(
      TEXT, add_special_tokens=False).ids
  # The tokenizer's control tokens are ids, not text; ours are neither.
  mask = pretrained.text_mask()
  control = [i for i, a in tok.get_added_tokens_decoder().items() if a.special]
  assert control and not mask[control].any()
  assert mask.sum() == t - len(control) and not mask[t:].any()


def test_the_interface_round_trips_text_markers_and_sids(vocab):
  sid = (4, 0, 2)
  text = (f"User: {TEXT}. <think> because {TEXT} </think><answer>"
          f"{vocab.item_sid_string(sid)}</answer>")
  ids = vocab.encode(text)
  assert vocab.decode(ids) == text
  sid_ids = [i for i in ids if vocab.is_sid_id(i)]
  assert vocab.tokens_to_sid(sid_ids) == sid
  assert sid_ids == vocab.sid_tokens(sid)
  for marker in ("<think>", "</think>", "<answer>", "</answer>"):
    assert ids.count(vocab.special_id(marker)) == 1
  assert [vocab.think_id, vocab.think_end_id, vocab.answer_id,
          vocab.answer_end_id] == [vocab.special_id(m) for m in (
              "<think>", "</think>", "<answer>", "</answer>")]
  # Text ids are text; markers and SIDs never are.
  mask = vocab.text_mask()
  assert mask.shape == (vocab.size,)
  kinds = {i: bool(mask[i]) for i in ids}
  assert not any(kinds[i] for i in sid_ids)
  assert not kinds[vocab.think_id] and not kinds[vocab.answer_id]
  plain = vocab.encode(TEXT)
  assert mask[plain].all()
  assert vocab.decode(ids, skip_specials=True) == text.replace(
      "<think>", "").replace("</think>", "").replace("<answer>", "").replace(
          "</answer>", "")


def test_the_interface_gives_item_tables_and_think_masks(vocab):
  ids = sid_testing.random_semantic_ids(11, SIZES, seed=2)
  table = vocab.item_token_table(ids)
  assert table.shape == (12, 3) and (table[0] == vocab.pad_id).all()
  for item in range(1, 12):
    assert vocab.tokens_to_sid(table[item]) == tuple(ids.codes[item])
  allowed = think.think_token_mask(vocab.text_mask(), vocab.think_end_id)
  assert allowed[vocab.think_end_id] and not allowed[vocab.answer_id]
  assert not allowed[table[1:]].any()
  with pytest.raises(sid_tokens.VocabError, match="codebook sizes"):
    vocab.check_compatible((5, 4))


def test_the_interface_refuses_sids_it_has_no_token_for(vocab):
  for bad in ("<d_0>", "<a_5>", "<a_01>"):
    with pytest.raises(sid_tokens.VocabError, match="shaped like a SID"):
      vocab.encode(f"x {bad} y")
  with pytest.raises(sid_tokens.VocabError, match="outside"):
    vocab.decode([vocab.size])


def test_pretrained_vocab_saves_loads_and_pickles(pretrained, tmp_path):
  pretrained.save(tmp_path / "v")
  again = pv.load_vocab(tmp_path / "v")
  assert isinstance(again, pv.PretrainedVocab)
  assert again.size == pretrained.size
  assert again.encode(TEXT + "<a_1>") == pretrained.encode(TEXT + "<a_1>")
  assert pickle.loads(pickle.dumps(pretrained)).encode(TEXT) == (
      pretrained.encode(TEXT))
  (tmp_path / "v" / pv.TOKENIZER_FILE).write_text(
      pretrained.tokenizer.to_str().replace('"cat"', '"dog"') + " ")
  with pytest.raises(sid_tokens.VocabError, match="does not match"):
    pv.load_vocab(tmp_path / "v")


def test_load_vocab_reads_the_sentencepiece_kind_too(sentencepiece, tmp_path):
  sentencepiece.save(tmp_path / "sp")
  again = pv.load_vocab(tmp_path / "sp")
  assert isinstance(again, vocab_lib.Vocab)
  assert again.encode(TEXT) == sentencepiece.encode(TEXT)


def test_a_tokenizer_that_spells_our_markers_is_refused():
  tok = _tokenizer()
  tok.add_tokens(["<think>"])
  with pytest.raises(sid_tokens.VocabError, match="shadowed"):
    pv.PretrainedVocab(tok, SIZES)


def test_from_gguf_reads_the_files_tokenizer(tmp_path):
  cfg = decoder.DecoderConfig.tiny(vocab_size=300, attention_bias=False)
  path = tmp_path / "m.gguf"
  gguf_testing.write_gguf(path, cfg, decoder.Decoder(cfg, rngs=nnx.Rngs(0)))
  vocab = pv.PretrainedVocab.from_gguf(path, SIZES)
  tok = gguf_tokenizer.from_metadata(gguf_import.GGUFFile(path).metadata)
  assert vocab.num_text_pieces == tok.get_vocab_size(with_added_tokens=True)
  assert vocab.encode(TEXT) == tok.encode(TEXT, add_special_tokens=False).ids
  assert vocab.source == {"gguf": str(path)}


def test_smollm2_tokenizer_with_sids():
  path = gguf_import.cached_pretrained("SmolLM2-135M-Instruct")
  if path is None:
    pytest.skip("SmolLM2-135M-Instruct is not in the model cache")
  vocab = pv.PretrainedVocab.from_gguf(path, (256, 256, 256))
  assert vocab.num_text_pieces == 49152 and vocab.pad_id == 49152
  assert vocab.size == 49152 + 8 + 768
  text = "The capital of France is <a_3><b_255><c_0> <|im_end|>"
  ids = vocab.encode(text)
  assert vocab.decode(ids) == text
  assert vocab.tokenizer.token_to_id("<|im_end|>") in ids
  assert not vocab.text_mask()[vocab.tokenizer.token_to_id("<|im_end|>")]


def test_new_ids_start_after_a_padded_embedding(pretrained):
  t = pretrained.num_text_pieces
  padded = pv.PretrainedVocab(pretrained.tokenizer, SIZES, first_free=t + 5)
  assert padded.pad_id == t + 5 and padded.size == t + 5 + 8 + sum(SIZES)
  assert padded.encode(TEXT + "<a_1>")[:-1] == pretrained.encode(TEXT)
  assert not padded.text_mask()[t:t + 5].any()
  with pytest.raises(sid_tokens.VocabError, match="unused embedding rows"):
    padded.decode([t + 1])
  with pytest.raises(sid_tokens.VocabError, match="inside the tokenizer"):
    pv.PretrainedVocab(pretrained.tokenizer, SIZES, first_free=t - 1)

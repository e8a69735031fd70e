"""The SID-LLM vocabulary: specials, semantic-ID tokens and sentencepiece text.

One id space, three contiguous blocks (n_s specials, L levels of K_l codes,
P sentencepiece pieces):

  [0, n_s)                       special tokens, in `specials` order:
                                 <pad>=0 <bos>=1 <eos>=2 <unk>=3 <think>=4
                                 </think>=5 <answer>=6 </answer>=7, then any
                                 `extra_specials` given to `Vocab.build`
  [sid_offset, text_offset)      SID tokens, level by level: level l, code c
                                 is id `level_offsets[l] + c`, written
                                 `<a_c>`, `<b_c>`, ... (level letters a..z)
  [text_offset, size)            sentencepiece piece j is id `text_offset + j`

with sid_offset = n_s, level_offsets[l] = sid_offset + sum(K_:l) and
text_offset = sid_offset + sum(K). The SID block is a pure arithmetic map
(`codes_to_ids` / `ids_to_codes` are one add or subtract, usable inside
`jax.jit`), and the logits of level l are the slice `sid_id_range(l)`, which
is what trie-constrained decoding masks.

SID and special tokens live outside the sentencepiece model, so the text model
can never split or merge them. Encoding a string first splits it on the token
patterns (every special, every `<x_N>`, and the sentencepiece meta symbol
U+2581), maps those matches directly, and encodes only the plain text between
them with sentencepiece; decoding maps ids back block by block. A SID-shaped
string whose level or code is not in this vocab (`<e_0>` with four levels,
`<d_9>` when level d has 3 codes, `<a_07>`) is an error rather than silently
becoming text: it means the prompt was built for other SIDs.

The text model is trained in-process on the same plain-text segments (token
patterns removed, so prompt templates that mention SIDs teach nothing about
them) with settings chosen so that `decode(encode(s)) == s` for every string:

  - byte_fallback: any character outside the pieces becomes UTF-8 byte
    pieces, never <unk>;
  - identity normalisation, no extra-whitespace removal: the text is not
    rewritten (NFKC would fold e.g. ligatures and full-width characters);
  - no dummy prefix: a segment that follows a SID token ("<c_0> and ...")
    encodes its leading space as part of the next word, exactly as in the
    middle of a sentence, and nothing is added or stripped at segment edges;
  - "<" and ">" are user-defined (always single) pieces, so no learned piece
    can contain them: no text piece contains a SID or special token string;
  - one thread and no sampling inside sentencepiece, so the same texts and
    arguments give a byte-identical model (`seed` only drives the optional
    `max_sentences` subsampling, done here with numpy).

The literal character U+2581 in text would decode as a space through
sentencepiece, so it is encoded as its three UTF-8 byte pieces instead.

`<sid>`/`</sid>` delimiters are not included: SID tokens are self-describing
(each level has its own letter and id block), and an answer is bracketed by
<answer> ... </answer> already. Pass `extra_specials` for any other markers a
prompt format needs.

`save(directory)` writes `vocab.model` (the sentencepiece model) and
`vocab.json` (format version, specials, codebook sizes, piece count, the
model's SHA-256 and the build arguments); `Vocab.load(directory)` checks that
the two belong together.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
from typing import Any, Iterable, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm

from taiji_jax.text import sid_tokens

FORMAT_VERSION = 1
MODEL_FILE = "vocab.model"
HEADER_FILE = "vocab.json"

SPECIAL_TOKENS = sid_tokens.SPECIAL_TOKENS
LEVEL_LETTERS = sid_tokens.LEVEL_LETTERS
VocabError = sid_tokens.VocabError
sid_string = sid_tokens.sid_string
# Sentencepiece's own (never produced) unknown piece, named apart from <unk>.
TEXT_UNK_PIECE = "<text_unk>"
MODEL_TYPES = ("unigram", "bpe")
_META = "\u2581"  # sentencepiece's whitespace symbol.
# Pieces no learned piece may contain (module docstring).
_ISOLATED_PIECES = ("<", ">")


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class Vocab(sid_tokens.SidTokens):
  """Specials + SID tokens + sentencepiece text pieces (module docstring).

  Build one with `Vocab.build`, or read a saved one with `Vocab.load`; the
  constructor wraps an existing sentencepiece model.
  """

  def __init__(self,
               model_proto: bytes,
               codebook_sizes: Sequence[int],
               specials: Sequence[str] = SPECIAL_TOKENS,
               build_info: dict[str, Any] | None = None):
    """Wraps a sentencepiece model.

    Args:
      model_proto: the serialized sentencepiece model.
      codebook_sizes: K_l of each SID level.
      specials: the special token strings in id order; must start with
        `SPECIAL_TOKENS`.
      build_info: how the model was built (kept in the saved header).

    Raises:
      VocabError: on invalid sizes or specials, or an unreadable model.
    """
    super().__init__(codebook_sizes, specials, base=0, extra_pattern=_META)
    sp = spm.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(bytes(model_proto))
    except (RuntimeError, OSError) as e:
      raise VocabError(f"not a sentencepiece model: {e}") from None

    self._model_proto = bytes(model_proto)
    self._sp = sp
    self._build_info = dict(build_info or {})
    self._text_offset = self._sid_end
    self._sp_unk = sp.unk_id()
    # U+2581 as text: its UTF-8 bytes, as byte pieces (module docstring).
    self._meta_ids = [
        self._text_offset + sp.piece_to_id(f"<0x{b:02X}>")
        for b in _META.encode("utf-8")
    ]
    if any(i == self._text_offset + self._sp_unk for i in self._meta_ids):
      raise VocabError("the sentencepiece model has no byte pieces; train it "
                       "with byte_fallback=True (Vocab.build does)")

  # --- Building, saving, loading ---------------------------------------------

  @classmethod
  def build(cls,
            texts: Iterable[str],
            codebook_sizes: Sequence[int],
            *,
            vocab_size: int = 4000,
            model_type: str = "bpe",
            character_coverage: float = 0.9995,
            max_sentences: int | None = None,
            seed: int = 0,
            extra_specials: Sequence[str] = (),
            workdir: os.PathLike | str | None = None) -> Vocab:
    """Trains the text model on `texts` and lays out the full vocabulary.

    Args:
      texts: item texts, user profiles, prompt templates...; SID and special
        token strings in them are cut out before training.
      codebook_sizes: K_l of each SID level (`SemanticIds.codebook_sizes`).
      vocab_size: pieces of the sentencepiece model, its <unk>, 256 byte
        pieces and "<", ">" included (the total `size` adds the specials and
        SID tokens). A soft limit: a small corpus may yield fewer pieces.
      model_type: "bpe" or "unigram". BPE is the default: on ml-100k it
        spells an item text in 16.8 pieces at vocab_size 2000 (unigram 21.7)
        and a user profile in 16.4 (unigram 25.6), because unigram's EM keeps
        splitting even the frequent field names ("ti", "tle") of such small,
        templated corpora; it also trains faster.
      character_coverage: characters covering this fraction of the corpus get
        their own piece; rarer ones are spelled as bytes.
      max_sentences: train on at most this many text segments, drawn with
        `seed` (None: all of them).
      seed: the subsampling seed; training itself is deterministic.
      extra_specials: more special tokens, appended after `SPECIAL_TOKENS`.
      workdir: if given, the vocab is cached there (`save` layout): a saved
        vocab built from the same texts and arguments is loaded instead of
        retrained, anything else is rebuilt and overwritten.

    Returns:
      The vocabulary.

    Raises:
      VocabError: bad arguments, an empty corpus, or a `vocab_size` too small
        for the corpus' characters.
    """
    if model_type not in MODEL_TYPES:
      raise VocabError(f"model_type must be one of {MODEL_TYPES}, got "
                       f"{model_type!r}")
    sizes, specials = sid_tokens.check_layout(codebook_sizes,
                                    SPECIAL_TOKENS + tuple(extra_specials))
    if max_sentences is not None and max_sentences < 1:
      raise VocabError(f"max_sentences must be >= 1, got {max_sentences}")
    token_re = sid_tokens.token_regex(specials, _META)
    segments = []
    for n, text in enumerate(texts):
      if not isinstance(text, str):
        raise VocabError(f"texts[{n}] is {type(text).__name__}, not str")
      segments.extend(s for s in sid_tokens.split_plain(text, token_re) if s)
    if not segments:
      raise VocabError("no text to train the vocabulary on")
    if max_sentences is not None and len(segments) > max_sentences:
      keep = np.random.default_rng(seed).choice(
          len(segments), max_sentences, replace=False)
      segments = [segments[i] for i in np.sort(keep)]
    build_info = {
        "vocab_size": int(vocab_size),
        "model_type": model_type,
        "character_coverage": float(character_coverage),
        "max_sentences": max_sentences,
        "seed": int(seed),
        "sentencepiece_version": spm.__version__,
    }
    fingerprint = _fingerprint(segments, sizes, specials, build_info)
    build_info["fingerprint"] = fingerprint
    if workdir is not None:
      cached = _load_cached(workdir, fingerprint)
      if cached is not None:
        return cached

    writer = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(segments),
          model_writer=writer,
          model_type=model_type,
          vocab_size=int(vocab_size),
          hard_vocab_limit=False,
          character_coverage=character_coverage,
          byte_fallback=True,
          normalization_rule_name="identity",
          remove_extra_whitespaces=False,
          add_dummy_prefix=False,
          user_defined_symbols=list(_ISOLATED_PIECES),
          unk_id=0,
          unk_piece=TEXT_UNK_PIECE,
          bos_id=-1,
          eos_id=-1,
          pad_id=-1,
          num_threads=1,
          input_sentence_size=0,
          shuffle_input_sentence=False,
          seed_sentencepiece_size=1_000_000,
          max_sentence_length=1 << 16,
          minloglevel=2)
    except RuntimeError as e:
      raise VocabError(
          f"sentencepiece training failed (vocab_size={vocab_size}, "
          f"{len(segments)} segments): {e}") from None
    vocab = cls(writer.getvalue(), sizes, specials, build_info)
    if workdir is not None:
      vocab.save(workdir)
    return vocab

  def save(self, directory: os.PathLike | str) -> pathlib.Path:
    """Writes `vocab.model` and then `vocab.json`, each atomically.

    The header is written last and records the model's SHA-256, so a crash
    between the two files is caught by `load`. Returns the directory.
    """
    header = {
        "format_version": FORMAT_VERSION,
        "specials": list(self._specials),
        "codebook_sizes": list(self._sizes),
        "num_text_pieces": self.num_text_pieces,
        "size": self.size,
        "model_sha256": _sha256(self._model_proto),
        "build": self._build_info,
    }
    return sid_tokens.save_files(directory, header,
                                 [(MODEL_FILE, self._model_proto)],
                                 HEADER_FILE)

  @classmethod
  def load(cls, directory: os.PathLike | str) -> Vocab:
    """Reads what `save` wrote.

    Raises:
      FileNotFoundError: either file is missing.
      VocabError: an unreadable header, another format version, or a model
        file that does not match the header.
    """
    directory = pathlib.Path(directory)
    for name in (HEADER_FILE, MODEL_FILE):
      if not (directory / name).is_file():
        raise FileNotFoundError(f"{directory / name}: no saved vocabulary "
                                "here (Vocab.save writes it)")
    try:
      header = json.loads((directory / HEADER_FILE).read_text())
      version = header.get("format_version")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
      raise VocabError(f"{directory / HEADER_FILE}: unreadable header: "
                       f"{e}") from None
    if version != FORMAT_VERSION:
      raise VocabError(f"{directory / HEADER_FILE}: format version {version}, "
                       f"this code reads {FORMAT_VERSION}")
    missing = {"specials", "codebook_sizes", "num_text_pieces", "model_sha256"
              } - set(header)
    if missing:
      raise VocabError(f"{directory / HEADER_FILE}: missing fields "
                       f"{sorted(missing)}")
    model = (directory / MODEL_FILE).read_bytes()
    if _sha256(model) != header["model_sha256"]:
      raise VocabError(
          f"{directory / MODEL_FILE} does not match {HEADER_FILE} (SHA-256 "
          f"{_sha256(model)[:12]}..., header says "
          f"{header['model_sha256'][:12]}...): the files come from different "
          "builds; rebuild or re-save the vocabulary")
    try:
      vocab = cls(model, header["codebook_sizes"], header["specials"],
                  header.get("build"))
    except (ValueError, TypeError) as e:  # VocabError is a ValueError.
      raise VocabError(f"{directory}: {e}") from None
    if vocab.num_text_pieces != header["num_text_pieces"]:
      raise VocabError(f"{directory}: the model has {vocab.num_text_pieces} "
                       f"pieces, the header says {header['num_text_pieces']}")
    return vocab

  def __reduce__(self):
    # Pickles as the model bytes (for multi-process input pipelines).
    return (type(self), (self._model_proto, self._sizes, self._specials,
                         self._build_info))

  # --- Layout -----------------------------------------------------------------

  @property
  def size(self) -> int:
    """Total number of ids: specials + sum(K) + sentencepiece pieces."""
    return self._text_offset + self.num_text_pieces

  @property
  def num_text_pieces(self) -> int:
    return self._sp.get_piece_size()

  @property
  def text_offset(self) -> int:
    """The id of sentencepiece piece 0."""
    return self._text_offset

  def text_mask(self) -> np.ndarray:
    """(size,) bool: the text piece ids. Code that needs "is this text?"
    asks this, never where the text block starts (a pretrained tokenizer's
    vocabulary puts its text first)."""
    mask = np.zeros(self.size, bool)
    mask[self._text_offset:] = True
    return mask

  @property
  def model_proto(self) -> bytes:
    """The serialized sentencepiece model."""
    return self._model_proto

  @property
  def build_info(self) -> dict[str, Any]:
    return dict(self._build_info)

  def __repr__(self) -> str:
    return (f"Vocab(size={self.size}, specials={len(self._specials)}, "
            f"codebook_sizes={self._sizes}, "
            f"text_pieces={self.num_text_pieces})")

  # --- The text part ----------------------------------------------------------

  def _encode_plain(self, text: str) -> list[int]:
    ids = self._sp.encode(text)
    # Unreachable with byte fallback; kept so <unk> is the only unknown id.
    return [
        self.unk_id if j == self._sp_unk else self._text_offset + j for j in ids
    ]

  def _other_ids(self, m) -> list[int]:
    return list(self._meta_ids)  # U+2581 as text: its UTF-8 byte pieces

  def _decode_text(self, ids: list[int]) -> str:
    return self._sp.decode([i - self._text_offset for i in ids])

  def _text_token(self, i: int) -> str:
    return self._sp.id_to_piece(i - self._text_offset)

  def _canonical(self, i: int) -> int:
    return self.unk_id if i == self._text_offset + self._sp_unk else i


def _fingerprint(segments: Sequence[str], codebook_sizes: Sequence[int],
                 specials: Sequence[str], build_info: dict[str, Any]) -> str:
  """SHA-256 of everything the built vocab depends on (for workdir caching)."""
  h = hashlib.sha256()
  args = dict(build_info, sentencepiece_version=None)
  h.update(
      json.dumps(
          [list(codebook_sizes), list(specials), args],
          sort_keys=True).encode())
  for s in segments:
    b = s.encode("utf-8")
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)
  return h.hexdigest()


def _load_cached(workdir: os.PathLike | str, fingerprint: str) -> Vocab | None:
  """The vocab saved in `workdir` if it was built from the same inputs."""
  try:
    vocab = Vocab.load(workdir)
  except FileNotFoundError:
    return None
  except VocabError as e:
    logging.warning("Rebuilding the vocabulary: %s", e)
    return None
  if vocab.build_info.get("fingerprint") != fingerprint:
    logging.info("Rebuilding the vocabulary in %s: texts or arguments changed",
                 workdir)
    return None
  logging.info("Loaded the cached vocabulary from %s", workdir)
  return vocab

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
import re
import string
from typing import Any, Iterable, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm

FORMAT_VERSION = 1
MODEL_FILE = "vocab.model"
HEADER_FILE = "vocab.json"

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<think>", "</think>",
                  "<answer>", "</answer>")
LEVEL_LETTERS = string.ascii_lowercase
# Sentencepiece's own (never produced) unknown piece, named apart from <unk>.
TEXT_UNK_PIECE = "<text_unk>"
MODEL_TYPES = ("unigram", "bpe")
# Any string shaped like a SID token, valid for this vocab or not.
_SID_PATTERN = r"<(?P<level>[a-z])_(?P<code>[0-9]+)>"
_SID_RE = re.compile(_SID_PATTERN)
_SPECIAL_SHAPE_RE = re.compile(r"<[^<>\s]+>")
_META = "\u2581"  # sentencepiece's whitespace symbol.
# Pieces no learned piece may contain (module docstring).
_ISOLATED_PIECES = ("<", ">")


class VocabError(ValueError):
  """An invalid, mismatched or unreadable vocabulary."""


def sid_string(sid: Sequence[int]) -> str:
  """The token string of a SID, e.g. (12, 7, 0) -> "<a_12><b_7><c_0>".

  Needs no vocab, so prompt templates can be written before one exists;
  `Vocab.item_sid_string` also checks the codes against the codebooks.
  """
  if len(sid) > len(LEVEL_LETTERS):
    raise VocabError(f"SID {tuple(sid)} has more than {len(LEVEL_LETTERS)} "
                     "levels")
  return "".join(f"<{LEVEL_LETTERS[l]}_{int(c)}>" for l, c in enumerate(sid))


def _token_regex(specials: Sequence[str]) -> re.Pattern:
  """Matches SID-shaped strings, the specials, or the meta symbol."""
  alternatives = "|".join(
      re.escape(s) for s in sorted(specials, key=len, reverse=True))
  return re.compile(f"(?P<sid>{_SID_PATTERN})|(?P<special>{alternatives})|"
                    f"(?P<meta>{_META})")


def _split_plain(text: str, token_re: re.Pattern) -> Iterable[str]:
  """The (possibly empty) pieces of `text` between token-pattern matches."""
  pos = 0
  for m in token_re.finditer(text):
    yield text[pos:m.start()]
    pos = m.end()
  yield text[pos:]


def _check_layout(codebook_sizes: Sequence[int],
                  specials: Sequence[str]) -> tuple[tuple[int, ...], tuple]:
  """Validated (codebook sizes, specials) as tuples; VocabError otherwise."""
  sizes = tuple(int(k) for k in codebook_sizes)
  if not sizes or any(k < 1 for k in sizes):
    raise VocabError(f"codebook sizes must be >= 1, got {sizes}")
  if len(sizes) > len(LEVEL_LETTERS):
    raise VocabError(f"{len(sizes)} SID levels; at most "
                     f"{len(LEVEL_LETTERS)} have level letters")
  specials = tuple(specials)
  if specials[:len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
    raise VocabError(f"specials must start with {SPECIAL_TOKENS}, got "
                     f"{specials}")
  for s in specials:
    if not isinstance(
        s, str) or not _SPECIAL_SHAPE_RE.fullmatch(s) or _SID_RE.fullmatch(s):
      raise VocabError(f"special {s!r} must look like <name> (no spaces or "
                       "brackets inside) and not like a SID token <x_N>")
  if len(set(specials)) != len(specials):
    raise VocabError(f"duplicate specials in {specials}")
  return sizes, specials


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class Vocab:
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
    sizes, specials = _check_layout(codebook_sizes, specials)
    sp = spm.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(bytes(model_proto))
    except (RuntimeError, OSError) as e:
      raise VocabError(f"not a sentencepiece model: {e}") from None

    self._model_proto = bytes(model_proto)
    self._sp = sp
    self._sizes = sizes
    self._specials = specials
    self._special_ids = {s: i for i, s in enumerate(specials)}
    self._build_info = dict(build_info or {})
    offsets = len(specials) + np.r_[0, np.cumsum(sizes)[:-1]]
    self._level_offsets = offsets.astype(np.int32)
    self._level_sizes = np.asarray(sizes, np.int32)
    for a in (self._level_offsets, self._level_sizes):
      a.setflags(write=False)
    self._text_offset = len(specials) + sum(sizes)
    self._token_re = _token_regex(specials)
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
    sizes, specials = _check_layout(codebook_sizes,
                                    SPECIAL_TOKENS + tuple(extra_specials))
    if max_sentences is not None and max_sentences < 1:
      raise VocabError(f"max_sentences must be >= 1, got {max_sentences}")
    token_re = _token_regex(specials)
    segments = []
    for n, text in enumerate(texts):
      if not isinstance(text, str):
        raise VocabError(f"texts[{n}] is {type(text).__name__}, not str")
      segments.extend(s for s in _split_plain(text, token_re) if s)
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
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = {
        "format_version": FORMAT_VERSION,
        "specials": list(self._specials),
        "codebook_sizes": list(self._sizes),
        "num_text_pieces": self.num_text_pieces,
        "size": self.size,
        "model_sha256": _sha256(self._model_proto),
        "build": self._build_info,
    }
    for name, data in ((MODEL_FILE, self._model_proto),
                       (HEADER_FILE,
                        (json.dumps(header, indent=1) + "\n").encode())):
      tmp = directory / (name + ".tmp")
      tmp.write_bytes(data)
      os.replace(tmp, directory / name)
    return directory

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
  def specials(self) -> tuple[str, ...]:
    return self._specials

  @property
  def codebook_sizes(self) -> tuple[int, ...]:
    return self._sizes

  @property
  def levels(self) -> int:
    return len(self._sizes)

  @property
  def level_offsets(self) -> np.ndarray:
    """(L,) int32: the id of code 0 of each level (read-only)."""
    return self._level_offsets

  @property
  def level_sizes(self) -> np.ndarray:
    """(L,) int32: K_l (read-only)."""
    return self._level_sizes

  @property
  def sid_offset(self) -> int:
    return len(self._specials)

  @property
  def text_offset(self) -> int:
    """The id of sentencepiece piece 0."""
    return self._text_offset

  @property
  def model_proto(self) -> bytes:
    """The serialized sentencepiece model."""
    return self._model_proto

  @property
  def build_info(self) -> dict[str, Any]:
    return dict(self._build_info)

  def special_id(self, token: str) -> int:
    """The id of a special token string, e.g. "<think>"."""
    try:
      return self._special_ids[token]
    except KeyError:
      raise KeyError(f"{token!r} is not a special token of this vocab "
                     f"({self._specials})") from None

  pad_id = property(lambda self: 0, doc="<pad>; also the id of 0 padding.")
  bos_id = property(lambda self: 1, doc="<bos>")
  eos_id = property(lambda self: 2, doc="<eos>")
  unk_id = property(lambda self: 3, doc="<unk>")
  think_id = property(lambda self: 4, doc="<think>")
  think_end_id = property(lambda self: 5, doc="</think>")
  answer_id = property(lambda self: 6, doc="<answer>")
  answer_end_id = property(lambda self: 7, doc="</answer>")

  def sid_id_range(self, level: int) -> tuple[int, int]:
    """[lo, hi): the ids of level `level`'s SID tokens (a logits slice)."""
    self._check_level(level)
    lo = int(self._level_offsets[level])
    return lo, lo + self._sizes[level]

  def is_sid_id(self, ids):
    """Elementwise: which ids are SID tokens (numpy or jax arrays)."""
    return (ids >= self.sid_offset) & (ids < self._text_offset)

  # --- SIDs -------------------------------------------------------------------

  def sid_token_id(self, level: int, code: int) -> int:
    """The id of SID token (level, code)."""
    self._check_level(level)
    if not 0 <= int(code) < self._sizes[level]:
      raise VocabError(f"code {code} outside [0, {self._sizes[level]}) of "
                       f"level {LEVEL_LETTERS[level]}")
    return int(self._level_offsets[level]) + int(code)

  def sid_tokens(self, sid: Sequence[int]) -> list[int]:
    """The L token ids of a SID (checked against the codebooks)."""
    if len(sid) != self.levels:
      raise VocabError(f"SID {tuple(sid)} has {len(sid)} levels, this vocab "
                       f"has {self.levels}")
    return [self.sid_token_id(l, c) for l, c in enumerate(sid)]

  def tokens_to_sid(self, ids: Sequence[int]) -> tuple[int, ...]:
    """The SID spelt by L token ids, level a first.

    Raises:
      VocabError: wrong length, or an id that is not a SID token of the level
        its position requires (a special, text, another level's token).
    """
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if len(ids) != self.levels:
      raise VocabError(f"{len(ids)} ids {ids} for a SID of {self.levels} "
                       "levels")
    sid = []
    for l, i in enumerate(ids):
      lo, hi = self.sid_id_range(l)
      if not lo <= i < hi:
        raise VocabError(
            f"position {l} of {ids}: id {i} is {self._describe(i)}, expected "
            f"a level-{LEVEL_LETTERS[l]} SID token (ids [{lo}, {hi}))")
      sid.append(i - lo)
    return tuple(sid)

  def codes_to_ids(self, codes):
    """(..., L) codes -> token ids; one add, unchecked, works inside jit."""
    return codes + self._level_offsets

  def ids_to_codes(self, ids):
    """(..., L) SID token ids -> codes; one subtract, unchecked, jit-able."""
    return ids - self._level_offsets

  def item_sid_string(self, sid: Sequence[int]) -> str:
    """"<a_12><b_7><c_0>" for a prompt, after checking the codes."""
    self.sid_tokens(sid)
    return sid_string(sid)

  def check_compatible(self, semantic_ids) -> None:
    """Raises VocabError unless these SIDs have this vocab's codebook sizes.

    Args:
      semantic_ids: a `SemanticIds`, or a sequence of codebook sizes.
    """
    sizes = tuple(
        int(k) for k in getattr(semantic_ids, "codebook_sizes", semantic_ids))
    if sizes != self._sizes:
      raise VocabError(
          f"semantic IDs with codebook sizes {sizes} do not fit this vocab, "
          f"built for {self._sizes}: SID token ids depend on the sizes; "
          "rebuild the vocab for these SIDs")

  def item_token_table(self, semantic_ids) -> np.ndarray:
    """(num_items + 1, L) int32 token ids of every item; row 0 is <pad>."""
    self.check_compatible(semantic_ids)
    table = self.codes_to_ids(np.asarray(semantic_ids.codes, np.int32))
    table[0] = self.pad_id
    return table

  # --- Text -------------------------------------------------------------------

  def encode(self,
             text: str,
             *,
             add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    """Token ids of `text`; SID and special strings become their single ids.

    Raises:
      VocabError: a SID-shaped string this vocab has no token for.
    """
    ids = [self.bos_id] if add_bos else []
    pos = 0
    for m in self._token_re.finditer(text):
      if m.start() > pos:
        ids.extend(self._encode_plain(text[pos:m.start()]))
      if m.group("sid"):
        ids.append(self._sid_match_id(m))
      elif m.group("special"):
        ids.append(self._special_ids[m.group("special")])
      else:
        ids.extend(self._meta_ids)
      pos = m.end()
    if pos < len(text):
      ids.extend(self._encode_plain(text[pos:]))
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def decode(self, ids, *, skip_specials: bool = False) -> str:
    """The string of token ids (a list, or a 1-D numpy/jax array).

    Args:
      ids: token ids.
      skip_specials: drop special tokens (<pad>, <eos>, <think>, ...).

    Raises:
      VocabError: an id outside [0, size).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
      raise VocabError(f"decode takes a 1-D sequence of int ids, got shape "
                       f"{ids.shape} dtype {ids.dtype}")
    out, run = [], []
    sp_unk = self._text_offset + self._sp_unk
    for i in ids.tolist():
      if i >= self._text_offset and i < self.size and i != sp_unk:
        run.append(i - self._text_offset)
        continue
      if run:
        out.append(self._sp.decode(run))
        run = []
      if i == sp_unk:
        i = self.unk_id
      if 0 <= i < self.sid_offset:
        if not skip_specials:
          out.append(self._specials[i])
      elif self.sid_offset <= i < self._text_offset:
        out.append(self.id_to_token(i))
      else:
        raise VocabError(f"token id {i} outside [0, {self.size})")
    if run:
      out.append(self._sp.decode(run))
    return "".join(out)

  def id_to_token(self, i: int) -> str:
    """The string of one id: a special, a SID token, or a text piece."""
    i = int(i)
    if 0 <= i < self.sid_offset:
      return self._specials[i]
    if self.sid_offset <= i < self._text_offset:
      level = int(np.searchsorted(self._level_offsets, i, side="right")) - 1
      return f"<{LEVEL_LETTERS[level]}_{i - self._level_offsets[level]}>"
    if self._text_offset <= i < self.size:
      return self._sp.id_to_piece(i - self._text_offset)
    raise VocabError(f"token id {i} outside [0, {self.size})")

  def __repr__(self) -> str:
    return (f"Vocab(size={self.size}, specials={len(self._specials)}, "
            f"codebook_sizes={self._sizes}, "
            f"text_pieces={self.num_text_pieces})")

  # --- Internals --------------------------------------------------------------

  def _encode_plain(self, text: str) -> list[int]:
    ids = self._sp.encode(text)
    # Unreachable with byte fallback; kept so <unk> is the only unknown id.
    return [
        self.unk_id if j == self._sp_unk else self._text_offset + j for j in ids
    ]

  def _sid_match_id(self, m: re.Match) -> int:
    level = LEVEL_LETTERS.index(m.group("level"))
    code = m.group("code")
    if (level >= self.levels or int(code) >= self._sizes[level] or
        code != str(int(code))):
      raise VocabError(
          f"{m.group(0)!r} at character {m.start()} is shaped like a SID "
          f"token but this vocab has none such (codebook sizes "
          f"{self._sizes}, levels {LEVEL_LETTERS[:self.levels]}, codes "
          "without leading zeros); was the prompt built for other SIDs?")
    return int(self._level_offsets[level]) + int(code)

  def _check_level(self, level: int) -> None:
    if not 0 <= int(level) < self.levels:
      raise VocabError(f"level {level} outside [0, {self.levels})")

  def _describe(self, i: int) -> str:
    if not 0 <= i < self.size:
      return "out of range"
    kind = ("a special" if i < self.sid_offset else
            "a SID token" if i < self._text_offset else "a text piece")
    return f"{kind} ({self.id_to_token(i)!r})"


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

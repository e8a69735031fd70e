"""What every SID-LLM vocabulary shares: the marker and SID token block.

A SID-LLM vocabulary is some text tokenizer plus one contiguous block of ids
the text model never produces:

  [base, base + n_s)             the special markers, in `specials` order:
                                 <pad> <bos> <eos> <unk> <think> </think>
                                 <answer> </answer>, then any extras
  [sid_offset, sid_end)          the SID tokens, level by level: level l,
                                 code c is id `level_offsets[l] + c`, written
                                 `<a_c>`, `<b_c>`, ... (level letters a..z)

`SidTokens` holds that block and everything defined on it (the marker ids,
the SID arithmetic that trie-constrained decoding uses inside jit, the
parsing of SID and marker strings in prompts). Its two implementations
differ only in the text part and in `base`:

  `vocab.Vocab`                    base 0, then a sentencepiece model
                                   trained on the catalogue's texts;
  `pretrained_vocab.PretrainedVocab`  a pretrained checkpoint's own
                                   tokenizer first (ids [0, T)), the block
                                   after it (base = T), as new embedding
                                   rows of the model.

Code above the vocabulary never assumes where text lies: it asks
`text_mask()` (think masks, format checks) and the marker properties.

Encoding splits a string on the token patterns (every marker, every
`<x_N>`) and hands only the plain text between them to the text model, so a
SID or marker is always one id; a SID-shaped string this vocabulary has no
token for (`<e_0>` with four levels, `<a_07>`) is an error, not text.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import string
from typing import Any, Iterable, Sequence

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<think>", "</think>",
                  "<answer>", "</answer>")
LEVEL_LETTERS = string.ascii_lowercase
# Any string shaped like a SID token, valid for this vocab or not.
SID_PATTERN = r"<(?P<level>[a-z])_(?P<code>[0-9]+)>"
SID_RE = re.compile(SID_PATTERN)
SPECIAL_SHAPE_RE = re.compile(r"<[^<>\s]+>")


class VocabError(ValueError):
  """An invalid, mismatched or unreadable vocabulary."""


def sid_string(sid: Sequence[int]) -> str:
  """The token string of a SID, e.g. (12, 7, 0) -> "<a_12><b_7><c_0>".

  Needs no vocab, so prompt templates can be written before one exists;
  `item_sid_string` also checks the codes against the codebooks.
  """
  if len(sid) > len(LEVEL_LETTERS):
    raise VocabError(f"SID {tuple(sid)} has more than {len(LEVEL_LETTERS)} "
                     "levels")
  return "".join(f"<{LEVEL_LETTERS[l]}_{int(c)}>" for l, c in enumerate(sid))


def token_regex(specials: Sequence[str], extra: str = "") -> re.Pattern:
  """Matches SID-shaped strings, the specials, or (group `other`) `extra`."""
  alternatives = "|".join(
      re.escape(s) for s in sorted(specials, key=len, reverse=True))
  other = f"|(?P<other>{extra})" if extra else ""
  return re.compile(f"(?P<sid>{SID_PATTERN})|(?P<special>{alternatives})"
                    f"{other}")


def split_plain(text: str, token_re: re.Pattern) -> Iterable[str]:
  """The (possibly empty) pieces of `text` between token-pattern matches."""
  pos = 0
  for m in token_re.finditer(text):
    yield text[pos:m.start()]
    pos = m.end()
  yield text[pos:]


def check_layout(codebook_sizes: Sequence[int],
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
        s, str) or not SPECIAL_SHAPE_RE.fullmatch(s) or SID_RE.fullmatch(s):
      raise VocabError(f"special {s!r} must look like <name> (no spaces or "
                       "brackets inside) and not like a SID token <x_N>")
  if len(set(specials)) != len(specials):
    raise VocabError(f"duplicate specials in {specials}")
  return sizes, specials


def save_files(directory: os.PathLike | str, header: dict[str, Any],
               files: Sequence[tuple[str, bytes]],
               header_name: str = "vocab.json") -> pathlib.Path:
  """Writes `files`, then the JSON `header` last, each atomically (a crash
  between them leaves a header that does not match, which loading catches
  through the digests it records). Returns the directory."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  body = (json.dumps(header, indent=1) + "\n").encode()
  for name, data in list(files) + [(header_name, body)]:
    tmp = directory / (name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, directory / name)
  return directory


class SidTokens:
  """The marker + SID block at ids [base, sid_end) (module docstring).

  Subclasses provide the text part: `size`, `text_mask`, `_encode_plain`,
  `_decode_text`, `_text_token`, and may match one more pattern in
  `encode` (`_other_ids`).
  """

  def __init__(self, codebook_sizes: Sequence[int], specials: Sequence[str],
               base: int, extra_pattern: str = ""):
    sizes, specials = check_layout(codebook_sizes, specials)
    self._sizes = sizes
    self._specials = specials
    self._base = int(base)
    self._special_ids = {s: self._base + i for i, s in enumerate(specials)}
    offsets = self._base + len(specials) + np.r_[0, np.cumsum(sizes)[:-1]]
    self._level_offsets = offsets.astype(np.int32)
    self._level_sizes = np.asarray(sizes, np.int32)
    for a in (self._level_offsets, self._level_sizes):
      a.setflags(write=False)
    self._sid_end = self._base + len(specials) + sum(sizes)
    self._token_re = token_regex(specials, extra_pattern)

  # --- Layout -----------------------------------------------------------------

  @property
  def size(self) -> int:
    raise NotImplementedError

  def text_mask(self) -> np.ndarray:
    """(size,) bool: the ids of text. Code that needs "is this text?" asks
    this, never where the text block starts."""
    raise NotImplementedError

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
    """The id of level a's code 0 (after the markers)."""
    return self._base + len(self._specials)

  @property
  def sid_end(self) -> int:
    """One past the last SID token id."""
    return self._sid_end

  def special_id(self, token: str) -> int:
    """The id of a special token string, e.g. "<think>"."""
    try:
      return self._special_ids[token]
    except KeyError:
      raise KeyError(f"{token!r} is not a special token of this vocab "
                     f"({self._specials})") from None

  pad_id = property(lambda self: self._base, doc="<pad>")
  bos_id = property(lambda self: self._base + 1, doc="<bos>")
  eos_id = property(lambda self: self._base + 2, doc="<eos>")
  unk_id = property(lambda self: self._base + 3, doc="<unk>")
  think_id = property(lambda self: self._base + 4, doc="<think>")
  think_end_id = property(lambda self: self._base + 5, doc="</think>")
  answer_id = property(lambda self: self._base + 6, doc="<answer>")
  answer_end_id = property(lambda self: self._base + 7, doc="</answer>")

  def sid_id_range(self, level: int) -> tuple[int, int]:
    """[lo, hi): the ids of level `level`'s SID tokens (a logits slice)."""
    self._check_level(level)
    lo = int(self._level_offsets[level])
    return lo, lo + self._sizes[level]

  def is_sid_id(self, ids):
    """Elementwise: which ids are SID tokens (numpy or jax arrays)."""
    return (ids >= self.sid_offset) & (ids < self._sid_end)

  def _is_marker(self, i: int) -> bool:
    return self._base <= i < self.sid_offset

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
        ids.extend(self._other_ids(m))
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
      skip_specials: drop the special markers (<pad>, <eos>, <think>, ...).

    Raises:
      VocabError: an id outside [0, size).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
      raise VocabError(f"decode takes a 1-D sequence of int ids, got shape "
                       f"{ids.shape} dtype {ids.dtype}")
    out, run = [], []
    for i in ids.tolist():
      i = self._canonical(i)
      if not 0 <= i < self.size:
        raise VocabError(f"token id {i} outside [0, {self.size})")
      if not (self._is_marker(i) or self.sid_offset <= i < self._sid_end):
        run.append(i)
        continue
      if run:
        out.append(self._decode_text(run))
        run = []
      if self.sid_offset <= i:
        out.append(self.id_to_token(i))
      elif not skip_specials:
        out.append(self._specials[i - self._base])
    if run:
      out.append(self._decode_text(run))
    return "".join(out)

  def id_to_token(self, i: int) -> str:
    """The string of one id: a special, a SID token, or a text token."""
    i = int(i)
    if self._is_marker(i):
      return self._specials[i - self._base]
    if self.sid_offset <= i < self._sid_end:
      level = int(np.searchsorted(self._level_offsets, i, side="right")) - 1
      return f"<{LEVEL_LETTERS[level]}_{i - self._level_offsets[level]}>"
    if 0 <= i < self.size:
      return self._text_token(i)
    raise VocabError(f"token id {i} outside [0, {self.size})")

  # --- For the text part ------------------------------------------------------

  def _encode_plain(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode_text(self, ids: list[int]) -> str:
    raise NotImplementedError

  def _text_token(self, i: int) -> str:
    raise NotImplementedError

  def _other_ids(self, m: re.Match) -> list[int]:
    raise NotImplementedError

  def _canonical(self, i: int) -> int:
    """The id decoding treats `i` as (e.g. the text model's own unknown
    piece as <unk>)."""
    return i

  # --- Internals --------------------------------------------------------------

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
    kind = ("a special" if self._is_marker(i) else
            "a SID token" if self.sid_offset <= i < self._sid_end else
            "a text piece")
    return f"{kind} ({self.id_to_token(i)!r})"

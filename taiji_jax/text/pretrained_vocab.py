"""A pretrained checkpoint's own tokenizer, with the SID-LLM tokens after it.

The second implementation of the SID-LLM vocabulary (`sid_tokens`): text is
the pretrained model's tokenizer (a `tokenizers.Tokenizer`: a Hugging Face
`tokenizer.json`, or rebuilt from a GGUF file's metadata by
`gguf_tokenizer`), unchanged, at its own ids [0, T); the markers and SID
tokens are new ids [T, size) after it:

  [0, T)              the tokenizer's tokens, its own special tokens (chat
                      markers such as <|im_start|>) included
  [T, F)              unused: embedding rows a checkpoint pads its
                      vocabulary with (F = `first_free`, default T)
  [F, F + n_s)        <pad> <bos> <eos> <unk> <think> </think> <answer>
                      </answer> (+ extras): pad_id = F
  [F + n_s, size)     SID tokens level by level

so the checkpoint's embedding (and tied head) keeps its T rows as they are
and grows by the new ones (`models.hf_import.extend_vocab`). The text ids are
[0, T) without the tokenizer's special tokens (`text_mask`): a rationale may
hold words, not a chat marker or a SID.

Encoding splits on our markers and SID strings first, so "<a_3>" is always
one new id; plain text between them goes to the tokenizer without adding
its own BOS/EOS, and a byte-level BPE decodes it back exactly
(`decode(encode(s)) == s`). A pretrained tokenizer's token whose string is
one of our markers would be shadowed by ours; `PretrainedVocab` refuses
such a tokenizer rather than silently giving the string two meanings.

`save(directory)` writes `tokenizer.json` and then `vocab.json` (format,
kind "pretrained", specials, codebook sizes, T, the tokenizer file's
SHA-256, where it came from); `load_vocab(directory)` reads either kind.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np
import tokenizers

from taiji_jax.models import gguf_import
from taiji_jax.text import gguf_tokenizer
from taiji_jax.text import sid_tokens
from taiji_jax.text import vocab as vocab_lib

KIND = "pretrained"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class PretrainedVocab(sid_tokens.SidTokens):
  """A pretrained tokenizer + the marker and SID block (module docstring)."""

  def __init__(self,
               tokenizer: tokenizers.Tokenizer,
               codebook_sizes: Sequence[int],
               specials: Sequence[str] = sid_tokens.SPECIAL_TOKENS,
               source: dict[str, Any] | None = None,
               first_free: int | None = None):
    """Wraps `tokenizer`.

    Args:
      tokenizer: the checkpoint's tokenizer (not modified).
      codebook_sizes: K_l of each SID level.
      specials: the marker strings in id order (must start with
        `SPECIAL_TOKENS`).
      source: where the tokenizer came from (kept in the saved header).
      first_free: the first id the new tokens may take (default T): a
        checkpoint whose embedding has more rows than its tokenizer has
        tokens (padded to a multiple of 64, say) keeps those rows unused.

    Raises:
      VocabError: invalid sizes or specials, or a tokenizer token that is
        one of our marker or SID strings.
    """
    t = tokenizer.get_vocab_size(with_added_tokens=True)
    if first_free is not None and first_free < t:
      raise sid_tokens.VocabError(f"first_free={first_free} is inside the "
                                  f"tokenizer's {t} ids")
    super().__init__(codebook_sizes, specials, base=max(t, first_free or t))
    own = tokenizer.get_vocab(with_added_tokens=True)
    clash = sorted(s for s in own
                   if s in self._special_ids or sid_tokens.SID_RE.fullmatch(s))
    if clash:
      raise sid_tokens.VocabError(
          f"the tokenizer has tokens {clash[:5]} that are SID-LLM marker or "
          "SID strings; they would be shadowed by the new ids")
    self._tok = tokenizer
    self._num_text = t
    self._source = dict(source or {})
    control = [
        i for i, tok in tokenizer.get_added_tokens_decoder().items()
        if tok.special
    ]
    self._text_mask = np.zeros(self.size, bool)
    self._text_mask[:t] = True
    self._text_mask[control] = False
    self._text_mask.setflags(write=False)

  # --- Construction, saving, loading ------------------------------------------

  @classmethod
  def from_gguf(cls,
                path: os.PathLike | str,
                codebook_sizes: Sequence[int],
                first_free: int | None = None) -> PretrainedVocab:
    """The tokenizer in a GGUF file's metadata + the SID block."""
    meta = gguf_import.GGUFFile(path).metadata
    tok = gguf_tokenizer.from_metadata(meta, str(path))
    return cls(tok, codebook_sizes, source={"gguf": str(path)},
               first_free=first_free)

  @classmethod
  def from_checkpoint(cls,
                      path: os.PathLike | str,
                      codebook_sizes: Sequence[int],
                      first_free: int | None = None) -> PretrainedVocab:
    """The tokenizer of a checkpoint: a .gguf file, a
    `gguf_import.PRETRAINED` name, or a Hugging Face directory."""
    gguf = gguf_import.gguf_path(path)
    if gguf is not None:
      return cls.from_gguf(gguf, codebook_sizes, first_free)
    return cls.from_tokenizer_file(path, codebook_sizes, first_free)

  @classmethod
  def from_tokenizer_file(cls,
                          path: os.PathLike | str,
                          codebook_sizes: Sequence[int],
                          first_free: int | None = None) -> PretrainedVocab:
    """A Hugging Face `tokenizer.json` (or a checkpoint directory holding
    one) + the SID block."""
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / TOKENIZER_FILE
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no tokenizer.json")
    return cls(tokenizers.Tokenizer.from_file(str(path)), codebook_sizes,
               source={"tokenizer_json": str(path)}, first_free=first_free)

  def save(self, directory: os.PathLike | str) -> pathlib.Path:
    """Writes tokenizer.json, then vocab.json (atomically each; the header
    records the tokenizer's SHA-256, so a crash between them is caught)."""
    data = self._tok.to_str().encode()
    header = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "specials": list(self._specials),
        "codebook_sizes": list(self._sizes),
        "num_text_tokens": self._num_text,
        "first_free": self._base,
        "size": self.size,
        "tokenizer_sha256": _sha256(data),
        "source": self._source,
    }
    return sid_tokens.save_files(directory, header, [(TOKENIZER_FILE, data)],
                                 vocab_lib.HEADER_FILE)

  @classmethod
  def load(cls, directory: os.PathLike | str) -> PretrainedVocab:
    """Reads what `save` wrote.

    Raises:
      FileNotFoundError: a file is missing.
      VocabError: another kind or version, or a tokenizer file that does not
        match the header.
    """
    directory = pathlib.Path(directory)
    header = _header(directory)
    if header.get("kind") != KIND:
      raise sid_tokens.VocabError(f"{directory}: not a pretrained-tokenizer "
                                  "vocabulary (use load_vocab)")
    if header.get("format_version") != FORMAT_VERSION:
      raise sid_tokens.VocabError(
          f"{directory / vocab_lib.HEADER_FILE}: format version "
          f"{header.get('format_version')}, this code reads {FORMAT_VERSION}")
    path = directory / TOKENIZER_FILE
    if not path.is_file():
      raise FileNotFoundError(f"{path}: missing (PretrainedVocab.save "
                              "writes it)")
    data = path.read_bytes()
    if _sha256(data) != header["tokenizer_sha256"]:
      raise sid_tokens.VocabError(
          f"{path} does not match {vocab_lib.HEADER_FILE} (SHA-256 "
          f"{_sha256(data)[:12]}..., header says "
          f"{header['tokenizer_sha256'][:12]}...): the files come from "
          "different saves")
    vocab = cls(tokenizers.Tokenizer.from_str(data.decode()),
                header["codebook_sizes"], header["specials"],
                header.get("source"), header.get("first_free"))
    if vocab.size != header["size"]:
      raise sid_tokens.VocabError(f"{directory}: {vocab.size} ids, the header "
                                  f"says {header['size']}")
    return vocab

  def __reduce__(self):
    return (_from_str, (self._tok.to_str(), self._sizes, self._specials,
                        self._source, self._base))

  # --- Layout -----------------------------------------------------------------

  @property
  def size(self) -> int:
    """T + specials + sum(K)."""
    return self._sid_end

  @property
  def first_new_id(self) -> int:
    """F: the first id of the added markers and SIDs (the checkpoint's
    embedding has rows [0, F) for its own tokens)."""
    return self._base

  @property
  def num_text_pieces(self) -> int:
    """T: the pretrained tokenizer's ids, its own specials included."""
    return self._num_text

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    return self._tok

  @property
  def source(self) -> dict[str, Any]:
    return dict(self._source)

  @property
  def build_info(self) -> dict[str, Any]:
    return {"kind": KIND, **self._source}

  def text_mask(self) -> np.ndarray:
    return self._text_mask

  def __repr__(self) -> str:
    return (f"PretrainedVocab(size={self.size}, text={self._num_text}, "
            f"specials={len(self._specials)}, codebook_sizes={self._sizes})")

  # --- The text part ----------------------------------------------------------

  def _encode_plain(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def _decode_text(self, ids: list[int]) -> str:
    unused = [i for i in ids if i >= self._num_text]
    if unused:
      raise sid_tokens.VocabError(
          f"ids {unused[:5]} are unused embedding rows (between the "
          f"tokenizer's {self._num_text} ids and the first new one, "
          f"{self._base})")
    return self._tok.decode(ids, skip_special_tokens=False)

  def _text_token(self, i: int) -> str:
    return self._tok.id_to_token(i)


def _from_str(tokenizer_json: str, sizes, specials, source,
              first_free) -> PretrainedVocab:
  return PretrainedVocab(
      tokenizers.Tokenizer.from_str(tokenizer_json), sizes, specials, source,
      first_free)


def _header(directory: pathlib.Path) -> dict[str, Any]:
  path = directory / vocab_lib.HEADER_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no saved vocabulary here")
  try:
    header = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise sid_tokens.VocabError(f"{path}: unreadable header: {e}") from None
  if not isinstance(header, dict):
    raise sid_tokens.VocabError(f"{path}: unreadable header")
  return header


def load_vocab(directory: os.PathLike | str) -> sid_tokens.SidTokens:
  """A saved vocabulary of either kind: `vocab.Vocab` (sentencepiece) or
  `PretrainedVocab`, by its header."""
  directory = pathlib.Path(directory)
  if _header(directory).get("kind") == KIND:
    return PretrainedVocab.load(directory)
  return vocab_lib.Vocab.load(directory)

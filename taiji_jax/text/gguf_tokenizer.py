"""The tokenizer stored in a GGUF file's metadata, as a `tokenizers.Tokenizer`.

GGUF keeps a byte-level BPE tokenizer (`tokenizer.ggml.model = "gpt2"`) as
its token strings (`tokenizer.ggml.tokens`, GPT-2's byte-to-unicode
alphabet), merge rules (`tokenizer.ggml.merges`, "a b" strings), token
types (3 = control / special) and a pre-tokenizer name
(`tokenizer.ggml.pre`). `from_metadata` rebuilds the Hugging Face
tokenizer those came from, so text is split exactly as the model was
trained on:

  "smollm"  digits split one by one, then GPT-2's byte-level regex
            (SmolLM / SmolLM2's tokenizer.json);
  "gpt2"    GPT-2's byte-level regex.

Special (control) tokens such as `<|im_start|>` are matched whole before
BPE, so a chat template's markers are single tokens; they and the unused
padding tokens (type 5) are special, so never text (`text_mask`): nothing
samples them into a rationale. Other pre-tokenizers
(llama-bpe, qwen2, ...) raise NotImplementedError rather than splitting
text differently from the model's training.
"""

from __future__ import annotations

from typing import Any, Mapping

import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers

PRE_TOKENIZERS = ("smollm", "gpt2")
CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
UNUSED = 5  # LLAMA_TOKEN_TYPE_UNUSED: padding rows of the vocabulary
NOT_TEXT = (CONTROL, UNUSED)


def from_metadata(meta: Mapping[str, Any],
                  source: str = "GGUF metadata") -> tokenizers.Tokenizer:
  """The byte-level BPE tokenizer of a GGUF file's metadata.

  Args:
    meta: `gguf_import.GGUFFile.metadata`.
    source: what to name in errors (the file).

  Raises:
    ValueError: no tokenizer, or its fields disagree (named).
    NotImplementedError: a tokenizer model or pre-tokenizer not listed in
      the module docstring.
  """
  model = meta.get("tokenizer.ggml.model")
  if model is None:
    raise ValueError(f"{source}: no tokenizer (tokenizer.ggml.model)")
  if model != "gpt2":
    raise NotImplementedError(f"{source}: tokenizer model {model!r}; only "
                              "byte-level BPE ('gpt2') is supported.")
  pre = meta.get("tokenizer.ggml.pre", "gpt2")
  if pre not in PRE_TOKENIZERS:
    raise NotImplementedError(f"{source}: pre-tokenizer {pre!r}; supported: "
                              f"{PRE_TOKENIZERS}.")
  tokens = list(meta["tokenizer.ggml.tokens"])
  types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  if len(types) != len(tokens):
    raise ValueError(f"{source}: {len(tokens)} tokens but {len(types)} "
                     "token types.")
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f"{source}: the token list has duplicates.")
  merges = []
  for j, m in enumerate(meta.get("tokenizer.ggml.merges", [])):
    parts = m.split(" ")
    if len(parts) != 2:
      raise ValueError(f"{source}: merge {j} {m!r} is not two tokens.")
    merges.append((parts[0], parts[1]))
  tok = tokenizers.Tokenizer(
      models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  specials = [t for t, ty in zip(tokens, types) if ty in NOT_TEXT]
  tok.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False)
       for t in specials])
  return tok


def special_ids(meta: Mapping[str, Any]) -> dict[str, int]:
  """{"bos", "eos", "pad", "unk"} ids the metadata names (those present)."""
  out = {}
  for name in ("bos", "eos", "padding", "unknown"):
    key = f"tokenizer.ggml.{name}_token_id"
    if key in meta:
      out[{"padding": "pad", "unknown": "unk"}.get(name, name)] = int(meta[key])
  return out

"""Tiny GGUF files for tests: a random `Decoder` written as llama.cpp does.

`write_gguf(path, cfg, decoder)` stores a decoder's parameters under
llama.cpp's tensor names and layout (PyTorch (out, in) order, q/k rows
permuted per head for Llama), its config in the metadata, and a small
byte-level BPE tokenizer (`tiny_tokenizer`), with `quantize` naming tensors
to store as Q8_0 instead of F32. `gguf_import.load_gguf` must give the same
model back.
"""

from __future__ import annotations

import os
from typing import Sequence

from flax import nnx
import gguf
import numpy as np

from taiji_jax.models import decoder as decoder_lib
from taiji_jax.models import gguf_import
from taiji_jax.models import hf_import
from taiji_jax.text import chat_template

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map."""
  bs = list(range(ord("!"),
                  ord("~") + 1)) + list(range(ord("¡"),
                                              ord("¬") + 1)) + list(
                                                  range(ord("®"),
                                                        ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def tiny_tokenizer(
    merges: Sequence[tuple[str, str]] = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"),
                                         ("i", "n"))
) -> tuple[list[str], list[int], list[str]]:
  """(tokens, token types, merges) of a byte-level BPE vocabulary: the
  specials (control tokens), the 256 byte symbols, then one token per merge."""
  symbols = list(bytes_to_unicode().values())
  tokens = list(SPECIALS) + symbols + ["".join(m) for m in merges]
  types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
  return tokens, types, [" ".join(m) for m in merges]


def write_gguf(path: os.PathLike | str,
               cfg: decoder_lib.DecoderConfig,
               decoder: decoder_lib.Decoder,
               *,
               arch: str = "llama",
               quantize: Sequence[str] = (),
               pre: str = "smollm",
               tokenizer: tuple[list[str], list[int], list[str]] | None = None,
               with_tokenizer: bool = True,
               chat: str | None = chat_template.CHATML,
               drop: Sequence[str] = ()) -> None:
  """Writes `decoder` as a GGUF file.

  Args:
    path: the .gguf file to write.
    cfg, decoder: the model; its vocab_size must be >= the tokenizer's.
    arch: "llama" (q/k permuted) or "qwen2".
    quantize: GGUF tensor names stored as Q8_0.
    pre: `tokenizer.ggml.pre`.
    tokenizer: (tokens, types, merges); default `tiny_tokenizer()`.
    with_tokenizer: False writes no tokenizer (models smaller than it).
    chat: the `tokenizer.chat_template` (None: none); the turn ends at EOS,
      `<|im_end|>`, as in SmolLM2.
    drop: GGUF tensor names left out (for error tests).
  """
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  if with_tokenizer:
    tokens, types, merges = tokenizer or tiny_tokenizer()
    if len(tokens) > cfg.vocab_size:
      raise ValueError(f"{len(tokens)} tokens exceed vocab_size "
                       f"{cfg.vocab_size}.")
    pad = cfg.vocab_size - len(tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens + [f"<unused{i}>" for i in range(pad)])
    w.add_token_types(types + [5] * pad)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if chat is not None:
      w.add_chat_template(chat)
  params = dict(nnx.to_flat_state(nnx.state(decoder, nnx.Param)))
  layout = hf_import.hf_layout(cfg)
  gguf_of = {h: g for g, h in gguf_import.hf_names(cfg.num_layers).items()}
  for hf_name, spec in layout.items():
    name = gguf_of[hf_name]
    if name in drop:
      continue
    ours = np.asarray(params[spec.path].get_value(), np.float32)
    torch_w = _to_torch_layout(hf_name, ours, cfg)
    if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = cfg.num_heads if "q_proj" in hf_name else cfg.num_kv_heads
      torch_w = gguf_import.permute_rows(torch_w, heads)
    if name in quantize:
      q = gguf.quants.quantize(torch_w, gguf.GGMLQuantizationType.Q8_0)
      w.add_tensor(
          name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(name, np.ascontiguousarray(torch_w))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def tiny_llama_config() -> decoder_lib.DecoderConfig:
  """The config of `write_tiny_llama`'s model."""
  return decoder_lib.DecoderConfig.tiny(vocab_size=300, attention_bias=False)


def write_tiny_llama(path: os.PathLike | str) -> decoder_lib.DecoderConfig:
  """Writes the tiny random Llama of `gguf_import.TINY_RANDOM_LLAMA` (the
  same bytes every time: parameters from seed 0, `tiny_tokenizer`)."""
  cfg = tiny_llama_config()
  write_gguf(path, cfg, decoder_lib.Decoder(cfg, rngs=nnx.Rngs(0)))
  return cfg


def _to_torch_layout(hf_name: str, ours: np.ndarray,
                     cfg: decoder_lib.DecoderConfig) -> np.ndarray:
  """The inverse of `hf_import.hf_layout`'s conversions."""
  d = cfg.hidden_size
  if hf_name.endswith("embed_tokens.weight") or ours.ndim == 1:
    return ours
  if hf_name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
    return ours.reshape(-1)
  if hf_name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
    return ours.reshape(d, -1).T  # (D, heads, H) -> (heads * H, D)
  if hf_name.endswith("o_proj.weight"):
    return ours.reshape(-1, d).T  # (N, H, D) -> (D, N * H)
  return ours.T  # (in, out) -> (out, in); lm_head (D, V) -> (V, D)

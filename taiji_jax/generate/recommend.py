"""Next-item recommendation with a decoder: prefill the prompt, then decode.

`recommend` runs a left-padded prompt batch through the decoder's KV cache
and continues with trie-constrained beam search over the SID levels;
`sample_items` does the same with constrained temperature sampling (RL
rollouts). Both are pure functions of (decoder, arrays) and jit as a whole
with `nnx.jit` or by splitting the module (`nnx.split` / `nnx.merge`).
"""

from __future__ import annotations

from typing import Sequence

import jax

from taiji_jax.generate import constrained
from taiji_jax.quantize import semantic_ids as sid_lib


def prefill(decoder, prompts_bt: jax.Array, pad_id: int, extra: int):
  """Runs left-padded prompts into a fresh cache with `extra` free slots.

  Returns (last-position logits (B, V), cache).
  """
  b, t = prompts_bt.shape
  cache = decoder.init_cache(b, t + extra)
  logits_btv, cache = decoder.decode_step(
      prompts_bt, cache, attention_mask_bt=prompts_bt != pad_id)
  return logits_btv[:, -1], cache


def recommend(decoder,
              prompts_bt: jax.Array,
              trie: Sequence[sid_lib.TrieLevel],
              level_offsets: Sequence[int],
              num_beams: int,
              pad_id: int = 0,
              exclude_bh: jax.Array | None = None,
              paths: jax.Array | None = None) -> constrained.Decoded:
  """Top-`num_beams` items per prompt by constrained beam search.

  Args:
    decoder: a `taiji_jax.models.decoder.Decoder`.
    prompts_bt: (B, T) left-padded prompts ending where the SID starts.
    trie, paths: `SemanticIds.trie` / `.paths`.
    level_offsets: `Vocab.level_offsets`.
    num_beams: beams = items returned.
    pad_id: the padding id of the prompts.
    exclude_bh: (B, H) items never to return (history), 0 = padding.
  """
  first, cache = prefill(decoder, prompts_bt, pad_id, len(trie))
  return constrained.beam_search(
      decoder.decode_next,
      first,
      cache,
      trie,
      level_offsets,
      num_beams,
      exclude_bh=exclude_bh,
      paths=paths)


def sample_items(decoder,
                 prompts_bt: jax.Array,
                 trie: Sequence[sid_lib.TrieLevel],
                 level_offsets: Sequence[int],
                 key: jax.Array,
                 temperature: float = 1.0,
                 pad_id: int = 0,
                 exclude_bh: jax.Array | None = None,
                 paths: jax.Array | None = None) -> constrained.Decoded:
  """One constrained sample per prompt (see `constrained.sample`)."""
  first, cache = prefill(decoder, prompts_bt, pad_id, len(trie))
  return constrained.sample(
      decoder.decode_next,
      first,
      cache,
      trie,
      level_offsets,
      key,
      temperature=temperature,
      exclude_bh=exclude_bh,
      paths=paths)

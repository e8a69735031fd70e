"""Think-then-recommend decoding: a bounded rationale, then the SID beam.

A reasoning SID-LLM is trained on rows

  [prompt] <think> rationale </think> <answer> <a_.><b_.>.. </answer>

(`cot/orft.py`, `reasoning_rows`). Decoding mirrors that format:

1. prefill `[prompt] <think>`;
2. generate the rationale greedily or by temperature sampling, at most
   `max_think` tokens, from the *text* tokens plus </think> only
   (`think_token_mask`), so no SID or marker can leak into it; a row stops at
   its own </think>, and one still open at the budget is closed for it
   (`Thought.closed` records which rows closed by themselves);
3. feed `</think> <answer>` (just `<answer>` where the model already wrote
   </think>) and run the trie-constrained beam search of
   `constrained.beam_search` over the SID levels from there.

Rows that finish early feed <pad> with attention mask 0 for the remaining
steps: the decoder never attends those slots and does not advance their RoPE
positions, so every row reads exactly its own tokens, as in training.

With `num_traces` > 1 (OneRec-Think's evaluation: several sampled traces per
user, a beam each) the beams of a user's traces are merged by
`merge_beams`: an item scores its best log-likelihood over the traces.

`free_generate` + `format_check` measure think-format compliance without any
constraint: from the bare prompt the model must write `<think>` text
`</think><answer>` a valid SID `</answer>` by itself (Taiji's think-tag
presence rate).

Everything is a pure function of (decoder, arrays) and jits as a whole.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from taiji_jax.generate import constrained
from taiji_jax.generate import recommend
from taiji_jax.quantize import semantic_ids as sid_lib

NEG_INF = constrained.NEG_INF


class Thought(NamedTuple):
  """Generated text per row.

  Attributes:
    tokens: (B, N) int32 tokens in generation order; the stop token is kept
      where it was generated, `pad_id` after it.
    length: (B,) int32 tokens before the stop token (or N).
    closed: (B,) bool, the row generated the stop token within N steps.
  """
  tokens: jax.Array
  length: jax.Array
  closed: jax.Array


class ThinkDecoded(NamedTuple):
  """`constrained.Decoded` fields plus the reasoning that led to them.

  `thought` is per (row, trace): (B * num_traces, max_think) tokens, trace t
  of row b at index b * num_traces + t.
  """
  items: jax.Array
  scores: jax.Array
  codes: jax.Array
  thought: Thought


def think_token_mask(text_mask_v: np.ndarray, stop_id: int) -> np.ndarray:
  """(V,) bool: the tokens a rationale may hold (the vocabulary's text ids,
  `vocab.text_mask()`, wherever they lie) + the stop."""
  mask = np.array(text_mask_v, bool)
  mask[stop_id] = True
  return mask


def generate_until(decoder,
                   first_logits_bv: jax.Array,
                   cache,
                   stop_id: int,
                   max_new: int,
                   allowed_v: jax.Array | None = None,
                   key: jax.Array | None = None,
                   temperature: float = 1.0,
                   pad_id: int = 0):
  """Generates up to `max_new` tokens per row, stopping at `stop_id`.

  Args:
    decoder: a `models.decoder.Decoder` (its `decode_step`).
    first_logits_bv: (B, V) logits for the first new token.
    cache: the decoder's cache after the context.
    stop_id: the token that ends a row (fed to the cache like any other).
    max_new: the step budget N (a Python int).
    allowed_v: optional (V,) bool of the tokens that may be generated.
    key: a PRNG key for temperature sampling; None: greedy (argmax).
    temperature: softmax temperature of the sampling (> 0).
    pad_id: what finished rows feed (masked out of attention).

  Returns:
    (Thought, logits (B, V) after the last fed token, cache).
  """
  b = first_logits_bv.shape[0]
  if max_new < 1:
    raise ValueError(f"max_new must be >= 1, got {max_new}.")
  if key is not None and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  keys = (jax.random.split(key, max_new)
          if key is not None else jnp.zeros((max_new,), jnp.int32))

  def step(carry, step_key):
    logits_bv, cache, done_b = carry
    logits_bv = logits_bv.astype(jnp.float32)
    if allowed_v is not None:
      logits_bv = jnp.where(allowed_v[None], logits_bv, NEG_INF)
    if key is None:
      token_b = jnp.argmax(logits_bv, axis=-1)
    else:
      token_b = jax.random.categorical(step_key, logits_bv / temperature, -1)
    live_b = ~done_b
    token_b = jnp.where(live_b, token_b, pad_id).astype(jnp.int32)
    new_logits, cache = decoder.decode_step(
        token_b[:, None], cache, attention_mask_bt=live_b[:, None])
    # A finished row keeps its last real logits (nothing new was read).
    logits_bv = jnp.where(live_b[:, None], new_logits[:, 0], logits_bv)
    done_b = done_b | (token_b == stop_id)
    return (logits_bv, cache, done_b), (token_b, live_b)

  init = (first_logits_bv.astype(jnp.float32), cache, jnp.zeros((b,), bool))
  (logits_bv, cache, closed_b), (tokens_nb,
                                 live_nb) = jax.lax.scan(step, init, keys)
  tokens_bn = tokens_nb.T
  fed_b = jnp.sum(live_nb, axis=0).astype(jnp.int32)
  length_b = fed_b - closed_b.astype(jnp.int32)
  return Thought(tokens_bn, length_b, closed_b), logits_bv, cache


def reason(decoder,
           prompts_bt: jax.Array,
           *,
           think_id: int,
           think_end_id: int,
           answer_id: int,
           allowed_v: jax.Array,
           max_think: int,
           extra: int,
           key: jax.Array | None = None,
           temperature: float = 1.0,
           pad_id: int = 0):
  """Steps 1-3 of the module docstring up to the answer's first token.

  Prefills `[prompt] <think>`, writes a rationale of at most `max_think`
  tokens, closes it where the model did not and feeds `<answer>`.

  Returns:
    (Thought, logits (B, V) of the answer's first token, cache with
    `extra` free slots left for the answer).
  """
  rows = prompts_bt.shape[0]
  tokens_bt = jnp.concatenate(
      [prompts_bt, jnp.full((rows, 1), think_id, prompts_bt.dtype)], axis=1)
  logits_bv, cache = recommend.prefill(decoder, tokens_bt, pad_id,
                                       max_think + 2 + extra)
  thought, _, cache = generate_until(
      decoder,
      logits_bv,
      cache,
      think_end_id,
      max_think,
      allowed_v=allowed_v,
      key=key,
      temperature=temperature,
      pad_id=pad_id)
  tail_b2, mask_b2 = answer_opening(thought.closed, think_end_id, answer_id,
                                    pad_id)
  logits_b2v, cache = decoder.decode_step(
      tail_b2, cache, attention_mask_bt=mask_b2)
  return thought, logits_b2v[:, -1], cache


def answer_opening(closed_b: jax.Array, think_end_id: int, answer_id: int,
                   pad_id: int) -> tuple[jax.Array, jax.Array]:
  """(tokens (B, 2), attention (B, 2)) fed after a rationale:
  `</think> <answer>`, or `<pad> <answer>` (masked) where the model already
  wrote `</think>`."""
  rows = closed_b.shape[0]
  tail_b2 = jnp.stack([
      jnp.where(closed_b, pad_id, think_end_id),
      jnp.full((rows,), answer_id)
  ], 1).astype(jnp.int32)
  return tail_b2, jnp.stack([~closed_b, jnp.ones((rows,), bool)], 1)


def think_then_recommend(decoder,
                         prompts_bt: jax.Array,
                         trie: Sequence[sid_lib.TrieLevel],
                         level_offsets: Sequence[int],
                         num_beams: int,
                         *,
                         think_id: int,
                         think_end_id: int,
                         answer_id: int,
                         allowed_v: jax.Array,
                         max_think: int,
                         key: jax.Array | None = None,
                         temperature: float = 1.0,
                         num_traces: int = 1,
                         pad_id: int = 0,
                         exclude_bh: jax.Array | None = None,
                         paths: jax.Array | None = None) -> ThinkDecoded:
  """Reason (bounded), then rank items by constrained beam search.

  Args:
    decoder: a `models.decoder.Decoder`.
    prompts_bt: (B, T) left-padded prompts ending where `<think>` goes.
    trie, level_offsets, num_beams, exclude_bh, paths: as in
      `recommend.recommend`.
    think_id, think_end_id, answer_id: the marker ids (`Vocab`).
    allowed_v: (V,) bool rationale tokens (`think_token_mask`).
    max_think: rationale budget in tokens.
    key: sampling key; None: greedy reasoning (then `num_traces` must be 1).
    temperature: of the sampled reasoning.
    num_traces: reasoning traces per prompt, their beams merged.

  Returns:
    `ThinkDecoded` with (B, num_beams) items best first.
  """
  if num_traces < 1 or (num_traces > 1 and key is None):
    raise ValueError(f"num_traces={num_traces}: must be >= 1, and > 1 needs a "
                     "sampling key (greedy traces would be identical).")
  b = prompts_bt.shape[0]
  n = num_traces
  if n > 1:
    prompts_bt = jnp.repeat(prompts_bt, n, axis=0)
    if exclude_bh is not None:
      exclude_bh = jnp.repeat(exclude_bh, n, axis=0)
  thought, first_bv, cache = reason(
      decoder,
      prompts_bt,
      think_id=think_id,
      think_end_id=think_end_id,
      answer_id=answer_id,
      allowed_v=allowed_v,
      max_think=max_think,
      extra=len(trie),
      key=key,
      temperature=temperature,
      pad_id=pad_id)
  decoded = constrained.beam_search(
      decoder.decode_next,
      first_bv,
      cache,
      trie,
      level_offsets,
      num_beams,
      exclude_bh=exclude_bh,
      paths=paths)
  items, scores, codes = decoded
  if n > 1:
    w = num_beams
    items, scores, codes = merge_beams(
        items.reshape(b, n * w), scores.reshape(b, n * w),
        codes.reshape(b, n * w, -1), w)
  return ThinkDecoded(items, scores, codes, thought)


def merge_beams(items_bm: jax.Array, scores_bm: jax.Array, codes_bml: jax.Array,
                k: int):
  """The k best distinct items of M candidates per row (max score per item).

  Args:
    items_bm: (B, M) item ids, 0 = no item.
    scores_bm: (B, M) their scores (-inf for no item).
    codes_bml: (B, M, L) their SIDs.
    k: items kept.

  Returns:
    (items (B, k), scores (B, k), codes (B, k, L)), best first; 0 / -inf
    where fewer than k distinct items exist.
  """
  order = jnp.argsort(-scores_bm, axis=1, stable=True)
  items = jnp.take_along_axis(items_bm, order, 1)
  scores = jnp.take_along_axis(scores_bm, order, 1)
  codes = jnp.take_along_axis(codes_bml, order[..., None], 1)
  m = items.shape[1]
  earlier_mm = jnp.tril(jnp.ones((m, m), bool), -1)  # [j, i]: i < j
  dup_bm = jnp.any((items[:, :, None] == items[:, None, :]) & earlier_mm[None],
                   axis=-1)
  keep = (items > 0) & ~dup_bm
  scores = jnp.where(keep, scores, -jnp.inf)
  top, idx = jax.lax.top_k(scores, k)
  return (jnp.where(top > -jnp.inf, jnp.take_along_axis(items, idx, 1), 0), top,
          jnp.take_along_axis(codes, idx[..., None], 1))


def free_generate(decoder,
                  prompts_bt: jax.Array,
                  stop_id: int,
                  max_new: int,
                  pad_id: int = 0) -> Thought:
  """Greedy, unconstrained continuation of the prompts (up to `stop_id`).

  Only <pad> is never generated; everything else, SID and marker tokens
  included, is the model's own choice, which `format_check` then judges.
  """
  logits_bv, cache = recommend.prefill(decoder, prompts_bt, pad_id, max_new)
  allowed_v = jnp.arange(logits_bv.shape[-1]) != pad_id
  thought, _, _ = generate_until(
      decoder, logits_bv, cache, stop_id, max_new, allowed_v, pad_id=pad_id)
  return thought


def format_check(tokens_bn: jax.Array, trie: Sequence[sid_lib.TrieLevel],
                 level_offsets: Sequence[int], *, think_id: int,
                 think_end_id: int, answer_id: int, answer_end_id: int,
                 text_mask_v) -> dict[str, jax.Array]:
  """Per-row checks of `<think> text </think><answer> SID </answer>`.

  Args:
    tokens_bn: (B, N) a generation from the bare prompt (`free_generate`).
    trie, level_offsets: the SIDs and their token layout.
    think_id, ..., answer_end_id: marker ids.
    text_mask_v: (V,) bool, the text ids (`vocab.text_mask()`).

  Returns:
    {name: (B,) float32 in {0, 1}}:
      think_open   the first token is <think>;
      think_closed a </think> follows, with only text pieces between;
      answer       then <answer>, one SID token per level in level order and
                   </answer>;
      compliant    all of the above, and that SID is an item of the
                   catalogue.
  """
  b, n = tokens_bn.shape
  levels = len(trie)
  pos_n = jnp.arange(n)
  is_end_bn = tokens_bn == think_end_id
  has_end = jnp.any(is_end_bn[:, 1:], axis=1)
  end_b = jnp.where(has_end, jnp.argmax(is_end_bn[:, 1:], axis=1) + 1, n)
  opened = tokens_bn[:, 0] == think_id
  inside_bn = (pos_n[None] >= 1) & (pos_n[None] < end_b[:, None])
  is_text_bn = jnp.asarray(text_mask_v)[jnp.clip(tokens_bn, 0,
                                                  len(text_mask_v) - 1)]
  text_only = ~jnp.any(inside_bn & ~is_text_bn, axis=1)
  closed = opened & has_end & text_only

  def at(offset):
    idx = jnp.clip(end_b + offset, 0, n - 1)
    inside = end_b + offset < n
    return jnp.where(inside, jnp.take_along_axis(tokens_bn, idx[:, None],
                                                 1)[:, 0], -1)

  answer = closed & (at(1) == answer_id)
  codes = []
  for l in range(levels):
    tok = at(2 + l)
    size = trie[l].vocab_size
    code = tok - level_offsets[l]
    answer = answer & (code >= 0) & (code < size)
    codes.append(jnp.clip(code, 0, size - 1))
  answer = answer & (at(2 + levels) == answer_end_id)
  item_b = sid_lib.walk_trie(trie, jnp.stack(codes, 1).astype(jnp.int32))
  valid = answer & (item_b > 0)
  f = lambda x: x.astype(jnp.float32)
  return {
      "think_open": f(opened),
      "think_closed": f(closed),
      "answer": f(answer),
      "compliant": f(valid),
  }

"""A decoder LM as the rationale teacher (RUPR, or direct without the target).

Any decoder of this codebase — an SFT checkpoint or a Hugging Face model
imported with `models.hf_import` and given SID tokens by `extend_vocab` — is
prompted with the user's profile and history in the SFT prompt format and,
for RUPR, the item they chose next:

  <bos>User: <profile>. History: <SIDs...> Next: <a_.><b_.>.. <title>.<think>

and samples k continuations up to </think> (at most `max_new_tokens`,
text pieces only, so no SID or marker token can appear in a rationale).
The direct-distillation baseline (`direct=True`) drops the " Next: ..."
part, so nothing it writes can depend on the target.

Generation is one jitted program per batch shape: prefill + a `lax.scan` of
sampling steps with the decoder's KV cache (`generate.think.generate_until`).
Texts are deterministic given the arguments, the seed and `batch_size`.
"""

from __future__ import annotations

import functools
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from taiji_jax.cot import teachers as teachers_lib
from taiji_jax.generate import recommend
from taiji_jax.generate import think as think_lib
from taiji_jax.sidlm import rows as sid_rows

TARGET_TEMPLATE = " Next:"


@functools.partial(
    nnx.jit, static_argnames=("temperature", "stop_id", "max_new", "pad_id"))
def _sample(decoder, prompts_bt, allowed_v, key, *, temperature, stop_id,
            max_new, pad_id):
  logits_bv, cache = recommend.prefill(decoder, prompts_bt, pad_id, max_new)
  thought, _, _ = think_lib.generate_until(
      decoder,
      logits_bv,
      cache,
      stop_id,
      max_new,
      allowed_v=allowed_v,
      key=key,
      temperature=temperature,
      pad_id=pad_id)
  return thought


def sample_texts(decoder, vocab, prompts: np.ndarray, *, stop_id: int,
                 max_new: int, temperature: float, seed: int,
                 batch_size: int) -> list[str]:
  """One sampled continuation of each left-padded prompt row, decoded.

  Text tokens only (`vocab.text_mask()`: no marker, SID or chat-control
  token) until `stop_id` or `max_new` tokens; one jitted prefill + decode
  per batch of `batch_size` rows (the last batch filled up, so one
  compilation). Deterministic given the prompts, `seed` and `batch_size`.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  allowed = jnp.asarray(think_lib.think_token_mask(vocab.text_mask(),
                                                   stop_id))
  n = len(prompts)
  texts = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    idx = np.where(idx < n, idx, 0)
    key = jax.random.fold_in(jax.random.key(seed), start)
    thought = _sample(
        decoder,
        jnp.asarray(prompts[idx]),
        allowed,
        key,
        temperature=float(temperature),
        stop_id=stop_id,
        max_new=max_new,
        pad_id=vocab.pad_id)
    tokens = np.asarray(thought.tokens)
    lengths = np.asarray(thought.length)
    for j in range(min(batch_size, n - start)):
      texts.append(vocab.decode(tokens[j, :lengths[j]].tolist()).strip())
  return texts


class BatchedTeacher(teachers_lib.Teacher):
  """A teacher whose `rationales_batch` does the work (one example is a
  batch of one); `max_items` history items are shown."""

  def __init__(self, decoder, vocab, *, stop_id: int, max_items: int,
               max_new_tokens: int, temperature: float, direct: bool,
               batch_size: int, hint: str = ""):
    """The sampling settings both teachers share, checked (named errors);
    `hint` says how to fix a decoder of another vocabulary."""
    if not temperature > 0:
      raise ValueError(f"temperature must be > 0, got {temperature}.")
    if min(max_items, max_new_tokens, batch_size) < 1:
      raise ValueError(f"max_items={max_items}, max_new_tokens="
                       f"{max_new_tokens} and batch_size={batch_size} must "
                       "be >= 1.")
    if decoder.cfg.vocab_size != vocab.size:
      hint = hint or "not the decoder of this vocabulary"
      raise ValueError(f"decoder vocab_size {decoder.cfg.vocab_size} != "
                       f"vocab.size {vocab.size}: {hint}.")
    self.decoder, self.vocab, self.stop_id = decoder, vocab, int(stop_id)
    self.max_items, self.max_new_tokens = int(max_items), int(max_new_tokens)
    self.temperature, self.direct = float(temperature), bool(direct)
    self.batch_size = int(batch_size)

  def prompts(self, users: Sequence[int], histories: np.ndarray,
              targets: Sequence[int] | None) -> np.ndarray:
    """(N, P) left-padded prompt token ids, one row per example."""
    raise NotImplementedError

  def _sampling_prompts(self, prompts: np.ndarray) -> np.ndarray:
    """The rows sampling continues from (by default the prompts)."""
    return prompts

  def rationales_batch(self, users: Sequence[int], histories: np.ndarray,
                       targets: Sequence[int] | None, k: int,
                       seed: int) -> list[str]:
    """k rationales for each (user, history, target), example-major."""
    histories = self._check_batch(histories, targets, k, seed)
    prompts = np.repeat(self.prompts(users, histories, targets), k, axis=0)
    return sample_texts(
        self.decoder,
        self.vocab,
        self._sampling_prompts(prompts),
        stop_id=self.stop_id,
        max_new=self.max_new_tokens,
        temperature=self.temperature,
        seed=seed,
        batch_size=self.batch_size)

  def _check_batch(self, histories, targets, k, seed) -> np.ndarray:
    if k < 1 or seed < 0:
      raise ValueError(f"k={k} must be >= 1 and seed={seed} >= 0.")
    histories = np.asarray(histories)
    if histories.ndim == 1:
      histories = histories[None]
    if not self.direct and targets is None:
      raise ValueError("a RUPR teacher needs the targets (direct=True for "
                       "the target-blind baseline).")
    return histories

  def rationales(self, user: int, history_items: Sequence[int],
                 target_item: int | None, k: int, seed: int) -> list[str]:
    hist = np.asarray(history_items, np.int64)
    hist = hist[hist != 0][-self.max_items:]
    row = np.zeros((1, self.max_items), np.int64)
    if hist.size:
      row[0, -hist.size:] = hist
    return self.rationales_batch([user], row, None if self.direct else
                                 [target_item], k, seed)


class LMTeacher(BatchedTeacher):
  """Samples rationales from a decoder; see the module docstring.

  Args:
    decoder: a `models.decoder.Decoder` over `vocab`.
    vocab: the `text.Vocab` with the SID tokens of `item_tokens`.
    dataset: the `Dataset` (user profiles, item titles).
    item_tokens: (num_items + 1, L) SID token ids (`vocab.item_token_table`).
    max_items: history items in the prompt (the most recent).
    max_prefix: prompt prefix budget (`sid_rows.user_prefixes`).
    max_new_tokens: rationale budget.
    temperature: sampling temperature (> 0).
    direct: the target-blind baseline.
    batch_size: prompts x k rows generated at once.
  """

  def __init__(self,
               decoder,
               vocab,
               dataset,
               item_tokens: np.ndarray,
               *,
               max_items: int,
               max_prefix: int,
               max_new_tokens: int = 64,
               temperature: float = 1.0,
               direct: bool = False,
               batch_size: int = 32):
    super().__init__(
        decoder,
        vocab,
        stop_id=vocab.think_end_id,
        max_items=max_items,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        direct=direct,
        batch_size=batch_size)
    self.dataset = dataset
    self.item_tokens = np.asarray(item_tokens)
    self.max_prefix = max_prefix
    users = np.arange(1, dataset.num_users + 1)
    self._prefixes = sid_rows.user_prefixes(dataset, vocab, users, max_prefix)
    self._titles = dataset.item_features.get("title")

  def prompts(self, users: Sequence[int], histories: np.ndarray,
              targets: Sequence[int] | None) -> np.ndarray:
    """(N, P) left-padded teacher prompts (without the final <think>)."""
    base = sid_rows.prompt_rows(
        np.asarray(histories), np.asarray(users), self.item_tokens,
        self._prefixes, self.max_items, self.max_prefix, self.vocab.pad_id)
    if self.direct:
      return base
    rows = []
    for row, target in zip(base, targets):
      target = int(target)
      if not 1 <= target <= self.dataset.num_items:
        raise ValueError(f"target item {target} out of range "
                         f"[1, {self.dataset.num_items}].")
      title = self._titles[target] if self._titles is not None else None
      tail = (self.vocab.encode(TARGET_TEMPLATE) +
              self.item_tokens[target].tolist() +
              (self.vocab.encode(f" {title}.") if title else []))
      rows.append(row[row != self.vocab.pad_id].tolist() + tail)
    length = max(len(r) for r in rows)
    return sid_rows.left_pad(rows, length, self.vocab.pad_id)

  def _sampling_prompts(self, prompts: np.ndarray) -> np.ndarray:
    """The prompts with <think> appended: the rationale's column."""
    think = np.full((len(prompts), 1), self.vocab.think_id, prompts.dtype)
    return np.concatenate([prompts, think], 1)

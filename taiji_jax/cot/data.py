"""Reasoning examples: (user, history, next item) -> candidate rationale rows.

The CoT fine-tuning data of Taiji's SFT stage, made in three steps:

1. `next_item_examples(split, per_user, max_len)`: the last `per_user`
   training targets of every user, each with the items before it (the
   prompt's history) — the interactions closest to the held-out ones.
2. `candidate_rationales(teacher, examples, k, seed)`: k rationales per
   example from any `teachers.Teacher` (the RUPR teacher sees the target, a
   direct one does not).
3. `rationale_tokens` + `orft.reasoning_rows`: tokens of
   `[prompt] <think> z </think> <answer> SID </answer>`, with the rationale
   cut to a token budget at a sentence boundary, never mid-word.

`vocabulary_texts` samples rationales for the vocabulary's training corpus
so reasoning text is spelt in learned pieces, not bytes.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from taiji_jax.cot import orft
from taiji_jax.cot import teachers as teachers_lib

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def next_item_examples(split: dict[str, Any], per_user: int,
                       max_len: int) -> dict[str, np.ndarray]:
  """The last `per_user` training targets of each user, with histories.

  Args:
    split: `Dataset.split_leave_one_out(...)` (its "train" part).
    per_user: targets per user (>= 1); fewer for users with short training
      sequences (a target needs at least one item before it).
    max_len: history length (the most recent items, right-aligned).

  Returns:
    {"users": (N,), "histories": (N, max_len) 0-padded on the left,
     "targets": (N,)} int32, users in split order, targets in time order.
  """
  if per_user < 1 or max_len < 1:
    raise ValueError(f"per_user={per_user} and max_len={max_len} must be "
                     ">= 1.")
  train = split["train"]
  users, histories, targets = [], [], []
  for u, seq in zip(train["users"], train["sequences"]):
    seq = np.asarray(seq)
    for j in range(max(1, len(seq) - per_user), len(seq)):
      hist = seq[:j][-max_len:]
      row = np.zeros(max_len, np.int32)
      row[max_len - len(hist):] = hist
      users.append(int(u))
      histories.append(row)
      targets.append(int(seq[j]))
  if not users:
    raise ValueError("no training sequence has two items: no example.")
  return {
      "users": np.asarray(users, np.int32),
      "histories": np.stack(histories),
      "targets": np.asarray(targets, np.int32),
  }


def candidate_rationales(teacher: teachers_lib.Teacher,
                         examples: dict[str, np.ndarray], k: int,
                         seed: int) -> dict[str, Any]:
  """k rationales per example: {"example": (N * k,) int, "texts": [str]}.

  Teachers with a batched `rationales_batch` (the LM teacher) are called
  once; others per example.
  """
  n = len(examples["targets"])
  batched = getattr(teacher, "rationales_batch", None)
  if batched is not None:
    texts = batched(examples["users"], examples["histories"],
                    examples["targets"], k, seed)
  else:
    texts = []
    for u, h, t in zip(examples["users"], examples["histories"],
                       examples["targets"]):
      texts += teacher.rationales(int(u), h[h > 0], int(t), k, seed)
  if len(texts) != n * k:
    raise ValueError(f"teacher returned {len(texts)} rationales for {n} "
                     f"examples x k={k}.")
  return {"example": np.repeat(np.arange(n), k), "texts": list(texts)}


def rationale_tokens(vocab, text: str, max_tokens: int) -> list[int]:
  """`vocab.encode(text)` within `max_tokens`, cut after whole sentences.

  The longest prefix of whole sentences that fits; a first sentence longer
  than the budget is cut at the last word boundary that fits.
  """
  if max_tokens < 1:
    raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
  tokens = vocab.encode(text)
  if len(tokens) <= max_tokens:
    return tokens
  sentences = _SENTENCE_END.split(text)
  best = []
  for j in range(1, len(sentences)):
    cand = vocab.encode(" ".join(sentences[:j]))
    if len(cand) > max_tokens:
      break
    best = cand
  if best:
    return best
  words = sentences[0].split(" ")
  for j in range(len(words) - 1, 0, -1):
    cand = vocab.encode(" ".join(words[:j]))
    if len(cand) <= max_tokens:
      return cand
  return tokens[:max_tokens]


def vocabulary_texts(dataset,
                     item_embeddings: np.ndarray | None,
                     split: dict[str, Any],
                     num_examples: int,
                     k: int = 2,
                     seed: int = 0) -> list[str]:
  """Rationales of `num_examples` sampled training examples, RUPR and
  direct, for the vocabulary's training corpus (0: none)."""
  if num_examples <= 0:
    return []
  examples = next_item_examples(split, 1, 50)
  rng = np.random.default_rng([seed, 7])
  pick = rng.choice(
      len(examples["targets"]),
      min(num_examples, len(examples["targets"])),
      replace=False)
  sample = {key: v[np.sort(pick)] for key, v in examples.items()}
  texts = []
  for direct in (False, True):
    teacher = teachers_lib.AttributeTeacher(dataset, item_embeddings, direct)
    texts += candidate_rationales(teacher, sample, k, seed)["texts"]
  return texts


def rows_for(examples: dict[str, np.ndarray], example_ids: Sequence[int],
             texts: Sequence[str], prompts: np.ndarray, item_tokens: np.ndarray,
             vocab, max_think: int, target: str,
             length: int) -> dict[str, np.ndarray]:
  """`orft.reasoning_rows` of candidate rationales of `examples`.

  Args:
    examples: `next_item_examples` output.
    example_ids: (R,) which example each rationale belongs to.
    texts: (R,) the rationale texts ("" for an empty <think></think>).
    prompts: (N, P) the examples' prompts (`sidlm.rows.prompt_rows`).
    item_tokens: (num_items + 1, L) SID tokens of every item.
    max_think: the rationale budget in tokens.
    target: "reasoning" (CoT SFT loss) or "answer" (ORFT scoring).
    length: row length.
  """
  example_ids = np.asarray(example_ids, np.int64)
  rationales = [
      rationale_tokens(vocab, t, max_think) if t else [] for t in texts
  ]
  return orft.reasoning_rows(prompts[example_ids], rationales,
                             item_tokens[examples["targets"][example_ids]],
                             vocab, length, target)

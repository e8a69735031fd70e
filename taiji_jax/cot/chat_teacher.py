"""An instruct LLM as the rationale teacher, prompted through its chat template.

Taiji's RUPR data is written by an LLM that is shown the user and the item
they chose next and asked why; the direct-distillation baseline asks the
same LLM without the target. `ChatTeacher` does this with any imported
instruct checkpoint (SmolLM2-135M-Instruct by default in the configs): the
prompt is plain English, rendered by the checkpoint's own chat template
(`text.chat_template`):

  system     SYSTEM (what the teacher is for, and the length bound)
  user       A user (age: 24; gender: M; occupation: technician; ...) chose
             these movies, oldest first:
             1. Fargo (1996; Crime, Drama, Thriller)
             ...
             Next they chose: Star Wars (1977; Action, Adventure, ...).
             In two or three sentences, explain what in their history made
             them choose it, without naming it.
  assistant  <the rationale, sampled up to the end-of-turn token>

Without the target (`direct=True`) the "Next they chose" line is absent and
the question asks what the history says about the next choice, so nothing
the teacher writes can depend on the target: the prompt is a function of
(user, history) only (tested).

The model's vocabulary is a `PretrainedVocab` over the checkpoint's
tokenizer (its chat markers are single tokens); its embedding grown to that
vocabulary (`hf_import.extend_vocab`) only so that the <pad> id exists. The
new rows are never sampled or read: sampling is restricted to the
tokenizer's text tokens and the end-of-turn stop (`lm_teacher.sample_texts`),
and padding is masked out of attention, so the teacher is the checkpoint as
it is. k samples per prompt at `temperature`, one jitted prefill + decode
per batch, deterministic given the seed and `batch_size`.
"""

from __future__ import annotations

import copy
import os
from typing import Sequence

import jax
import numpy as np

from taiji_jax.cot import lm_teacher
from taiji_jax.cot import teachers as teachers_lib
from taiji_jax.models import hf_import
from taiji_jax.sidlm import rows as sid_rows
from taiji_jax.text import chat_template as chat_lib
from taiji_jax.text import pretrained_vocab

SYSTEM = ("You explain why people choose what they choose. Answer in two or "
          "three short sentences, about the person's taste, never as a list.")
RUPR_QUESTION = ("In two or three sentences, explain what in their history "
                 "made them choose it, without naming it.")
DIRECT_QUESTION = ("In two or three sentences, explain what this history says "
                   "about their taste and what kind of {noun} they will want "
                   "next.")


def describe_item(dataset, item: int) -> str:
  """"Title (year; label, label, ...)" from the item's features."""
  features = dataset.item_features
  titles = features.get(teachers_lib.TITLE_FIELD)
  name = (titles[item] if titles is not None and titles[item] else
          f"item {dataset.item_raw_ids[item]}")
  details = []
  if teachers_lib.YEAR_FIELD in features:
    year = features[teachers_lib.YEAR_FIELD][item]
    if year is not None and str(year).strip() not in ("", "0", "None"):
      details.append(str(year))
  labels = [
      label for field in teachers_lib.LABEL_FIELDS if field in features
      for label in teachers_lib.item_labels(features[field][item])
  ]
  if labels:
    details.append(", ".join(labels))
  return f"{name} ({'; '.join(details)})" if details else name


def user_message(dataset,
                 user: int,
                 history: Sequence[int],
                 target: int | None,
                 noun: str = "item") -> str:
  """The user turn of the teacher's prompt (module docstring); `target`
  None is the direct variant's question."""
  profile = dataset.user_text(user) if dataset.user_features else ""
  who = f"A user ({profile})" if profile else "A user"
  lines = [f"{who} chose these {noun}s, oldest first:"]
  lines += [
      f"{j}. {describe_item(dataset, int(i))}"
      for j, i in enumerate(history, 1)
  ]
  if target is None:
    lines.append(DIRECT_QUESTION.format(noun=noun))
  else:
    lines.append(f"Next they chose: {describe_item(dataset, int(target))}.")
    lines.append(RUPR_QUESTION)
  return "\n".join(lines)


class ChatTeacher(lm_teacher.BatchedTeacher):
  """Rationales sampled from an instruct LLM; see the module docstring.

  Args:
    decoder: the checkpoint's `Decoder` (vocabulary grown to `vocab.size`).
    vocab: a vocabulary over the checkpoint's tokenizer in which the chat
      format's end-of-turn token is one id (`PretrainedVocab`).
    chat: the checkpoint's `chat_template.ChatFormat`.
    dataset: the `Dataset` (profiles, titles, years, labels).
    max_items: most recent history items shown.
    max_new_tokens: rationale budget in tokens.
    temperature: sampling temperature (> 0).
    direct: the target-blind baseline.
    batch_size: prompt rows generated at once.
    system: the system message ("" for none; some templates add their own).
    noun: what the items are called ("movie" for MovieLens).
  """

  def __init__(self,
               decoder,
               vocab,
               chat: chat_lib.ChatFormat,
               dataset,
               *,
               max_items: int = 20,
               max_new_tokens: int = 64,
               temperature: float = 0.7,
               direct: bool = False,
               batch_size: int = 16,
               system: str = SYSTEM,
               noun: str = "item"):
    stop = vocab.encode(chat.end_of_turn)
    if len(stop) != 1:
      raise ValueError(f"{chat.source}: the end-of-turn token "
                       f"{chat.end_of_turn!r} is {len(stop)} ids in this "
                       "vocabulary, not one: not the checkpoint's tokenizer.")
    super().__init__(
        decoder,
        vocab,
        stop_id=stop[0],
        max_items=max_items,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        direct=direct,
        batch_size=batch_size,
        hint="grow the checkpoint's embedding to the vocabulary "
        "(hf_import.extend_vocab)")
    self.chat, self.dataset, self.system, self.noun = (chat, dataset, system,
                                                       noun)

  def variant(self, direct: bool) -> ChatTeacher:
    """The same model and settings as the RUPR (False) or the direct (True)
    teacher, without loading the checkpoint again."""
    other = copy.copy(self)
    other.direct = bool(direct)
    return other

  def prompt_text(self, user: int, history: Sequence[int],
                  target: int | None) -> str:
    """The rendered chat prompt of one example (`target` ignored if
    direct), ending where the assistant's answer starts."""
    ds = self.dataset
    if not 1 <= int(user) <= ds.num_users:
      raise ValueError(f"user {user} out of range [1, {ds.num_users}].")
    hist = [int(i) for i in np.asarray(history) if i != 0][-self.max_items:]
    if not hist:
      raise ValueError(f"user {user}: empty history; a rationale needs at "
                       "least one item.")
    for i in hist + ([] if self.direct else [int(target)]):
      if not 1 <= i <= ds.num_items:
        raise ValueError(f"item {i} out of range [1, {ds.num_items}].")
    messages = [{"role": "system", "content": self.system}] if self.system else []
    messages.append({
        "role":
            "user",
        "content":
            user_message(ds, int(user), hist,
                         None if self.direct else int(target), self.noun)
    })
    return chat_lib.render(self.chat.template, messages)

  def prompts(self, users: Sequence[int], histories: np.ndarray,
              targets: Sequence[int] | None) -> np.ndarray:
    """(N, P) left-padded token ids of `prompt_text` for each example."""
    targets = [None] * len(users) if self.direct else list(targets)
    rows = [
        self.vocab.encode(self.prompt_text(u, h, t))
        for u, h, t in zip(users, histories, targets)
    ]
    return sid_rows.left_pad(rows, max(len(r) for r in rows),
                             self.vocab.pad_id)


def load(checkpoint: os.PathLike | str,
         dataset,
         codebook_sizes: Sequence[int],
         *,
         chat: chat_lib.ChatFormat | None = None,
         dtype=None,
         seed: int = 0,
         **kwargs) -> ChatTeacher:
  """A `ChatTeacher` over a checkpoint (a .gguf file, a
  `gguf_import.PRETRAINED` name, a Hugging Face directory).

  Args:
    checkpoint: the instruct model.
    dataset: the `Dataset`.
    codebook_sizes: the SID levels of the run, so the teacher's vocabulary
      is the one a student on the same checkpoint gets.
    chat: the chat format; None reads the checkpoint's (and refuses a
      checkpoint without one, `chat_template.from_checkpoint`).
    dtype: parameter/activation dtype (`hf_import.load_hf_checkpoint`).
    seed: the noise of the grown embedding rows (never read; see the
      module docstring).
    **kwargs: `ChatTeacher` arguments.
  """
  chat = chat or chat_lib.from_checkpoint(checkpoint)
  rows = hf_import.checkpoint_config(checkpoint).vocab_size
  vocab = pretrained_vocab.PretrainedVocab.from_checkpoint(
      checkpoint, codebook_sizes, first_free=rows)
  cfg, model = hf_import.load_hf_checkpoint(checkpoint, dtype=dtype)
  _, model = hf_import.extend_vocab(
      model, cfg, vocab.size, key=jax.random.key(seed))
  return ChatTeacher(model, vocab, chat, dataset, **kwargs)

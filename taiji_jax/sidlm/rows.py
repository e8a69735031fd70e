"""Token rows for SID-LLM fine-tuning and evaluation prompts.

Next-item task, packed the way SASRec trains: one row holds a user prefix
("<bos>User: <profile>. History:") followed by the SIDs of a window of the
user's training items, and the loss covers the SID tokens of every item
after the first, so each training interaction is a target exactly once
(windows from `data.pipeline.training_windows`) and a row of m items teaches
m - 1 next-item predictions in one forward pass:

  <bos> User: age 24; ... History: <a_3><b_1><c_9><d_0> <a_7>... <a_1>...
                                   |----- item 1 -----| |-- target 2 --| ...

With `titles` (`item_titles`), every item's SID in a row or prompt is
followed by its title tokens, context only (never in the loss):

  ... History: <a_3><b_1><c_9><d_0> Toy Story (1995)<a_7>... Heat (1995)...

Rows are left-padded with <pad> to one length, so the last token of every
row is real; the decoder masks the padding. Evaluation prompts are the same
prefix and the (up to `max_items`) most recent history items, ending where
the next SID would start, so the trie-constrained beam search continues
from the prompt's last logits.

Alignment tasks tie SID tokens to text (TIGER-style codes mean nothing to a
text model otherwise): item text -> SID and SID -> title, as
"<bos>Item: <text>. SID:<answer><a_.>..</answer><eos>" with the loss on the
answer and </answer><eos> only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from taiji_jax.data import pipeline as data_pipeline

ITEM_TO_SID_TEMPLATE = "Item: {text}. SID:"
# The seed of every fixed user sample (`fixed_users`): one sample for
# every run, seed and variant, so they are measured on the same users.
SAMPLE_SEED = 0
SID_TO_TITLE_TEMPLATE = "SID {sid} is the item:"


def fixed_users(users: np.ndarray, size: int, key: str) -> np.ndarray:
  """Mask of a fixed sample of `size` distinct users among `users` (rows
  may repeat a user; a sampled user keeps all its rows); all with size 0.

  The sample depends on the set of users and `size` only (SAMPLE_SEED),
  never on the run's seed.

  Raises:
    ValueError: size < 0 or more than the distinct users (names `key`).
  """
  users = np.asarray(users)
  distinct = np.unique(users)
  size = int(size)
  if not 0 <= size <= len(distinct):
    raise ValueError(f"{key}={size}: must be in [0, {len(distinct)}] (the "
                     "users there are; 0: all).")
  if size == 0:
    return np.ones(len(users), bool)
  chosen = np.random.default_rng(SAMPLE_SEED).choice(
      distinct, size, replace=False)
  return np.isin(users, chosen)


def user_prefixes(dataset, vocab, users: Sequence[int],
                  max_prefix: int) -> dict[int, list[int]]:
  """{user: <bos> + encoded "User: <profile>. History:"} in `max_prefix`.

  A profile too long for the budget is cut at its end; <bos> and the
  " History:" boundary into the SIDs are always kept whole, so it looks the
  same in every row.
  """
  tail = vocab.encode(" History:")
  keep = max_prefix - 1 - len(tail)
  if keep < 0:
    raise ValueError(f"max_prefix={max_prefix} cannot hold <bos> and the "
                     f"{len(tail)} tokens of ' History:'")
  out = {}
  for u in set(int(u) for u in users):
    head = vocab.encode(f"User: {dataset.user_text(u)}.") if (
        dataset.user_features) else []
    out[u] = [vocab.bos_id] + head[:keep] + tail
  return out


def item_titles(dataset, vocab, max_tokens: int) -> list[list[int]]:
  """Title tokens of every item (index = item id; [] for id 0), cut to
  `max_tokens`, each starting with a space so it reads as a new word.

  Raises:
    ValueError: the dataset has no "title" item feature.
  """
  titles = dataset.item_features.get("title")
  if titles is None:
    raise ValueError(f"dataset {dataset.name!r} has no 'title' item feature "
                     "(history titles need one); its item features: "
                     f"{sorted(dataset.item_features)}")
  out = [[]]
  for item in range(1, dataset.num_items + 1):
    title = titles[item] or ""
    out.append(vocab.encode(" " + title)[:max_tokens] if title else [])
  return out


def _item_body(items: np.ndarray, targets: np.ndarray, item_tokens: np.ndarray,
               titles: Sequence[Sequence[int]] | None):
  """Tokens and loss mask of consecutive items (SID, then title if any)."""
  levels = item_tokens.shape[1]
  if titles is None:
    return (item_tokens[items].reshape(-1).tolist(), np.repeat(targets,
                                                               levels).tolist())
  tokens, mask = [], []
  for item, target in zip(items.tolist(), targets.tolist()):
    title = list(titles[item])
    tokens += item_tokens[item].tolist() + title
    mask += [bool(target)] * levels + [False] * len(title)
  return tokens, mask


def item_width(item_tokens: np.ndarray, max_title: int = 0) -> int:
  """Most tokens one item takes in a row: its SID plus its title budget."""
  return item_tokens.shape[1] + max_title


def left_pad(rows: list[list[int]], length: int, pad_id: int) -> np.ndarray:
  """(R, length) int32: each row right-aligned after `pad_id`s.

  Raises:
    ValueError: a row longer than `length` (names the row).
  """
  out = np.full((len(rows), length), pad_id, np.int32)
  for i, row in enumerate(rows):
    if len(row) > length:
      raise ValueError(f"row {i} has {len(row)} tokens > length {length}")
    out[i, length - len(row):] = row
  return out


def next_item_rows(sequences: Sequence[np.ndarray],
                   users: Sequence[int],
                   item_tokens: np.ndarray,
                   prefixes: dict[int, list[int]],
                   max_items: int,
                   max_prefix: int,
                   pad_id: int,
                   titles: Sequence[Sequence[int]] | None = None,
                   max_title: int = 0) -> dict[str, np.ndarray]:
  """Packed training rows; see the module docstring.

  Args:
    sequences: per-user training item sequences (time order).
    users: the user id of each sequence.
    item_tokens: (num_items + 1, L) token ids of every item's SID.
    prefixes: `user_prefixes(...)`.
    max_items: window length (targets per row at most).
    max_prefix: the prefix budget in tokens (row length = max_prefix +
      (max_items + 1) * `item_width`).
    pad_id: the <pad> id.
    titles: `item_titles(...)` to follow every SID with its title, or None.
    max_title: the title budget `titles` was cut to.

  Returns:
    {"tokens": (R, T) int32, "loss_mask": (R, T) bool (True on the tokens to
    predict), "users": (R,) int32, "num_targets": int}.
  """
  levels = item_tokens.shape[1]
  rows, masks, row_users = [], [], []
  for seq, u in zip(sequences, users):
    windows = data_pipeline.training_windows([seq], max_items)
    for x, y in zip(windows["inputs"], windows["targets"]):
      real = x > 0
      first = int(np.argmax(real))
      items = np.r_[x[first:], y[-1]]
      owned = np.r_[False, y[first:] > 0]
      prefix = prefixes[int(u)]
      body, body_mask = _item_body(items, owned, item_tokens, titles)
      rows.append(list(prefix) + body)
      masks.append([False] * len(prefix) + body_mask)
      row_users.append(int(u))
  length = max_prefix + (max_items + 1) * item_width(item_tokens, max_title)
  tokens = left_pad(rows, length, pad_id)
  loss_mask = left_pad([[int(m) for m in row] for row in masks], length,
                       0).astype(bool)
  return {
      "tokens": tokens,
      "loss_mask": loss_mask,
      "users": np.asarray(row_users, np.int32),
      "num_targets": int(loss_mask.sum() // levels),
  }


def most_recent_rows(rows: dict[str, np.ndarray], per_user: int,
                     levels: int) -> dict[str, np.ndarray]:
  """The first `per_user` rows of each user in `next_item_rows`' output:
  the windows nearest the end of their training sequence (a budget that
  keeps every user and their most recent interactions); 0 keeps all.

  `num_targets` is recounted for the rows kept (`levels` SID tokens each).
  """
  if per_user <= 0:
    return rows
  users = rows["users"]
  # Rank of each row among its user's rows (rows of a user are contiguous,
  # most recent window first).
  first = np.r_[True, users[1:] != users[:-1]]
  starts = np.maximum.accumulate(np.where(first, np.arange(len(users)), 0))
  keep = np.arange(len(users)) - starts < per_user
  out = {k: v[keep] for k, v in rows.items() if k != "num_targets"}
  out["num_targets"] = int(out["loss_mask"].sum() // levels)
  return out


def prompt_rows(histories: np.ndarray,
                users: np.ndarray,
                item_tokens: np.ndarray,
                prefixes: dict[int, list[int]],
                max_items: int,
                max_prefix: int,
                pad_id: int,
                titles: Sequence[Sequence[int]] | None = None,
                max_title: int = 0) -> np.ndarray:
  """(B, max_prefix + max_items * item_width) left-padded prompts.

  Args:
    histories: (B, H) right-aligned, 0-padded item histories (the split's
      `histories`); the last `max_items` items are used.
    titles, max_title: as in `next_item_rows`.
  """
  rows = []
  for hist, u in zip(histories, users):
    items = hist[hist > 0][-max_items:]
    body, _ = _item_body(items, np.zeros(len(items), bool), item_tokens, titles)
    rows.append(list(prefixes[int(u)]) + body)
  width = item_width(item_tokens, max_title)
  return left_pad(rows, max_prefix + max_items * width, pad_id)


def alignment_rows(dataset, vocab, item_tokens: np.ndarray, kind: str,
                   length: int) -> dict[str, np.ndarray]:
  """Item text -> SID ("item_to_sid") or SID -> title ("sid_to_title") rows.

  Rows longer than `length` are cut from the middle of the text, so the
  answer and the template's end are always kept.
  """
  rows, masks = [], []
  answer = [vocab.answer_id]
  for item in range(1, dataset.num_items + 1):
    sid = item_tokens[item].tolist()
    if kind == "item_to_sid":
      prompt = vocab.encode(
          ITEM_TO_SID_TEMPLATE.format(text=dataset.item_text(item)),
          add_bos=True) + answer
      target = sid + [vocab.answer_end_id, vocab.eos_id]
    elif kind == "sid_to_title":
      title = dataset.item_features.get("title", (None,) * (item + 1))[item]
      if not title:
        continue
      sid_text = vocab.decode(sid)
      prompt = vocab.encode(
          SID_TO_TITLE_TEMPLATE.format(sid=sid_text), add_bos=True) + answer
      target = vocab.encode(" " + title) + [vocab.answer_end_id, vocab.eos_id]
    else:
      raise ValueError(f"unknown alignment task {kind!r}; known "
                       "'item_to_sid', 'sid_to_title'")
    overflow = len(prompt) + len(target) - length
    if overflow > 0:
      keep = len(prompt) - overflow
      if keep < 2:
        raise ValueError(f"alignment row of item {item}: answer of "
                         f"{len(target)} tokens does not fit length {length}")
      prompt = prompt[:1] + prompt[1 + overflow:]
    rows.append(prompt + target)
    masks.append([0] * len(prompt) + [1] * len(target))
  return {
      "tokens": left_pad(rows, length, vocab.pad_id),
      "loss_mask": left_pad(masks, length, 0).astype(bool),
  }

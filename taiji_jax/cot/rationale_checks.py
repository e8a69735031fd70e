"""Checks on teacher rationales that need no model: what a text claims.

An LLM teacher writes free text, so before ORFT (which only asks whether a
rationale makes the answer likely) each candidate is checked against the
data it was written from:

  list_like     the text is an enumerated list or echoes the prompt (a
                line starting "1." / "-", or the prompt's own phrasing)
                rather than a reason;
  names_target  the target's title appears in it (RUPR is asked not to);
  labels        the item labels (genres, categories, tags) it names, by a
                whole-word, case-insensitive match of the dataset's label
                vocabulary (a plural "s" allowed: "comedies" does not
                match "Comedy", "dramas" matches "Drama");
  off_target_labels
                named labels the target does not have. With the target
                known (RUPR) a reason for the choice that names a genre the
                item lacks is contradicted by the data as a reason (it may
                still be true of the history: the attribute teacher says
                "mostly dramas" of a user whose next film is a comedy).

`summarize` gives the rates over a set of candidates, reported beside
ORFT's acceptance so a reader can see what the teacher wrote.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from taiji_jax.cot import teachers as teachers_lib

_LIST_LINE = re.compile(r"^\s*(\d+[.)]|[-*\u2022])\s", re.MULTILINE)
_ECHO = ("chose these", "oldest first", "Next they chose")


def label_vocabulary(dataset) -> dict[str, tuple[str, ...]]:
  """{field: sorted distinct labels} of the item label fields present."""
  out = {}
  for field in teachers_lib.LABEL_FIELDS:
    if field in dataset.item_features:
      labels = {
          label for v in dataset.item_features[field][1:]
          for label in teachers_lib.item_labels(v)
      }
      out[field] = tuple(sorted(labels))
  return out


def _pattern(label: str) -> re.Pattern:
  return re.compile(r"(?<![\w-])" + re.escape(label.lower()) + r"s?(?![\w-])")


class RationaleChecker:
  """The checks of the module docstring for one dataset."""

  def __init__(self, dataset):
    self.dataset = dataset
    self.vocabulary = label_vocabulary(dataset)
    self._patterns = {(f, label): _pattern(label)
                      for f, labels in self.vocabulary.items()
                      for label in labels}
    self._titles = dataset.item_features.get(teachers_lib.TITLE_FIELD)

  def labels(self, text: str) -> tuple[tuple[str, str], ...]:
    """(field, label) pairs the text names."""
    low = text.lower()
    return tuple(key for key, p in self._patterns.items() if p.search(low))

  def check(self, text: str, target: int | None) -> dict[str, Any]:
    """The flags of one rationale (module docstring); `target` None skips
    the target ones."""
    named = self.labels(text)
    out = {
        "list_like":
            bool(_LIST_LINE.search(text)) or any(e in text for e in _ECHO),
        "labels": [label for _, label in named],
    }
    if target is not None:
      features = self.dataset.item_features
      title = self._titles[target] if self._titles is not None else ""
      out["names_target"] = bool(title) and title.lower() in text.lower()
      out["off_target_labels"] = [
          label for field, label in named
          if label not in teachers_lib.item_labels(features[field][target])
      ]
    return out

  def summarize(self, texts: Sequence[str],
                targets: Sequence[int] | None) -> dict[str, Any]:
    """Rates over candidates: empty, list-like, naming a label, and with
    targets naming the target and naming a label it lacks; mean words."""
    if targets is not None and len(targets) != len(texts):
      raise ValueError(f"{len(texts)} texts but {len(targets)} targets.")
    checks = [
        self.check(t, None if targets is None else int(targets[j]))
        for j, t in enumerate(texts)
    ]
    n = max(len(texts), 1)
    out = {
        "num": len(texts),
        "empty": sum(not t.strip() for t in texts) / n,
        "list_like": sum(c["list_like"] for c in checks) / n,
        "names_a_label": sum(bool(c["labels"]) for c in checks) / n,
        "mean_words": float(np.mean([len(t.split()) for t in texts]))
                      if texts else 0.0,
    }
    if targets is not None:
      out["names_target"] = sum(c["names_target"] for c in checks) / n
      out["off_target_label"] = sum(
          bool(c["off_target_labels"]) for c in checks) / n
    return out

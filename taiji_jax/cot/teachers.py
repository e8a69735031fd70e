"""Rationale teachers: k candidate reasons why a user picks an item next.

Taiji's RUPR (reverse-engineered user preference reasoning) shows the teacher
the user's profile, their history *and the item they actually chose next*,
and asks why they chose it; the direct-distillation baseline of the paper's
ablation asks the same teacher without the target. Every teacher implements
`Teacher.rationales(user, history_items, target_item, k, seed)`, so an LM
teacher and the attribute teacher below are interchangeable upstream of
ORFT (`cot/orft.py`).

`AttributeTeacher` reasons from the dataset itself, so it runs offline on a
CPU and every sentence it writes is checkable:

1. `facts(...)` computes what is true of the data: the target's labels
   (genres / category / tags / brand) shared with the history, with the
   number of history items per label, and its labels new to the user; the
   release year of the target against the decades of the history; the
   history items nearest to the target by cosine of `item_embeddings`; the
   user's profile (`Dataset.user_text`); the history's most frequent labels
   and decade; and the taste shift between the older and the recent half of
   the history (which label gained or lost the most share).
2. Each fact becomes a statement with a few phrasings; a candidate is 1-4
   (`max_sentences`) statements of different facts, drawn (which, in what order, which
   phrasing) by a numpy RNG seeded with (seed, user, target). With the
   target known, each candidate holds at least one statement about it.
   Candidates are distinct; their `Statement.claims` say exactly which facts
   each sentence asserts.

With `direct=True` the facts are computed with no target at all, so nothing
in a rationale can depend on it (and the RNG is seeded with target 0).

Counts are over history positions (an item chosen twice counts twice);
history item 0 is padding and is dropped.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import operator
from typing import Any, Mapping, Sequence

import numpy as np

from taiji_jax.evaluate import semantic

# One parser of label-valued features for the teacher and the metrics.
item_labels = semantic.item_labels

# Item fields read as labels, with the noun a sentence calls them by.
LABEL_FIELDS = {
    "genres": "genre",
    "category": "category",
    "categories": "category",
    "tags": "tag",
    "brand": "brand",
}
YEAR_FIELD = "year"
TITLE_FIELD = "title"
MAX_SENTENCES = 4
MAX_LABELS = 3  # most labels listed in one statement
NUM_NEIGHBOURS = 2
_TRIES_PER_CANDIDATE = 50


class Teacher(abc.ABC):
  """Writes candidate rationales for a user's next choice."""

  @abc.abstractmethod
  def rationales(self, user: int, history_items: Sequence[int],
                 target_item: int | None, k: int, seed: int) -> list[str]:
    """k rationale texts (no <think> markers), deterministic given `seed`.

    Args:
      user: internal user id.
      history_items: the user's items before the target, in time order.
      target_item: the item chosen next (ignored by direct teachers).
      k: number of candidates, >= 1.
      seed: >= 0; the same arguments give the same texts.
    """


@dataclasses.dataclass(frozen=True)
class Shift:
  """How a label's share moved from the older to the recent history half.

  Attributes:
    field: the item field the labels come from.
    older: items in the older half (the first len // 2).
    recent: items in the recent half.
    rising: (label, count in older, count in recent) of the label whose
      share grew the most, or None if none grew.
    fading: the same for the label whose share fell the most.
    steady: the label that is the unique most frequent one in both halves,
      or None.
  """
  field: str
  older: int
  recent: int
  rising: tuple[str, int, int] | None
  fading: tuple[str, int, int] | None
  steady: str | None


@dataclasses.dataclass(frozen=True)
class Facts:
  """What the data says about one (user, history, target); see module doc.

  Attributes:
    user: internal user id.
    history: the history items (padding dropped), time order.
    target: the target item, None for a direct teacher.
    profile: `Dataset.user_text(user)` ("" without user features).
    label_counts: field -> ((label, history items with it), ...), most
      frequent first (ties by label).
    target_labels: field -> the target's labels (empty without a target).
    shift: the taste shift on the first label field, None for histories
      shorter than 2 or without labels.
    years: known release years of the history items, time order.
    target_year: the target's year, or None.
    neighbours: ((history item, cosine), ...) nearest to the target by the
      item embeddings, best first; the target itself is excluded.
    recent: the last (up to) two history items, most recent last.
  """
  user: int
  history: tuple[int, ...]
  target: int | None
  profile: str
  label_counts: Mapping[str, tuple[tuple[str, int], ...]]
  target_labels: Mapping[str, tuple[str, ...]]
  shift: Shift | None
  years: tuple[int, ...]
  target_year: int | None
  neighbours: tuple[tuple[int, float], ...]
  recent: tuple[int, ...]

  def count(self, field: str, label: str) -> int:
    """History items carrying `label` in `field`."""
    return dict(self.label_counts.get(field, ())).get(label, 0)


@dataclasses.dataclass(frozen=True)
class Statement:
  """One sentence of a rationale and the facts it asserts.

  Attributes:
    kind: which fact ("shared_label", "new_label", "shared_labels",
      "dominant_labels", "shift_rising", "shift_fading", "shift_steady",
      "era", "year_span", "target_era", "target_year_span", "neighbours",
      "recent", "profile", "history_size").
    text: the sentence.
    uses_target: whether it depends on the target.
    claims: the facts asserted, e.g. {"field": "genres", "label": "Drama",
      "count": 3, "n": 8}; item ids under "items".
  """
  kind: str
  text: str
  uses_target: bool
  claims: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Rationale:
  text: str
  statements: tuple[Statement, ...]


@dataclasses.dataclass(frozen=True)
class _Entry:
  group: str  # at most one statement per group in a rationale
  kind: str
  uses_target: bool
  claims: Mapping[str, Any]
  variants: tuple[str, ...]


class AttributeTeacher(Teacher):
  """RUPR-style (or, with `direct`, target-blind) teacher over item data.

  Args:
    dataset: a `taiji_jax.data.Dataset` (or any object with its
      `item_features`, `num_items`, `num_users`, `item_raw_ids`,
      `user_features` and `user_text`).
    item_embeddings: optional (num_items + 1, D) item vectors (row 0 =
      padding), e.g. text-encoder embeddings, for content neighbours.
    direct: the direct-distillation baseline: no fact about the target.
    max_sentences: most statements in one rationale (1 gives short,
      single-fact rationales, like OneRec-Think's category template).
  """

  def __init__(self,
               dataset,
               item_embeddings: np.ndarray | None = None,
               direct: bool = False,
               max_sentences: int = MAX_SENTENCES):
    if max_sentences < 1:
      raise ValueError(f"max_sentences must be >= 1, got {max_sentences}.")
    self.dataset = dataset
    self.direct = bool(direct)
    self.max_sentences = int(max_sentences)
    features = dataset.item_features
    self.label_fields = tuple(f for f in LABEL_FIELDS if f in features)
    self._labels = {
        f: [item_labels(v) for v in features[f]] for f in self.label_fields
    }
    self._years = ([_year(v) for v in features[YEAR_FIELD]]
                   if YEAR_FIELD in features else None)
    self._titles = features.get(TITLE_FIELD)
    self._unit = None
    if item_embeddings is not None:
      emb = np.asarray(item_embeddings, np.float64)
      if emb.ndim != 2 or emb.shape[0] != dataset.num_items + 1:
        raise ValueError(f"item_embeddings must be (num_items + 1, D) = "
                         f"({dataset.num_items + 1}, D), got {emb.shape}.")
      norms = np.linalg.norm(emb, axis=1, keepdims=True)
      self._unit = emb / np.maximum(norms, 1e-12)

  # --- Facts -----------------------------------------------------------------

  def item_name(self, item: int) -> str:
    """How sentences name an item: its quoted title, else its raw id."""
    title = self._titles[item] if self._titles is not None else None
    if title:
      return f'"{title}"'
    return f"item {self.dataset.item_raw_ids[item]}"

  def labels(self, field: str, item: int) -> tuple[str, ...]:
    return self._labels[field][item]

  def year(self, item: int) -> int | None:
    return None if self._years is None else self._years[item]

  def facts(self,
            user: int,
            history_items: Sequence[int],
            target_item: int | None = None) -> Facts:
    """The facts rationales are built from (no target ones if `direct`).

    Raises:
      ValueError: a user or item id out of range, or an empty history.
    """
    user, history, target = self._check(user, history_items, target_item)
    counts = {}
    for field in self.label_fields:
      c = collections.Counter(
          label for i in history for label in self.labels(field, i))
      counts[field] = tuple(sorted(c.items(), key=lambda lc: (-lc[1], lc[0])))
    years = tuple(y for y in (self.year(i) for i in history) if y is not None)
    target_labels, target_year, neighbours = {}, None, ()
    if target is not None:
      target_labels = {f: self.labels(f, target) for f in self.label_fields}
      target_year = self.year(target)
      neighbours = self._neighbours(history, target)
    return Facts(
        user=user,
        history=history,
        target=target,
        profile=self.dataset.user_text(user)
        if self.dataset.user_features else "",
        label_counts=counts,
        target_labels=target_labels,
        shift=self._shift(history),
        years=years,
        target_year=target_year,
        neighbours=neighbours,
        recent=history[-2:])

  def _check(self, user, history_items, target_item):
    ds = self.dataset
    user = _index(user, "user")
    if not 1 <= user <= ds.num_users:
      raise ValueError(f"user {user} out of range [1, {ds.num_users}].")
    hist = np.asarray(history_items)
    if hist.ndim != 1 or (hist.size and
                          not np.issubdtype(hist.dtype, np.integer)):
      raise ValueError("history_items must be a 1-D sequence of item ids, "
                       f"got shape {hist.shape} dtype {hist.dtype}.")
    hist = hist[hist != 0]
    if hist.size == 0:
      raise ValueError(f"user {user}: empty history (after dropping 0 "
                       "padding); a rationale needs at least one item.")
    bad = hist[(hist < 1) | (hist > ds.num_items)]
    if bad.size:
      raise ValueError(f"history item {int(bad[0])} out of range "
                       f"[1, {ds.num_items}].")
    target = None
    if not self.direct:
      if target_item is None:
        raise ValueError("a RUPR teacher needs the target item (pass "
                         "direct=True for the target-blind baseline).")
      target = _index(target_item, "target_item")
      if not 1 <= target <= ds.num_items:
        raise ValueError(f"target_item {target} out of range "
                         f"[1, {ds.num_items}].")
    return user, tuple(int(i) for i in hist), target

  def _neighbours(self, history, target):
    if self._unit is None:
      return ()
    items = sorted(set(history) - {target})
    if not items:
      return ()
    cos = self._unit[items] @ self._unit[target]
    order = sorted(range(len(items)), key=lambda j: (-cos[j], items[j]))
    return tuple((items[j], float(cos[j])) for j in order[:NUM_NEIGHBOURS])

  def _shift(self, history) -> Shift | None:
    if not self.label_fields or len(history) < 2:
      return None
    field = self.label_fields[0]
    half = len(history) // 2
    parts = history[:half], history[half:]
    counts = [
        collections.Counter(l
                            for i in part
                            for l in self.labels(field, i))
        for part in parts
    ]
    labels = sorted(set(counts[0]) | set(counts[1]))
    if not labels:
      return None
    older, recent = len(parts[0]), len(parts[1])
    # Share change scaled by older * recent (exact integers); max and min
    # return the alphabetically first label among ties.
    delta = {l: counts[1][l] * older - counts[0][l] * recent for l in labels}
    up = max(labels, key=delta.get)
    down = min(labels, key=delta.get)
    tops = [_unique_top(c) for c in counts]
    return Shift(
        field=field,
        older=older,
        recent=recent,
        rising=(up, counts[0][up], counts[1][up]) if delta[up] > 0 else None,
        fading=(down, counts[0][down],
                counts[1][down]) if delta[down] < 0 else None,
        steady=tops[0] if tops[0] is not None and tops[0] == tops[1] else None)

  # --- Statements ------------------------------------------------------------

  def statement_pool(self, facts: Facts) -> list[_Entry]:
    """Every true statement of `facts`, each with its phrasings."""
    pool = []
    n = len(facts.history)
    for field in self.label_fields:
      pool += _label_entries(field, LABEL_FIELDS[field], facts, n)
    pool += _shift_entries(facts.shift)
    pool += _year_entries(facts)
    if facts.neighbours:
      items = tuple(i for i, _ in facts.neighbours)
      names = [self.item_name(i) for i in items]
      cos = [c for _, c in facts.neighbours]
      pool.append(
          _Entry("neighbours", "neighbours", True, {"items": items[:1]}, (
              f"It resembles {names[0]}, which they chose before.",
              f"By content it is closest to {names[0]} in their history.",
          )))
      if len(items) > 1:
        pool.append(
            _Entry("neighbours", "neighbours", True, {"items": items}, (
                f"By content it is closest to {names[0]} and {names[1]} "
                "from their history.",
                f"Its nearest neighbours in their history are {names[0]} "
                f"(cosine {cos[0]:.2f}) and {names[1]} (cosine "
                f"{cos[1]:.2f}).",
            )))
    last = self.item_name(facts.recent[-1])
    recent = [
        _Entry("recent", "recent", False, {"items": facts.recent[-1:]}, (
            f"Most recently they chose {last}.",
            f"Their latest pick was {last}.",
        ))
    ]
    if len(facts.recent) == 2:
      prev = self.item_name(facts.recent[0])
      recent.append(
          _Entry("recent", "recent", False, {"items": facts.recent}, (
              f"Their latest picks are {prev} and then {last}.",
              f"They most recently chose {prev}, then {last}.",
          )))
    pool += recent
    if facts.profile:
      pool.append(
          _Entry("profile", "profile", False, {"text": facts.profile}, (
              f"The user's profile reads: {facts.profile}.",
              f"About the user: {facts.profile}.",
              f"Known about the user: {facts.profile}.",
          )))
    pool.append(
        _Entry("history_size", "history_size", False, {"n": n}, (
            f"They have {_items(n)} in their history.",
            f"Their history holds {_items(n)}.",
        )))
    return pool

  def candidates(self, user: int, history_items: Sequence[int],
                 target_item: int | None, k: int, seed: int) -> list[Rationale]:
    """k distinct rationales with the statements they are made of.

    Raises:
      ValueError: bad ids, an empty history, k < 1 or seed < 0, or fewer
        than k distinct rationales exist for these facts.
    """
    k = _index(k, "k")
    seed = _index(seed, "seed")
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}.")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}.")
    facts = self.facts(user, history_items, target_item)
    pool = self.statement_pool(facts)
    rng = np.random.default_rng([seed, facts.user, facts.target or 0])
    out, seen = [], set()
    for _ in range(_TRIES_PER_CANDIDATE * k):
      rationale = _compose(pool, rng, self.max_sentences)
      if rationale.text not in seen:
        seen.add(rationale.text)
        out.append(rationale)
        if len(out) == k:
          return out
    raise ValueError(
        f"user {facts.user}, target {facts.target}: found only {len(out)} "
        f"distinct rationales, asked for k={k}; the data say too little "
        "about this history.")

  def rationales(self, user: int, history_items: Sequence[int],
                 target_item: int | None, k: int, seed: int) -> list[str]:
    return [
        r.text
        for r in self.candidates(user, history_items, target_item, k, seed)
    ]


def decade(year: int) -> int:
  return year // 10 * 10


def _year(value) -> int | None:
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value) if value > 0 else None
  return None


def _index(value, name: str) -> int:
  try:
    if isinstance(value, bool):
      raise TypeError
    return operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an integer, got {value!r}.") from None


def _unique_top(counter: collections.Counter) -> str | None:
  ranked = counter.most_common()
  if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
    return None
  return ranked[0][0]


def _items(n: int) -> str:
  return f"{n} item" if n == 1 else f"{n} items"


def _and(parts: Sequence[str]) -> str:
  return parts[0] if len(parts) == 1 else ", ".join(
      parts[:-1]) + " and " + parts[-1]


def _label_entries(field: str, noun: str, facts: Facts, n: int):
  """Shared / new labels of the target, the history's most frequent ones."""
  out = []
  g = f"{field}:"
  items = "item" if n == 1 else "items"
  labels = facts.target_labels.get(field, ())
  shared = sorted(((l, facts.count(field, l)) for l in labels),
                  key=lambda lc: (-lc[1], lc[0]))
  new = [l for l, c in shared if c == 0]
  shared = [(l, c) for l, c in shared if c > 0][:MAX_LABELS]
  for label, c in shared:
    claims = {"field": field, "label": label, "count": c, "n": n}
    out.append(
        _Entry(g + "shared", "shared_label", True, claims, (
            f"Its {noun} {label} appears in {c} of their {n} past {items}.",
            f"Like {c} of the {n} {items} they chose before, it has the {noun} "
            f"{label}.",
            f"That makes another {label} item a natural next choice: it "
            f"shares {label} with {c} of their {n} past {items}.",
        )))
  if len(shared) > 1:
    listed = _and([f"{l} ({c} of {n})" for l, c in shared])
    out.append(
        _Entry(g + "shared", "shared_labels", True, {
            "field": field,
            "labels": tuple(shared),
            "n": n
        }, (
            f"It shares {noun}s with their history: {listed}.",
            f"Its {noun}s already run through their {n} past {items}: "
            f"{listed}.",
        )))
  for label in new[:1]:
    out.append(
        _Entry(g + "new", "new_label", True, {
            "field": field,
            "label": label,
            "n": n
        }, (
            f"Its {noun} {label} is new to them: none of their {n} past "
            f"{items} has it.",
            f"It also brings {label}, a {noun} absent from all {n} {items} of "
            "their history.",
        )))
  ranked = facts.label_counts.get(field, ())
  if ranked:
    top = [(l, c) for l, c in ranked if c == ranked[0][1]][:MAX_LABELS]
    if len(top) == 1:
      (l, c), = top
      variants = (
          f"The most frequent {noun} in their history is {l} ({c} of {n} "
          "items).",
          f"{l} leads their history with {c} of {n} {items}.",
      )
    else:
      names, c = _and([l for l, _ in top]), top[0][1]
      variants = (
          f"{names} lead their history, with {c} of {n} {items} each.",
          f"Their most frequent {noun}s are {names}, {c} of {n} {items} "
          "each.")
    out.append(
        _Entry(g + "dominant", "dominant_labels", False, {
            "field": field,
            "labels": tuple(top),
            "n": n,
            "top": True
        }, variants))
    if len(ranked) > 1 and len(top) == 1:
      two = ranked[:2]
      out.append(
          _Entry(g + "dominant", "dominant_labels", False, {
              "field": field,
              "labels": tuple(two),
              "n": n,
              "top": False
          }, (f"Their history leans to {two[0][0]} ({two[0][1]} of {n}) and "
              f"{two[1][0]} ({two[1][1]} of {n}).",)))
  return out


def _shift_entries(shift: Shift | None):
  if shift is None:
    return []
  out = []
  o, r = shift.older, shift.recent
  base = {"field": shift.field, "older": o, "recent": r}
  if shift.rising:
    l, co, cr = shift.rising
    out.append(
        _Entry("shift", "shift_rising", False,
               dict(base, label=l, older_count=co, recent_count=cr), (
                   f"Their taste moved toward {l}: {cr} of the {r} most "
                   f"recent items versus {co} of the {o} earlier ones.",
                   f"Lately {l} has grown, from {co} of {o} earlier items to "
                   f"{cr} of the {r} most recent.",
               )))
  if shift.fading:
    l, co, cr = shift.fading
    out.append(
        _Entry("shift", "shift_fading", False,
               dict(base, label=l, older_count=co, recent_count=cr), (
                   f"{l} has faded, from {co} of {o} earlier items to {cr} of "
                   f"the {r} most recent.",
                   f"They moved away from {l}: {co} of the {o} earlier items "
                   f"but {cr} of the {r} recent ones.",
               )))
  if shift.steady:
    l = shift.steady
    out.append(
        _Entry("shift", "shift_steady", False, dict(base, label=l), (
            f"{l} stays the most frequent in both the earlier and the "
            "recent half of their history.",
            f"Their taste is steady: {l} leads both halves of their history.",
        )))
  return out


def _year_entries(facts: Facts):
  out = []
  years, k = facts.years, len(facts.years)
  if years:
    c = collections.Counter(decade(y) for y in years)
    d = max(c, key=lambda x: (c[x], x))
    out.append(
        _Entry("era", "era", False, {
            "decade": d,
            "count": c[d],
            "known": k
        }, (
            f"{c[d]} of their {k} past items with a known year are from the "
            f"{d}s.",
            f"Their history centres on the {d}s ({c[d]} of {k} dated items).",
        )))
    lo, hi = min(years), max(years)
    if lo < hi:
      out.append(
          _Entry("era", "year_span", False, {
              "min": lo,
              "max": hi
          }, (f"Their history spans release years {lo} to {hi}.",)))
  y = facts.target_year
  if y is not None and years:
    d = decade(y)
    same = sum(decade(x) == d for x in years)
    claims = {"year": y, "decade": d, "count": same, "known": k}
    if same:
      variants = (
          f"It is from {y}, and {same} of their {k} dated past items are also "
          f"from the {d}s.",
          f"Released in {y}, it fits the {d}s, where {same} of their {k} "
          "dated items come from.",
      )
    else:
      variants = (f"It is from {y}, while none of their {k} dated past items "
                  f"is from the {d}s.",)
    out.append(_Entry("target_era", "target_era", True, claims, variants))
    lo, hi = min(years), max(years)
    span = {"year": y, "min": lo, "max": hi}
    if lo <= y <= hi:
      text = f"Its year {y} lies within the {lo}-{hi} span of their history."
    elif y > hi:
      text = f"Its year {y} is later than anything in their history ({hi})."
    else:
      text = f"Its year {y} is earlier than anything in their history ({lo})."
    out.append(_Entry("target_era", "target_year_span", True, span, (text,)))
  return out


def _compose(pool: Sequence[_Entry],
             rng: np.random.Generator,
             max_sentences: int = MAX_SENTENCES) -> Rationale:
  """1..max_sentences statements of different groups, >= 1 about the target
  when the pool has one; random choice, order and phrasing."""
  size = int(rng.integers(1, max_sentences + 1))
  about_target = [i for i, e in enumerate(pool) if e.uses_target]
  chosen = []
  if about_target:
    chosen.append(about_target[int(rng.integers(len(about_target)))])
  groups = {pool[i].group for i in chosen}
  for i in rng.permutation(len(pool)).tolist():
    if len(chosen) >= size:
      break
    if pool[i].group not in groups:
      chosen.append(i)
      groups.add(pool[i].group)
  statements = []
  for j in rng.permutation(len(chosen)).tolist():
    e = pool[chosen[j]]
    text = e.variants[int(rng.integers(len(e.variants)))]
    text = text[:1].upper() + text[1:]
    statements.append(Statement(e.kind, text, e.uses_target, e.claims))
  return Rationale(" ".join(s.text for s in statements), tuple(statements))

"""Attribute teacher: every statement is true of the data; direct is blind."""

import collections
import re

import numpy as np
import pytest

from taiji_jax.cot import teachers
from taiji_jax.data import dataset as dataset_lib
from taiji_jax.data import load_dataset

# A MovieLens-shaped catalogue: (title, year, genres); "Zeta" has neither.
MOVIES = (
    ("Alpha", 1995, ("Comedy", "Drama")),
    ("Beta", 1997, ("Comedy",)),
    ("Gamma", 1982, ("Horror",)),
    ("Delta", 1999, ("Drama", "Romance")),
    ("Epsilon", 2001, ("Sci-Fi",)),
    ("Zeta", None, ()),
    ("Eta", 1994, ("Comedy", "Romance")),
)


def _tiny_movies():
  # User 1 sees every movie (so item ids follow MOVIES); user 2 is short.
  users = ["u1"] * len(MOVIES) + ["u2"] * 2
  items = [f"m{j}" for j in range(len(MOVIES))] + ["m2", "m0"]
  return dataset_lib.Dataset.from_interactions(
      name="tiny-movies",
      source="test",
      raw_users=users,
      raw_items=items,
      times=list(range(len(users))),
      item_table={
          f"m{j}": {
              "title": t,
              "year": y,
              "genres": g
          } for j, (t, y, g) in enumerate(MOVIES)
      },
      user_table={
          "u1": {
              "age": 31,
              "gender": "F"
          },
          "u2": {
              "age": 45,
              "gender": "M"
          }
      },
      item_fields=("title", "year", "genres"),
      user_fields=("age", "gender"))


@pytest.fixture(scope="module")
def synthetic():
  return load_dataset("synthetic", num_users=30, num_items=40, seed=1)


@pytest.fixture(scope="module")
def movies():
  return _tiny_movies()


def _embeddings(dataset, seed=0):
  return np.random.default_rng(seed).normal(size=(dataset.num_items + 1, 6))


def _labels(dataset, field, item):
  return teachers.item_labels(dataset.item_features[field][item])


def _count(dataset, field, history, label):
  return sum(label in _labels(dataset, field, i) for i in history)


def _cases(dataset, num=12):
  """(user, history, target) triples: every target after >= 1 item, from the
  end of each sequence, alternating users."""
  seqs = dataset.sequences()
  out = []
  for back in range(1, max(len(s) for s in seqs)):
    for u, seq in enumerate(seqs):
      if len(seq) - back >= 1:
        out.append((u, seq[:-back].tolist(), int(seq[-back])))
  return out[:num]


def _check_claims(dataset, emb, statement, user, history, target):
  """Recomputes the statement's claims from the raw item/user features."""
  c, kind = statement.claims, statement.kind
  column = dataset.item_features.get("year")
  years = [column[i] for i in history if column and column[i]]
  n = len(history)
  if kind in ("shared_label", "new_label"):
    assert c["label"] in _labels(dataset, c["field"], target)
    want = _count(dataset, c["field"], history, c["label"])
    assert want == (c["count"] if kind == "shared_label" else 0) and want >= 0
    assert c["n"] == n and c["label"] in statement.text
    if kind == "shared_label":
      assert re.search(rf"\b{want} of (the |their )?{n}\b", statement.text)
  elif kind == "shared_labels":
    for label, count in c["labels"]:
      assert label in _labels(dataset, c["field"], target)
      assert count == _count(dataset, c["field"], history, label) > 0
      assert f"{label} ({count} of {n})" in statement.text
  elif kind == "dominant_labels":
    every = collections.Counter(
        l for i in history for l in _labels(dataset, c["field"], i))
    ranked = sorted(every.values(), reverse=True)
    for j, (label, count) in enumerate(c["labels"]):
      assert every[label] == count
      assert count == ranked[0 if c["top"] else j]
      assert label.lower() in statement.text.lower()
  elif kind.startswith("shift_"):
    half = n // 2
    older, recent = history[:half], history[half:]
    assert (c["older"], c["recent"]) == (len(older), len(recent))
    co = _count(dataset, c["field"], older, c["label"])
    cr = _count(dataset, c["field"], recent, c["label"])
    if kind == "shift_steady":
      for part in (older, recent):
        counts = collections.Counter(
            l for i in part for l in _labels(dataset, c["field"], i))
        top = counts.most_common()
        assert top[0][0] == c["label"] and (len(top) == 1 or
                                            top[1][1] < top[0][1])
    else:
      assert (co, cr) == (c["older_count"], c["recent_count"])
      up = cr * len(older) - co * len(recent)
      assert up > 0 if kind == "shift_rising" else up < 0
      assert f"{cr} of" in statement.text and f"{co} of" in statement.text
  elif kind == "era":
    same = sum(y // 10 * 10 == c["decade"] for y in years)
    assert same == c["count"] and c["known"] == len(years)
    assert all(
        sum(y // 10 == d
            for y in years) <= same
        for d in {y // 10 for y in years})
  elif kind == "year_span":
    assert (c["min"], c["max"]) == (min(years), max(years))
  elif kind in ("target_era", "target_year_span"):
    assert c["year"] == dataset.item_features["year"][target]
    assert str(c["year"]) in statement.text
    if kind == "target_era":
      assert c["count"] == sum(y // 10 == c["year"] // 10 for y in years)
  elif kind == "neighbours":
    cand = sorted(set(history) - {target})
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = unit[cand] @ unit[target]
    best = [cand[j] for j in np.argsort(-cos, kind="stable")]
    assert list(c["items"]) == best[:len(c["items"])]
  elif kind == "recent":
    assert list(c["items"]) == history[-len(c["items"]):]
  elif kind == "profile":
    assert c["text"] == dataset.user_text(user) and c["text"] in statement.text
  elif kind == "history_size":
    assert c["n"] == n and str(n) in statement.text
  else:
    raise AssertionError(f"unknown statement kind {kind}")


def _check_text(dataset, text, user, history, items_allowed):
  """No label, quoted title or year in the text that the data do not hold."""
  titles = dataset.item_features.get("title")
  quoted = re.findall(r'"([^"]+)"', text)
  assert {q for q in quoted} <= {titles[i] for i in items_allowed}
  bare = re.sub(r'"[^"]+"', " ", text).lower()
  profile = dataset.user_text(user).lower()
  allowed = {
      l.lower() for f in teachers.LABEL_FIELDS if f in dataset.item_features
      for i in items_allowed
      for l in _labels(dataset, f, i)
  }
  every = {
      l.lower() for f in teachers.LABEL_FIELDS if f in dataset.item_features
      for i in range(1, dataset.num_items + 1)
      for l in _labels(dataset, f, i)
  }
  for label in every - allowed:
    if re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", bare):
      assert label in profile, (label, text)
  years = dataset.item_features.get("year")
  known = {str(years[i]) for i in items_allowed} if years else set()
  for number in re.findall(r"\b(1[89]\d\d|20\d\d)\b", bare):
    assert number in known, (number, text)


@pytest.mark.parametrize("name", ["synthetic", "movies"])
def test_every_statement_is_true_of_the_data(name, synthetic, movies):
  dataset = {"synthetic": synthetic, "movies": movies}[name]
  emb = _embeddings(dataset)
  teacher = teachers.AttributeTeacher(dataset, emb)
  kinds = collections.Counter()
  for user, history, target in _cases(dataset):
    for seed in (0, 1):
      cands = teacher.candidates(user, history, target, 4, seed)
      assert len(cands) == 4
      for cand in cands:
        assert 1 <= len(cand.statements) <= teachers.MAX_SENTENCES
        assert cand.text == " ".join(s.text for s in cand.statements)
        assert any(s.uses_target for s in cand.statements)
        for s in cand.statements:
          _check_claims(dataset, emb, s, user, history, target)
          kinds[s.kind] += 1
        _check_text(dataset, cand.text, user, history, set(history) | {target})
  # The checks above ran over the target-dependent kinds, not just filler.
  assert {"shared_label", "neighbours", "dominant_labels"} <= set(kinds)
  if name == "movies":
    assert {"target_era", "target_year_span", "era", "year_span"} <= set(kinds)


def test_hand_example_counts(movies):
  teacher = teachers.AttributeTeacher(movies)
  # History Alpha, Beta, Gamma, Delta (ids 1-4); target Eta (Comedy, Romance,
  # 1994).
  facts = teacher.facts(1, [1, 2, 3, 4], 7)
  assert dict(facts.label_counts["genres"]) == {
      "Comedy": 2,
      "Drama": 2,
      "Horror": 1,
      "Romance": 1
  }
  assert facts.target_labels["genres"] == ("Comedy", "Romance")
  assert facts.years == (1995, 1997, 1982, 1999) and facts.target_year == 1994
  # Older half Alpha, Beta (Comedy 2, Drama 1); recent Gamma, Delta.
  assert facts.shift.rising == ("Horror", 0, 1)
  assert facts.shift.fading == ("Comedy", 2, 0)
  assert facts.shift.steady is None
  assert facts.profile == "age: 31; gender: F"
  texts = {
      s.text
      for c in teacher.candidates(1, [1, 2, 3, 4], 7, 12, 0)
      for s in c.statements
  }
  assert any("Comedy (2 of 4) and Romance (1 of 4)" in t for t in texts), texts


def test_candidates_differ_and_are_deterministic(synthetic):
  teacher = teachers.AttributeTeacher(synthetic, _embeddings(synthetic))
  user, history, target = _cases(synthetic)[0]
  first = teacher.rationales(user, history, target, 6, seed=3)
  assert len(set(first)) == 6
  assert teacher.rationales(user, history, target, 6, seed=3) == first
  assert teacher.rationales(user, history, target, 6, seed=4) != first
  # The RNG is keyed by the target too.
  other = next(i for i in range(1, synthetic.num_items + 1) if i != target)
  assert teacher.rationales(user, history, other, 6, seed=3) != first


def test_direct_mode_never_uses_the_target(movies, synthetic):
  for dataset in (movies, synthetic):
    emb = _embeddings(dataset)
    direct = teachers.AttributeTeacher(dataset, emb, direct=True)
    rupr = teachers.AttributeTeacher(dataset, emb)
    titles = dataset.item_features["title"]
    for user, history, target in _cases(dataset):
      cands = direct.candidates(user, history, target, 4, 0)
      assert direct.facts(user, history, target).target is None
      for cand in cands:
        assert not any(s.uses_target for s in cand.statements)
        for s in cand.statements:
          _check_claims(dataset, emb, s, user, history, target)
        _check_text(dataset, cand.text, user, history, set(history))
        if titles[target] not in {titles[i] for i in history}:
          assert titles[target] not in cand.text
      # Blind: any other target (or none) gives the same texts.
      texts = [c.text for c in cands]
      assert direct.rationales(user, history, None, 4, 0) == texts
      assert direct.rationales(user, history, 1, 4, 0) == texts
      assert rupr.rationales(user, history, target, 4, 0) != texts
  # Tiny catalogue: the target Epsilon (Sci-Fi, 2001) is nowhere in the text.
  text = " ".join(
      teachers.AttributeTeacher(movies,
                                direct=True).rationales(1, [1, 2, 3, 4], 5, 8,
                                                        0))
  assert "Epsilon" not in text and "Sci-Fi" not in text and "2001" not in text
  with pytest.raises(ValueError, match="needs the target"):
    teachers.AttributeTeacher(movies).rationales(1, [1, 2], None, 2, 0)


def test_bad_input_is_a_clear_error(movies):
  teacher = teachers.AttributeTeacher(movies)
  with pytest.raises(ValueError, match="empty history"):
    teacher.rationales(1, [], 3, 2, 0)
  with pytest.raises(ValueError, match="empty history"):
    teacher.rationales(1, [0, 0], 3, 2, 0)
  with pytest.raises(ValueError, match="target_item 8 out of range"):
    teacher.rationales(1, [1, 2], 8, 2, 0)
  with pytest.raises(ValueError, match="target_item 0 out of range"):
    teacher.rationales(1, [1, 2], 0, 2, 0)
  with pytest.raises(ValueError, match="history item 9 out of range"):
    teacher.rationales(1, [1, 9], 3, 2, 0)
  with pytest.raises(ValueError, match="user 3 out of range"):
    teacher.rationales(3, [1, 2], 3, 2, 0)
  with pytest.raises(ValueError, match="k must be >= 1"):
    teacher.rationales(1, [1, 2], 3, 0, 0)
  with pytest.raises(ValueError, match="seed must be >= 0"):
    teacher.rationales(1, [1, 2], 3, 2, -1)
  with pytest.raises(ValueError, match="item_embeddings must be"):
    teachers.AttributeTeacher(movies, np.zeros((3, 4)))
  # Item 6 (Zeta) has no year and no genres: little to say, so a large k
  # cannot be met with distinct texts.
  with pytest.raises(ValueError, match="distinct rationales"):
    teachers.AttributeTeacher(
        movies, direct=True).rationales(2, [6], None, 200, 0)
  # 0 padding on the left of a split history is dropped.
  assert teacher.rationales(1, [0, 0, 1, 2], 3, 2,
                            0) == teacher.rationales(1, [1, 2], 3, 2, 0)


def test_max_sentences_bounds_every_candidate(synthetic):
  emb = _embeddings(synthetic)
  for direct in (False, True):
    teacher = teachers.AttributeTeacher(
        synthetic, emb, direct=direct, max_sentences=1)
    for user, history, target in _cases(synthetic, 6):
      for r in teacher.candidates(user, history, target, 2, seed=0):
        assert len(r.statements) == 1
        # A RUPR rationale of one sentence is a fact about the target.
        assert r.statements[0].uses_target == (not direct)
  longer = teachers.AttributeTeacher(synthetic, emb, max_sentences=3)
  sizes = {
      len(r.statements) for u, h, t in _cases(synthetic, 6)
      for r in longer.candidates(u, h, t, 3, seed=0)
  }
  assert max(sizes) <= 3 and len(sizes) > 1
  with pytest.raises(ValueError, match="max_sentences"):
    teachers.AttributeTeacher(synthetic, emb, max_sentences=0)

"""A synthetic dataset with planted sequential and textual structure.

`make_synthetic` generates interactions that a sequential recommender can
learn and that tests can check against the known truth:

* Items are split into `num_clusters` near-equal clusters at random. Each
  cluster has a genre-like name ("mystery", "scifi", ...) and a vocabulary;
  an item's title is two words of its cluster's vocabulary plus its number,
  its `category` is the cluster name and its `tags` are three more words.
* The items of a cluster lie on a ring, in increasing order of their number
  (the digits of the raw id "i0042"). A user walks along the ring of their
  current cluster, stepping 1, 2 or 3 places ahead with probabilities
  `STEP_PROBS`; with probability `drift` per step they instead switch to
  another cluster, drawn from a fixed Markov chain without self-loops, and
  land on a random item of it (with one cluster, a switch is a jump to a
  random item of the same cluster).
* Each user has an age group, which sets a preference over clusters, and a
  favourite cluster drawn from it, where their walk starts
  (`favorite_category`).
* Timestamps strictly increase along each user's sequence; different users
  may share timestamps. There are no ratings (NaN).

The data go through `Dataset.from_interactions` like any loaded dataset, so
ids are remapped by first appearance; `item_cluster` and `ring_successor`
recover the planted truth from the item features and raw ids. Generated items
that no user happens to visit are not in the catalogue (counted in the
report as `metadata_items_without_interactions`).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from taiji_jax.data import dataset as dataset_lib

# Genre-like cluster names with their title/tag vocabularies. Cluster k is
# named GENRES[k % 12], suffixed "-2", "-3", ... after the first twelve.
GENRES = (
    ("mystery", ("clue", "detective", "shadow", "cipher", "alibi", "secret",
                 "midnight", "suspect")),
    ("romance", ("heart", "kiss", "letter", "summer", "promise", "wedding",
                 "rose", "moonlight")),
    ("scifi", ("galaxy", "robot", "quantum", "starship", "nebula", "android",
               "orbit", "signal")),
    ("western", ("canyon", "saddle", "outlaw", "frontier", "sheriff", "dust",
                 "mustang", "ranch")),
    ("horror", ("haunted", "crypt", "scream", "specter", "curse", "fog",
                "raven", "cellar")),
    ("comedy", ("prank", "banter", "hiccup", "blunder", "giggle", "pickle",
                "caper", "mishap")),
    ("fantasy", ("dragon", "wizard", "rune", "kingdom", "elixir", "quest",
                 "sorcery", "griffin")),
    ("documentary", ("archive", "witness", "history", "expedition", "record",
                     "census", "voyage", "survey")),
    ("thriller", ("chase", "conspiracy", "hostage", "pursuit", "agent", "fuse",
                  "deadline", "ransom")),
    ("animation", ("doodle", "sketch", "toon", "bubble", "sprite", "rainbow",
                   "puppet", "pixel")),
    ("musical", ("chorus", "melody", "rhythm", "encore", "ballad", "overture",
                 "tempo", "duet")),
    ("war", ("battalion", "trench", "siege", "armistice", "convoy", "frontline",
             "medal", "flank")),
)
AGE_GROUPS = ("18-24", "25-34", "35-44", "45-54", "55+")
# Probabilities of stepping 1, 2 or 3 places ahead on the ring.
STEP_PROBS = (0.8, 0.15, 0.05)
ITEM_FIELDS = ("title", "category", "tags")
USER_FIELDS = ("age_group", "favorite_category")
START_TIME = 1_600_000_000  # 2020-09-13, seconds.


def cluster_name(cluster: int) -> str:
  """Name of planted cluster `cluster` (0-based)."""
  base = GENRES[cluster % len(GENRES)][0]
  rounds = cluster // len(GENRES)
  return base if rounds == 0 else f"{base}-{rounds + 1}"


def cluster_index(name: str) -> int:
  """Inverse of `cluster_name`."""
  base, _, suffix = name.partition("-")
  bases = [g[0] for g in GENRES]
  rounds = int(suffix) - 1 if suffix.isdigit() else 0
  index = rounds * len(GENRES) + bases.index(base) if base in bases else -1
  if index < 0 or cluster_name(index) != name:
    raise ValueError(f"not a synthetic cluster name: {name!r}.")
  return index


def make_synthetic(num_users: int = 200,
                   num_items: int = 300,
                   num_clusters: int = 6,
                   min_len: int = 8,
                   max_len: int = 40,
                   drift: float = 0.15,
                   seed: int = 0) -> dataset_lib.Dataset:
  """Generates the dataset described in the module docstring.

  Args:
    num_users: number of users (each gets one sequence).
    num_items: number of generated items (1 <= num_clusters <= num_items).
    num_clusters: number of planted clusters.
    min_len: shortest sequence (>= 3, so every user has a test target).
    max_len: longest sequence (>= min_len); lengths are uniform in between.
    drift: probability per step of switching to another cluster, in [0, 1].
    seed: seed of the numpy Generator; equal arguments give equal datasets.

  Returns:
    The dataset, named "synthetic".

  Raises:
    ValueError: an argument out of range (the message names it).
  """
  args = {
      "num_users": num_users,
      "num_items": num_items,
      "num_clusters": num_clusters,
      "min_len": min_len,
      "max_len": max_len,
      "drift": drift,
      "seed": seed,
  }
  _validate(args)
  rng = np.random.default_rng(seed)

  # Items: a random partition into near-equal clusters; each ring is in
  # increasing item number.
  rings = [
      np.sort(part)
      for part in np.array_split(rng.permutation(num_items), num_clusters)
  ]
  item_table = {}
  for c, ring in enumerate(rings):
    vocabulary = GENRES[c % len(GENRES)][1]
    for number in ring:
      words = rng.choice(len(vocabulary), size=5, replace=False)
      title_words = " ".join(vocabulary[w].capitalize() for w in words[:2])
      item_table[_item_id(number)] = {
          "title": f"{title_words} {number}",
          "category": cluster_name(c),
          "tags": tuple(vocabulary[w] for w in sorted(words[2:])),
      }

  # Cluster switches: a fixed Markov chain without self-loops.
  transitions = np.zeros((num_clusters, num_clusters))
  for c in range(num_clusters):
    others = [d for d in range(num_clusters) if d != c] or [c]
    transitions[c, others] = rng.dirichlet(np.full(len(others), 0.5))
  age_preferences = rng.dirichlet(np.ones(num_clusters), size=len(AGE_GROUPS))

  users, items, times = [], [], []
  user_table = {}
  switches = 0
  for u in range(num_users):
    user = f"u{u + 1:05d}"
    age = int(rng.integers(len(AGE_GROUPS)))
    cluster = int(rng.choice(num_clusters, p=age_preferences[age]))
    user_table[user] = {
        "age_group": AGE_GROUPS[age],
        "favorite_category": cluster_name(cluster),
    }
    length = int(rng.integers(min_len, max_len + 1))
    position = int(rng.integers(len(rings[cluster])))
    switch = rng.random(length) < drift
    steps = 1 + rng.choice(len(STEP_PROBS), size=length, p=STEP_PROBS)
    gaps = rng.integers(3600, 3 * 86400, size=length)
    gaps[0] = rng.integers(365 * 86400)
    for step, time in enumerate(START_TIME + np.cumsum(gaps)):
      if step > 0 and switch[step]:
        switches += 1
        cluster = int(rng.choice(num_clusters, p=transitions[cluster]))
        position = int(rng.integers(len(rings[cluster])))
      elif step > 0:
        position += int(steps[step])
      ring = rings[cluster]
      users.append(user)
      items.append(_item_id(ring[position % len(ring)]))
      times.append(int(time))

  arguments = ", ".join(f"{k}={v!r}" for k, v in args.items())
  return dataset_lib.Dataset.from_interactions(
      name="synthetic",
      source=f"generated: make_synthetic({arguments})",
      raw_users=users,
      raw_items=items,
      times=times,
      item_table=item_table,
      user_table=user_table,
      item_fields=ITEM_FIELDS,
      user_fields=USER_FIELDS,
      report={
          "items_generated": num_items,
          "users_generated": num_users,
          "interactions_generated": len(items),
          "cluster_switches": switches,
      })


def item_cluster(dataset: dataset_lib.Dataset) -> np.ndarray:
  """(num_items + 1,) int32 planted cluster of each item; -1 at padding."""
  return np.asarray(
      [-1] + [cluster_index(c) for c in dataset.item_features["category"][1:]],
      np.int32)


def ring_successor(dataset: dataset_lib.Dataset) -> np.ndarray:
  """(num_items + 1,) int32 next item on each item's ring; 0 at padding.

  Rings are restricted to the items in the catalogue: an item nobody visited
  is skipped over.
  """
  clusters = item_cluster(dataset)
  numbers = np.asarray(
      [-1] + [int(raw[1:]) for raw in dataset.item_raw_ids[1:]], np.int64)
  successor = np.zeros(dataset.num_items + 1, np.int32)
  for c in np.unique(clusters[1:]):
    members = np.flatnonzero(clusters == c)
    ring = members[np.argsort(numbers[members])]
    successor[ring] = np.roll(ring, -1)
  return successor


def _item_id(number: int) -> str:
  return f"i{int(number):05d}"


def _validate(args: dict[str, Any]) -> None:
  """Raises ValueError naming the first argument that is out of range."""
  for key in ("num_users", "num_items", "num_clusters", "min_len", "max_len",
              "seed"):
    value = args[key]
    try:
      if isinstance(value, bool):
        raise TypeError
      operator.index(value)
    except TypeError:
      raise ValueError(
          f"make_synthetic: {key} must be an integer, got {value!r}.") from None
  checks = (
      ("num_users", args["num_users"] >= 1, ">= 1"),
      ("num_items", args["num_items"] >= 1, ">= 1"),
      ("num_clusters", 1 <= args["num_clusters"] <= args["num_items"],
       f"in [1, num_items={args['num_items']}]"),
      ("min_len", args["min_len"] >= 3, ">= 3"),
      ("max_len", args["max_len"]
       >= args["min_len"], f">= min_len={args['min_len']}"),
      ("seed", args["seed"] >= 0, ">= 0"),
  )
  for key, ok, requirement in checks:
    if not ok:
      raise ValueError(f"make_synthetic: {key} must be {requirement}, got "
                       f"{args[key]!r}.")
  drift = args["drift"]
  if (isinstance(drift, bool) or not isinstance(drift,
                                                (int, float, np.number)) or
      not 0.0 <= drift <= 1.0):
    raise ValueError(
        f"make_synthetic: drift must be a number in [0, 1], got {drift!r}.")

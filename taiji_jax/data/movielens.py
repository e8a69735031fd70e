"""MovieLens-100k and MovieLens-1M loaders.

ml-100k is read from either layout of the same data:
  * GroupLens raw files: `u.data` (user, item, rating, timestamp; tabs),
    `u.item` (24 `|`-separated fields, latin-1: id, title "Name (Year)",
    release date, video date, URL, 19 genre flags) and `u.user`
    (id|age|gender|occupation|zip);
  * RecBole atomic files: `ml-100k.inter`, `ml-100k.item`, `ml-100k.user`
    (tab-separated with typed headers), as shipped in the `recbole==1.2.1`
    wheel under `recbole/dataset_example/ml-100k/`.
ml-1m reads the GroupLens `ratings.dat`, `movies.dat`, `users.dat`
(`::`-separated, latin-1).

Both give items the fields title (without the "(Year)" suffix), year and
genres, and users age, gender, occupation (and zip code). Placeholder values
in the source ("unknown", RecBole's misspelt "unkonwn") become missing values
and are counted in `Dataset.report`, as is the one RecBole item whose year
was mangled into its title; any other malformed value is an error.
"""

from __future__ import annotations

import os
import re

from taiji_jax.data import dataset as dataset_lib
from taiji_jax.data import fetch
from taiji_jax.data import parsing

ML100K_RAW = ("u.data", "u.item", "u.user")
ML100K_ATOMIC = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
ML1M_RAW = ("ratings.dat", "movies.dat", "users.dat")

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
RECBOLE_WHEEL = "recbole==1.2.1"
# Measured on the recbole-1.2.1-py3-none-any.whl served by PyPI.
RECBOLE_WHEEL_SHA256 = (
    "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407")
ML100K_ATOMIC_SHA256 = {
    "ml-100k.inter":
        "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item":
        "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user":
        "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}

GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's",
               "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
               "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
               "Thriller", "War", "Western")
AGES_1M = {
    1: "Under 18",
    18: "18-24",
    25: "25-34",
    35: "35-44",
    45: "45-49",
    50: "50-55",
    56: "56+"
}
OCCUPATIONS_1M = ("other", "academic/educator", "artist", "clerical/admin",
                  "college/grad student", "customer service",
                  "doctor/health care", "executive/managerial", "farmer",
                  "homemaker", "K-12 student", "lawyer", "programmer",
                  "retired", "sales/marketing", "scientist", "self-employed",
                  "technician/engineer", "tradesman/craftsman", "unemployed",
                  "writer")
# Bump when parsing changes, so parsed copies in the cache are redone.
PARSER_VERSION = "movielens-1"
_PLACEHOLDERS = ("", "unknown", "unkonwn")
# "Name (1995)", also "Name (1995) (V)" (video; ml-100k item 1412).
_TITLE_YEAR = re.compile(r"^(.*\S)\s+\((\d{4})\)(?:\s+\(V\))?\s*$")
ITEM_FIELDS = ("title", "year", "genres")
USER_FIELDS = ("age", "gender", "occupation", "zip_code")


def load_ml100k(root: os.PathLike | str | None = None) -> dataset_lib.Dataset:
  """Loads MovieLens-100k (see the module docstring for the layouts)."""
  sources = [
      fetch.zip_source(f"{GROUPLENS}/ml-100k.zip",
                       {f"ml-100k/{f}": f for f in ML100K_RAW}),
      fetch.pip_wheel_source(
          RECBOLE_WHEEL,
          {f"recbole/dataset_example/ml-100k/{f}": f for f in ML100K_ATOMIC},
          wheel_sha256=RECBOLE_WHEEL_SHA256),
  ]
  directory, source = fetch.resolve(
      "ml-100k", [ML100K_RAW, ML100K_ATOMIC],
      sources,
      root=root,
      pinned=ML100K_ATOMIC_SHA256)
  if all((directory / f).is_file() for f in ML100K_RAW):
    parse = lambda: _ml100k_raw(directory, source)
  else:
    parse = lambda: _ml100k_atomic(directory, source)
  return fetch.parse_cached(directory, source, parse, PARSER_VERSION)


def load_ml1m(root: os.PathLike | str | None = None) -> dataset_lib.Dataset:
  """Loads MovieLens-1M from the GroupLens `.dat` files."""
  sources = [
      fetch.zip_source(f"{GROUPLENS}/ml-1m.zip",
                       {f"ml-1m/{f}": f for f in ML1M_RAW})
  ]
  directory, source = fetch.resolve("ml-1m", ML1M_RAW, sources, root=root)
  return fetch.parse_cached(directory, source, lambda: _ml1m(directory, source),
                            PARSER_VERSION)


def _ml1m(directory, source) -> dataset_lib.Dataset:
  report = {}
  inters = _read_ratings(directory / "ratings.dat", "::")

  item_table = {}
  path = directory / "movies.dat"
  for line, (i, title, genres) in parsing.read_delimited(
      path, "::", 3, encoding="latin-1"):
    name, year = _split_title(title)
    item_table[i] = {
        "title": name,
        "year": year,
        "genres": tuple(g for g in genres.split("|") if g)
    }
  report["movies_read"] = len(item_table)

  user_table = {}
  path = directory / "users.dat"
  for line, (u, gender, age, occupation,
             zip_code) in parsing.read_delimited(path, "::", 5):
    age_code = parsing.to_int(age, path, line, "Age")
    occ_code = parsing.to_int(occupation, path, line, "Occupation")
    if age_code not in AGES_1M:
      raise parsing.DataError(f"{parsing.where(path, line)}: field 'Age' must "
                              f"be one of {sorted(AGES_1M)}, got {age!r}.")
    if not 0 <= occ_code < len(OCCUPATIONS_1M):
      raise parsing.DataError(
          f"{parsing.where(path, line)}: field 'Occupation' must be in 0.."
          f"{len(OCCUPATIONS_1M) - 1}, got {occupation!r}.")
    _check_gender(gender, path, line)
    user_table[u] = {
        "age": AGES_1M[age_code],
        "gender": gender,
        "occupation": OCCUPATIONS_1M[occ_code],
        "zip_code": zip_code
    }
  return _build("ml-1m", source, inters, item_table, user_table, report)


def _ml100k_raw(directory, source) -> dataset_lib.Dataset:
  report = {"layout": "grouplens-raw"}
  inters = _read_ratings(directory / "u.data", "\t")

  item_table = {}
  placeholders = {"title": 0, "year": 0, "genres": 0}
  path = directory / "u.item"
  for line, fields in parsing.read_delimited(
      path, "|", 5 + len(GENRES_100K), encoding="latin-1"):
    flags = fields[5:]
    if any(f not in ("0", "1") for f in flags):
      raise parsing.DataError(
          f"{parsing.where(path, line)}: genre flags must be 0/1, got "
          f"{flags!r}.")
    title, year = _split_title(fields[1])
    date = fields[2].strip()
    if year is None and date:
      # The title's year, as in RecBole's files; release dates are often
      # later (e.g. "Kolya (1996)|24-Jan-1997"; RecBole says 1996).
      year = parsing.to_int(date[-4:], path, line, "release date")
    genres = tuple(
        g for g, f in zip(GENRES_100K, flags) if f == "1" and g != "unknown")
    item_table[fields[0]] = _item_row(title, year, genres, placeholders)
  report["items_read"] = len(item_table)
  report.update({f"items_without_{k}": v for k, v in placeholders.items()})

  user_table = {}
  path = directory / "u.user"
  for line, (u, age, gender, occupation,
             zip_code) in parsing.read_delimited(path, "|", 5):
    user_table[u] = _user_row(path, line, age, gender, occupation, zip_code)
  return _build("ml-100k", source, inters, item_table, user_table, report)


def _ml100k_atomic(directory, source) -> dataset_lib.Dataset:
  report = {"layout": "recbole-atomic"}
  inters = _read_ratings(
      directory / "ml-100k.inter",
      "\t",
      header=("user_id:token", "item_id:token", "rating:float",
              "timestamp:float"))

  item_table = {}
  placeholders = {"title": 0, "year": 0, "genres": 0}
  path = directory / "ml-100k.item"
  for line, (i, title, year, genres) in parsing.read_delimited(
      path,
      "\t",
      4,
      header=("item_id:token", "movie_title:token_seq", "release_year:token",
              "class:token_seq")):
    title, title_year = _split_title(title)
    if year.strip().isdigit():
      year = int(year)
    elif title_year is not None:
      # RecBole's conversion of "Land Before Time III: ... (1995) (V)" left
      # the year "V" and the year in the title; recover it from the title.
      year = title_year
      report["items_year_from_title"] = report.get("items_year_from_title",
                                                   0) + 1
    elif year.strip().lower() in _PLACEHOLDERS:
      year = None
    else:
      year = parsing.to_int(year, path, line, "release_year")
    genres = tuple(g for g in genres.split(" ") if g and g != "unknown")
    item_table[i] = _item_row(title, year, genres, placeholders)
  report["items_read"] = len(item_table)
  report.update({f"items_without_{k}": v for k, v in placeholders.items()})

  user_table = {}
  path = directory / "ml-100k.user"
  for line, (u, age, gender, occupation, zip_code) in parsing.read_delimited(
      path,
      "\t",
      5,
      header=("user_id:token", "age:token", "gender:token", "occupation:token",
              "zip_code:token")):
    user_table[u] = _user_row(path, line, age, gender, occupation, zip_code)
  return _build("ml-100k", source, inters, item_table, user_table, report)


def _read_ratings(path, sep: str, header=None) -> dict:
  """Reads user, item, rating, timestamp rows (every MovieLens layout)."""
  users, items, times, ratings = [], [], [], []
  for line, (u, i, r, t) in parsing.read_delimited(path, sep, 4, header=header):
    users.append(u)
    items.append(i)
    ratings.append(parsing.to_float(r, path, line, "rating"))
    times.append(parsing.to_int(t, path, line, "timestamp"))
  return {
      "raw_users": users,
      "raw_items": items,
      "times": times,
      "ratings": ratings
  }


def _build(name, source, inters, item_table, user_table, report):
  report["ratings_read"] = len(inters["raw_items"])
  return dataset_lib.Dataset.from_interactions(
      name=name,
      source=source,
      item_table=item_table,
      user_table=user_table,
      item_fields=ITEM_FIELDS,
      user_fields=USER_FIELDS,
      report=report,
      **inters)


def _split_title(title: str) -> tuple[str, int | None]:
  """'Toy Story (1995)' -> ('Toy Story', 1995)."""
  match = _TITLE_YEAR.match(title)
  if match:
    return match.group(1), int(match.group(2))
  return title.strip(), None


def _item_row(title, year, genres, placeholders) -> dict:
  if title.lower() in _PLACEHOLDERS:
    title = None
  for key, value in (("title", title), ("year", year), ("genres", genres)):
    if not value:
      placeholders[key] += 1
  return {"title": title, "year": year, "genres": genres}


def _user_row(path, line, age, gender, occupation, zip_code) -> dict:
  age_value = parsing.to_int(age, path, line, "age")
  if not 0 < age_value < 130:
    raise parsing.DataError(f"{parsing.where(path, line)}: field 'age' out of "
                            f"range: {age!r}.")
  _check_gender(gender, path, line)
  return {
      "age": age_value,
      "gender": gender,
      "occupation": occupation,
      "zip_code": zip_code
  }


def _check_gender(gender, path, line):
  if gender not in ("M", "F"):
    raise parsing.DataError(f"{parsing.where(path, line)}: field 'gender' must "
                            f"be M or F, got {gender!r}.")

"""Loader for the 2014 Amazon review data (McAuley et al.), "5-core" files.

TIGER (Rajput et al., 2023) and P5 (Geng et al., 2022) evaluate on the
Beauty, Sports_and_Outdoors and Toys_and_Games categories of the 2014 release
(https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html), using the
per-category 5-core review files as they are: every user and item there
already has at least five reviews, and no further filtering is applied. Two
files per category are read, gzipped or plain (`.json`):

* `reviews_<Category>_5.json.gz`: one strict-JSON object per line with
  reviewerID, asin, overall (float rating), unixReviewTime (int seconds, at
  day resolution, so a user's reviews often tie), plus reviewerName,
  helpful, reviewText, summary and reviewTime, which are ignored.
* `meta_<Category>.json.gz`: one Python-literal dict per line (written with
  `repr`, hence single quotes) with asin and optional title, price (float),
  brand, categories (list of category paths, each a list of str), salesRank,
  imUrl and related; only asin, title, brand, categories and price are used.

Reviews keep their file order and go to `Dataset.from_interactions`, which
remaps ids by first appearance and sorts by (user, time) with ties in file
order. Items get the fields title, brand, categories (the *first* category
path as a tuple, e.g. ('Beauty', 'Skin Care', 'Face'), whose levels are the
L1/L2/L3 categories) and price; values absent from the metadata are None.
Any malformed line, missing required key or non-numeric value is a
`parsing.DataError` naming the file and line.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

from taiji_jax.data import dataset as dataset_lib
from taiji_jax.data import fetch
from taiji_jax.data import parsing

# Short names accepted by `load_amazon`; any other name is used verbatim.
ALIASES = {
    "beauty": "Beauty",
    "sports": "Sports_and_Outdoors",
    "toys": "Toys_and_Games",
}
SNAP_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
REVIEW_KEYS = ("reviewerID", "asin", "overall", "unixReviewTime")
ITEM_FIELDS = ("title", "brand", "categories", "price")
# Bump when parsing changes, so parsed copies in the cache are redone.
PARSER_VERSION = "amazon-1"


def file_category(category: str) -> str:
  """Returns the category as spelt in file names ('beauty' -> 'Beauty')."""
  return ALIASES.get(category, category)


def file_names(category: str) -> tuple[str, str]:
  """Returns the gzipped (reviews, metadata) file names of a category."""
  name = file_category(category)
  return f"reviews_{name}_5.json.gz", f"meta_{name}.json.gz"


def load_amazon(category: str,
                root: os.PathLike | str | None = None) -> dataset_lib.Dataset:
  """Loads one category of the 2014 Amazon 5-core data.

  Files are looked up as described in `fetch.resolve`, under the dataset
  directory name `amazon-<Category>` (the file-name spelling, so that
  aliases share one cache); gzipped files are preferred over plain `.json`
  ones when both are present.

  Args:
    category: an alias from `ALIASES` ("beauty", "sports", "toys") or the
      exact file-name category, e.g. "Clothing_Shoes_and_Jewelry".
    root: directory holding the two files (skips cache and download).

  Returns:
    The dataset, named `amazon-<category as given>`.

  Raises:
    DataError: the files are missing, or a line is malformed.
  """
  if not category or any(c in category for c in "/\\" + os.sep):
    raise parsing.DataError(
        f"amazon: invalid category {category!r}; expected one of "
        f"{sorted(ALIASES)} or a file-name category such as 'Beauty'.")
  name = file_category(category)
  reviews_gz, meta_gz = file_names(category)
  reviews_plain, meta_plain = reviews_gz[:-3], meta_gz[:-3]
  layouts = [[reviews, meta]
             for reviews in (reviews_gz, reviews_plain)
             for meta in (meta_gz, meta_plain)]
  source = fetch.file_source({
      reviews_gz: f"{SNAP_URL}/{reviews_gz}",
      meta_gz: f"{SNAP_URL}/{meta_gz}",
  })
  directory, description = fetch.resolve(
      f"amazon-{name}", layouts, [source], root=root)
  reviews_path = _first_present(directory, (reviews_gz, reviews_plain))
  meta_path = _first_present(directory, (meta_gz, meta_plain))
  description = f"{description}: {reviews_path.name}, {meta_path.name}"
  # Parsing the metadata's Python literals takes minutes for a category;
  # files in the cache are parsed once (see fetch.parse_cached).
  return fetch.parse_cached(
      directory, description,
      lambda: _parse(category, description, reviews_path, meta_path),
      PARSER_VERSION)


def _parse(category: str, description: str, reviews_path: pathlib.Path,
           meta_path: pathlib.Path) -> dataset_lib.Dataset:
  """Reads the reviews and metadata files into a Dataset."""

  report: dict[str, Any] = {}
  users, items, times, ratings = [], [], [], []
  for line, record in parsing.read_json_lines(reviews_path, REVIEW_KEYS):
    users.append(_raw_id(record, "reviewerID", reviews_path, line))
    items.append(_raw_id(record, "asin", reviews_path, line))
    ratings.append(
        parsing.to_float(record["overall"], reviews_path, line, "overall"))
    times.append(
        parsing.to_int(record["unixReviewTime"], reviews_path, line,
                       "unixReviewTime"))
  report["reviews_read"] = len(items)

  item_table: dict[str, dict[str, Any]] = {}
  lines_read = duplicates = 0
  for line, record in parsing.read_json_lines(meta_path, ("asin",)):
    lines_read += 1
    asin = _raw_id(record, "asin", meta_path, line)
    if asin in item_table:
      duplicates += 1  # The first row of an asin wins.
      continue
    item_table[asin] = _item_row(record, meta_path, line)
  catalogue = set(items)
  used = catalogue.intersection(item_table)
  report["metadata_lines_read"] = lines_read
  report["metadata_duplicate_asins"] = duplicates
  report["metadata_items_used"] = len(used)
  for field in ITEM_FIELDS:
    report[f"items_without_{field}"] = len(catalogue) - sum(
        item_table[i][field] is not None for i in used)

  return dataset_lib.Dataset.from_interactions(
      name=f"amazon-{category}",
      source=description,
      raw_users=users,
      raw_items=items,
      times=times,
      ratings=ratings,
      item_table=item_table,
      item_fields=ITEM_FIELDS,
      report=report)


def _first_present(directory: pathlib.Path,
                   names: Sequence[str]) -> pathlib.Path:
  for name in names:
    if (directory / name).is_file():
      return directory / name
  raise parsing.DataError(f"{directory}: none of {list(names)} is present.")


def _raw_id(record: dict[str, Any], key: str, path: pathlib.Path,
            line: int) -> str:
  value = record[key]
  if not isinstance(value, str) or not value.strip():
    raise parsing.DataError(f"{parsing.where(path, line)}: field {key!r} must "
                            f"be a non-empty string, got {value!r}.")
  return value


def _optional_text(record: dict[str, Any], key: str, path: pathlib.Path,
                   line: int) -> str | None:
  value = record.get(key)
  if value is None:
    return None
  if not isinstance(value, str):
    raise parsing.DataError(f"{parsing.where(path, line)}: field {key!r} must "
                            f"be a string, got {value!r}.")
  return value.strip() or None


def _item_row(record: dict[str, Any], path: pathlib.Path,
              line: int) -> dict[str, Any]:
  """Title, brand, first category path and price of one metadata record."""
  paths = record.get("categories")
  if paths is not None and not (isinstance(paths, list) and all(
      isinstance(p, list) and all(isinstance(c, str)
                                  for c in p)
      for p in paths)):
    raise parsing.DataError(
        f"{parsing.where(path, line)}: field 'categories' must be a list of "
        f"lists of strings, got {paths!r}.")
  first = tuple(c.strip() for c in paths[0] if c.strip()) if paths else ()
  price = record.get("price")
  if price is not None:
    price = parsing.to_float(price, path, line, "price")
  return {
      "title": _optional_text(record, "title", path, line),
      "brand": _optional_text(record, "brand", path, line),
      "categories": first or None,
      "price": price,
  }

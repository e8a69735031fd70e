"""Tests of the Amazon 2014 5-core loader on format-exact fixture files."""

import gzip
import json
import pathlib

import numpy as np
import pytest

from taiji_jax.data import amazon
from taiji_jax.data import fetch
from taiji_jax.data import parsing


def _review(user, asin, overall, unix_time):
  """One review exactly as the 2014 5-core files write it (key order too)."""
  return {
      "reviewerID": user,
      "asin": asin,
      "reviewerName": f"Name of {user}",
      "helpful": [1, 2],
      "reviewText": "Works as \"advertised\"; I'd buy it again.\nTwice.",
      "overall": overall,
      "summary": "Nice",
      "unixReviewTime": unix_time,
      "reviewTime": "01 30, 2014",
  }


# File order. A1 reviews B3 before B1/B2 in time; B1 and B2 tie.
REVIEWS = [
    _review("A1", "B1", 5.0, 1391040000),
    _review("A2", "B2", 4.0, 1300000000),
    _review("A1", "B3", 3.0, 1200000000),
    _review("A1", "B2", 2.0, 1391040000),
    _review("A3", "B4", 1.0, 1250000000),  # B4 has no metadata.
    _review("A2", "B1", 5.0, 1290000000),
]
META = [
    {
        "asin": "B1",
        "title": "Men's Face Wash",  # repr writes this in double quotes.
        "price": 12.5,
        "imUrl": "http://ecx.images-amazon.com/images/I/1.jpg",
        "related": {
            "also_bought": ["B2", "B9"],
            "bought_together": ["B2"]
        },
        "salesRank": {
            "Beauty": 12
        },
        "brand": "Acme",
        "categories": [["Beauty", "Skin Care", "Face"], ["Beauty", "Men"]],
    },
    {
        "asin": "B2",
        "title": "Lip Balm",
        "salesRank": {
            "Beauty": 7
        },
        "categories": [["Beauty", "Makeup", "Lips"]],
    },
    {
        "asin": "B9",
        "title": "Never Reviewed",
        "categories": [["Beauty"]]
    },
    {
        "asin": "B3",
        "price": 3.0,
        "brand": "Zed",
        "categories": [["Beauty", "Hair Care"]],
    },
]


def _write(path, lines, compress=None):
  data = "".join(line + "\n" for line in lines).encode("utf-8")
  if compress if compress is not None else path.name.endswith(".gz"):
    data = gzip.compress(data)
  path.write_bytes(data)
  return path


def _fixture(root, category="Beauty", gz=True, reviews=None, meta=None):
  suffix = ".json.gz" if gz else ".json"
  root.mkdir(parents=True, exist_ok=True)
  reviews_path = _write(
      root / f"reviews_{category}_5{suffix}",
      [json.dumps(r) for r in REVIEWS] if reviews is None else reviews)
  meta_path = _write(root / f"meta_{category}{suffix}",
                     [repr(m) for m in META] if meta is None else meta)
  return reviews_path, meta_path


def test_loads_counts_and_report(tmp_path):
  _fixture(tmp_path)
  data = amazon.load_amazon("Beauty", root=tmp_path)
  assert data.name == "amazon-Beauty"
  assert "reviews_Beauty_5.json.gz" in data.source
  assert (data.num_users, data.num_items, data.num_interactions) == (3, 4, 6)
  report = data.report
  assert report["reviews_read"] == 6
  assert report["metadata_lines_read"] == 4
  assert report["metadata_items_used"] == 3
  assert report["metadata_duplicate_asins"] == 0
  assert report["items_without_metadata"] == 1  # B4.
  assert report["metadata_items_without_interactions"] == 1  # B9.
  assert report["items_without_title"] == 2  # B3, B4.
  assert report["items_without_brand"] == 2  # B2, B4.
  assert report["items_without_categories"] == 1  # B4.
  assert report["items_without_price"] == 2  # B2, B4.
  assert report["duplicate_user_item_interactions"] == 0


def test_ids_by_first_appearance_and_stable_time_order(tmp_path):
  _fixture(tmp_path)
  data = amazon.load_amazon("Beauty", root=tmp_path)
  assert list(data.user_raw_ids) == ["[PAD]", "A1", "A2", "A3"]
  assert list(data.item_raw_ids) == ["[PAD]", "B1", "B2", "B3", "B4"]
  seqs = data.sequences()
  # A1: B3 (earliest), then the tie B1, B2 in file order.
  np.testing.assert_array_equal(seqs[1], [3, 1, 2])
  np.testing.assert_array_equal(seqs[2], [1, 2])  # A2: B1 is earlier.
  np.testing.assert_array_equal(seqs[3], [4])
  np.testing.assert_array_equal(data.inter_users, [1, 1, 1, 2, 2, 3])
  np.testing.assert_array_equal(
      data.inter_times,
      [1200000000, 1391040000, 1391040000, 1290000000, 1300000000, 1250000000])
  np.testing.assert_array_equal(data.inter_ratings, [3, 5, 2, 5, 4, 1])
  for u in range(1, 4):
    times = data.inter_times[data.inter_users == u]
    assert np.all(np.diff(times) >= 0)


def test_item_features_and_text(tmp_path):
  _fixture(tmp_path)
  data = amazon.load_amazon("Beauty", root=tmp_path)
  features = data.item_features
  assert tuple(features) == ("title", "brand", "categories", "price")
  assert features["title"][1] == "Men's Face Wash"
  assert features["categories"][1] == ("Beauty", "Skin Care", "Face")
  assert features["price"][1] == 12.5
  assert features["brand"][2] is None and features["price"][2] is None
  assert features["title"][3] is None
  assert all(features[f][4] is None for f in features)
  text = data.item_text(1)
  for part in ("Men's Face Wash", "Acme", "Beauty, Skin Care, Face", "12.5"):
    assert part in text
  assert "Men" not in data.item_text(1).split("Face Wash")[1]  # First path.
  assert data.item_text(3) == ("brand: Zed; categories: Beauty, Hair Care; "
                               "price: 3.0")
  assert data.item_text(4) == ""


@pytest.mark.parametrize("category, file_category", [
    ("beauty", "Beauty"),
    ("sports", "Sports_and_Outdoors"),
    ("toys", "Toys_and_Games"),
    ("Clothing_Shoes_and_Jewelry", "Clothing_Shoes_and_Jewelry"),
])
def test_category_aliases(tmp_path, category, file_category):
  assert amazon.file_category(category) == file_category
  _fixture(tmp_path, category=file_category)
  data = amazon.load_amazon(category, root=tmp_path)
  assert data.name == f"amazon-{category}"
  assert data.num_interactions == 6


def test_category_is_case_sensitive(tmp_path):
  _fixture(tmp_path)
  with pytest.raises(parsing.DataError, match="reviews_BEAUTY_5.json.gz"):
    amazon.load_amazon("BEAUTY", root=tmp_path)
  with pytest.raises(parsing.DataError, match="invalid category"):
    amazon.load_amazon("", root=tmp_path)


def test_plain_json_accepted(tmp_path):
  _fixture(tmp_path / "gz")
  _fixture(tmp_path / "plain", gz=False)
  gz = amazon.load_amazon("beauty", root=tmp_path / "gz")
  plain = amazon.load_amazon("beauty", root=tmp_path / "plain")
  assert "reviews_Beauty_5.json," in plain.source
  for field in ("inter_users", "inter_items", "inter_times", "inter_ratings",
                "item_raw_ids", "user_raw_ids"):
    np.testing.assert_array_equal(getattr(gz, field), getattr(plain, field))
  assert gz.item_features == plain.item_features
  assert gz.report == plain.report


def test_mixed_compression_accepted_and_gzip_preferred(tmp_path):
  reviews, _ = _fixture(tmp_path, gz=False)
  _write(tmp_path / "reviews_Beauty_5.json.gz",
         [json.dumps(r) for r in REVIEWS[:2]])
  data = amazon.load_amazon("beauty", root=tmp_path)
  assert data.source.endswith(": reviews_Beauty_5.json.gz, meta_Beauty.json")
  assert data.report["reviews_read"] == 2
  (tmp_path / "reviews_Beauty_5.json.gz").unlink()
  assert amazon.load_amazon("beauty", root=tmp_path).report["reviews_read"] == 6


def test_data_dir_and_download_source(tmp_path, monkeypatch):
  monkeypatch.setenv("TAIJI_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("TAIJI_DATA_DIR", str(tmp_path / "data"))
  _fixture(
      tmp_path / "data" / "amazon-Toys_and_Games", category="Toys_and_Games")
  assert amazon.load_amazon("toys").num_interactions == 6

  urls = []

  def offline(url, dest, timeout=60.0):
    del dest, timeout
    urls.append(url)
    raise OSError("offline")

  monkeypatch.setattr(fetch, "download", offline)
  with pytest.raises(parsing.DataError, match="Could not obtain"):
    amazon.load_amazon("sports")
  assert urls == [f"{amazon.SNAP_URL}/reviews_Sports_and_Outdoors_5.json.gz"]
  assert amazon.SNAP_URL == (
      "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles")


def _lines(records):
  return [json.dumps(r) for r in records]


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("reviews, expected", [
    (_lines(REVIEWS[:2]) + ['{"reviewerID": "A1", "asin": "B1", "overa'],
     r"reviews_Beauty_5\.json(\.gz)?:3: not a JSON/Python record"),
    (_lines(REVIEWS[:1]) + _lines([{
        k: v for k, v in REVIEWS[1].items() if k != "asin"
    }]), r"reviews_Beauty_5\.json(\.gz)?:2: missing required key 'asin'"),
    (_lines(REVIEWS[:3]) + _lines([dict(REVIEWS[3], unixReviewTime="soon")]),
     r"reviews_Beauty_5\.json(\.gz)?:4: field 'unixReviewTime' must be an "
     r"integer, got 'soon'"),
    (_lines([dict(REVIEWS[0], overall="five")]),
     r"reviews_Beauty_5\.json(\.gz)?:1: field 'overall' must be a number, "
     r"got 'five'"),
    (_lines([dict(REVIEWS[0], reviewerID=7)]),
     r"reviews_Beauty_5\.json(\.gz)?:1: field 'reviewerID' must be a "
     r"non-empty string, got 7"),
    (_lines(REVIEWS[:1]) + ["[1, 2]"],
     r"reviews_Beauty_5\.json(\.gz)?:2: expected an object"),
    (["", ""], r"reviews_Beauty_5\.json(\.gz)?: no records found"),
])
def test_bad_reviews(tmp_path, gz, reviews, expected):
  _fixture(tmp_path, gz=gz, reviews=reviews)
  with pytest.raises(parsing.DataError, match=expected):
    amazon.load_amazon("beauty", root=tmp_path)


@pytest.mark.parametrize("meta, expected", [
    ([repr(META[0]), "{'asin': 'B2', 'title': 'Lip"
     ], r"meta_Beauty\.json\.gz:2: not a JSON/Python record"),
    ([repr({"title": "No asin"})
     ], r"meta_Beauty\.json\.gz:1: missing required key 'asin'"),
    ([repr(dict(META[0], categories=["Beauty", "Face"]))
     ], r"meta_Beauty\.json\.gz:1: field 'categories' must be a list of lists"),
    ([repr(dict(META[0], price="cheap"))],
     r"meta_Beauty\.json\.gz:1: field 'price' must be a number, got 'cheap'"),
    ([repr(dict(META[0], title=["x"]))
     ], r"meta_Beauty\.json\.gz:1: field 'title' must be a string"),
])
def test_bad_metadata(tmp_path, meta, expected):
  _fixture(tmp_path, meta=meta)
  with pytest.raises(parsing.DataError, match=expected):
    amazon.load_amazon("beauty", root=tmp_path)


def test_duplicate_metadata_first_row_wins(tmp_path):
  meta = [repr(m) for m in META] + [repr(dict(META[0], title="Other"))]
  _fixture(tmp_path, meta=meta)
  data = amazon.load_amazon("beauty", root=tmp_path)
  assert data.report["metadata_duplicate_asins"] == 1
  assert data.item_features["title"][1] == "Men's Face Wash"


@pytest.mark.parametrize("name",
                         ["reviews_Beauty_5.json.gz", "meta_Beauty.json.gz"])
def test_empty_file(tmp_path, name):
  _fixture(tmp_path)
  (tmp_path / name).write_bytes(b"")
  with pytest.raises(parsing.DataError, match=f"{name}: file is empty"):
    amazon.load_amazon("beauty", root=tmp_path)


def test_empty_gzip_member(tmp_path):
  _fixture(tmp_path)
  (tmp_path / "meta_Beauty.json.gz").write_bytes(gzip.compress(b""))
  with pytest.raises(
      parsing.DataError, match=r"meta_Beauty\.json\.gz: no records found"):
    amazon.load_amazon("beauty", root=tmp_path)


@pytest.mark.parametrize("name",
                         ["reviews_Beauty_5.json.gz", "meta_Beauty.json.gz"])
def test_truncated_gzip(tmp_path, name):
  _fixture(tmp_path)
  path = tmp_path / name
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(
      parsing.DataError,
      match=rf"{name}: cannot read past line \d+ \(EOFError"):
    amazon.load_amazon("beauty", root=tmp_path)


def test_truncated_plain_json(tmp_path):
  reviews, _ = _fixture(tmp_path, gz=False)
  data = reviews.read_bytes()
  reviews.write_bytes(data[:len(data) - 30])
  with pytest.raises(
      parsing.DataError,
      match=r"reviews_Beauty_5\.json:6: not a JSON/Python "
      r"record"):
    amazon.load_amazon("beauty", root=tmp_path)


def test_not_gzip(tmp_path):
  _fixture(tmp_path)
  path = tmp_path / "reviews_Beauty_5.json.gz"
  path.write_bytes(gzip.decompress(path.read_bytes()))
  with pytest.raises(
      parsing.DataError,
      match=r"reviews_Beauty_5\.json\.gz: cannot read past "
      r"line 0 \(BadGzipFile"):
    amazon.load_amazon("beauty", root=tmp_path)


def test_fixture_matches_the_2014_format(tmp_path):
  """Guards the fixtures: strict JSON reviews, Python-repr metadata."""
  reviews, meta = _fixture(tmp_path)
  first_review = gzip.decompress(reviews.read_bytes()).decode().splitlines()[0]
  assert first_review.startswith('{"reviewerID": "A1", "asin": "B1", ')
  first_meta = gzip.decompress(meta.read_bytes()).decode().splitlines()[0]
  assert first_meta.startswith("{'asin': 'B1', 'title': \"Men's Face Wash\"")
  assert "'categories': [['Beauty', 'Skin Care', 'Face']" in first_meta
  with pytest.raises(json.JSONDecodeError):
    json.loads(first_meta)
  assert pathlib.Path(meta).name == "meta_Beauty.json.gz"

"""Tests of the MovieLens loaders on format-exact fixture files."""

import pathlib

import numpy as np
import pytest

from taiji_jax import data as data_lib
from taiji_jax.data import dataset as dataset_lib
from taiji_jax.data import movielens
from taiji_jax.data import parsing

PAD = dataset_lib.PAD_RAW_ID
URL = "http://us.imdb.com/M/title-exact?"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
  """No test may reach the user's cache or data directory."""
  monkeypatch.setenv("TAIJI_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.delenv("TAIJI_DATA_DIR", raising=False)


def _write(path, lines, encoding="utf-8"):
  path.write_bytes("".join(line + "\n" for line in lines).encode(encoding))


def _flags(*genres):
  assert set(genres) <= set(movielens.GENRES_100K)
  return "|".join("1" if g in genres else "0" for g in movielens.GENRES_100K)


# File order. User 196 rates 377 before 242/267 in time, and 242/267 tie;
# user 186's 302 and 242 tie (file order 302 first, though 242 has the
# smaller internal id); user 22 rates 1412 before 377.
U_DATA = [
    "196\t242\t3\t881250949",
    "186\t302\t3\t891717742",
    "196\t377\t1\t878887116",
    "22\t377\t1\t878887116",
    "186\t242\t4\t891717742",
    "196\t267\t2\t881250949",
    "22\t1412\t5\t878887000",
    "244\t543\t2\t880606923",
]
U_ITEM = [
    f"242|Kolya (1996)|24-Jan-1997||{URL}Kolya%20(1996)|" + _flags("Comedy"),
    f"302|L.A. Confidential (1997)|01-Jan-1997||{URL}L%2EA%2E%20Confidential"
    "%20(1997)|" + _flags("Crime", "Film-Noir", "Mystery", "Thriller"),
    f"377|Heavyweights (1994)|01-Jan-1994||{URL}Heavyweights%20(1994)|" +
    _flags("Children's", "Comedy"),
    "267|unknown||||" + _flags("unknown"),
    "1412|Land Before Time III: The Time of the Great Giving (1995) (V)|"
    f"01-Jan-1995||{URL}Land%20Before%20Time%20III%3A%20The%20Time%20of%20"
    "the%20Great%20Giving%20(1995)%20(V)|" + _flags("Animation", "Children's"),
    f"543|Misérables, Les (1995)|01-Jan-1995||{URL}Mis%E9rables%2C%20Les%20"
    "%281995%29|" + _flags("Drama", "Musical"),
    # In the catalogue but never rated.
    f"1682|Scream of Stone (Schrei aus Stein) (1991)|08-Mar-1996||{URL}"
    "Schrei%20aus%20Stein%20(1991)|" + _flags("Drama"),
]
U_USER = [
    "22|25|M|writer|40206",
    "186|39|F|executive|00000",
    "196|49|M|writer|55105",
    "244|28|M|technician|80525",
    "999|30|F|other|12345",  # No interactions.
]
ATOMIC_INTER = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"
               ] + U_DATA
ATOMIC_ITEM = [
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
    "242\tKolya\t1996\tComedy",
    "302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller",
    "377\tHeavyweights\t1994\tChildren's Comedy",
    "267\tunkonwn\tunkonwn\tunknown",
    "1412\tLand Before Time III: The Time of the Great Giving (1995)\tV\t"
    "Animation Children's",
    "543\tMisérables, Les\t1995\tDrama Musical",
    "1682\tScream of Stone (Schrei aus Stein)\t1991\tDrama",
]
ATOMIC_USER = [
    "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"
] + [line.replace("|", "\t") for line in U_USER]

# What both layouts must give.
USER_RAW = [PAD, "196", "186", "22", "244"]
ITEM_RAW = [PAD, "242", "302", "377", "267", "1412", "543"]
INTER_USERS = [1, 1, 1, 2, 2, 3, 3, 4]
INTER_ITEMS = [3, 1, 4, 2, 1, 5, 3, 6]
INTER_TIMES = [
    878887116, 881250949, 881250949, 891717742, 891717742, 878887000, 878887116,
    880606923
]
INTER_RATINGS = [1, 3, 2, 3, 4, 5, 1, 2]
TITLES = (None, "Kolya", "L.A. Confidential", "Heavyweights", None,
          "Land Before Time III: The Time of the Great Giving",
          "Misérables, Les")
YEARS = (None, 1996, 1997, 1994, None, 1995, 1995)
GENRES = (None, ("Comedy",), ("Crime", "Film-Noir", "Mystery", "Thriller"),
          ("Children's", "Comedy"), (), ("Animation",
                                         "Children's"), ("Drama", "Musical"))


def _raw_dir(root: pathlib.Path) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  _write(root / "u.data", U_DATA)
  _write(root / "u.item", U_ITEM, encoding="latin-1")
  _write(root / "u.user", U_USER)
  return root


def _atomic_dir(root: pathlib.Path) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  _write(root / "ml-100k.inter", ATOMIC_INTER)
  _write(root / "ml-100k.item", ATOMIC_ITEM)
  _write(root / "ml-100k.user", ATOMIC_USER)
  return root


def test_genre_order_is_the_grouplens_order():
  assert movielens.GENRES_100K == ("unknown", "Action", "Adventure",
                                   "Animation", "Children's", "Comedy", "Crime",
                                   "Documentary", "Drama", "Fantasy",
                                   "Film-Noir", "Horror", "Musical", "Mystery",
                                   "Romance", "Sci-Fi", "Thriller", "War",
                                   "Western")
  assert len(U_ITEM[0].split("|")) == 24


def test_fixture_is_latin1_encoded(tmp_path):
  root = _raw_dir(tmp_path / "raw")
  data = (root / "u.item").read_bytes()
  assert "Misérables".encode("latin-1") in data
  with pytest.raises(UnicodeDecodeError):
    data.decode("utf-8")


@pytest.mark.parametrize("layout", ["raw", "atomic"])
def test_ml100k_interactions_and_ids(tmp_path, layout):
  make = _raw_dir if layout == "raw" else _atomic_dir
  ds = movielens.load_ml100k(make(tmp_path / layout))
  assert ds.name == "ml-100k"
  assert ds.source == f"local directory {tmp_path / layout}"
  assert list(ds.user_raw_ids) == USER_RAW
  assert list(ds.item_raw_ids) == ITEM_RAW
  np.testing.assert_array_equal(ds.inter_users, INTER_USERS)
  np.testing.assert_array_equal(ds.inter_items, INTER_ITEMS)
  np.testing.assert_array_equal(ds.inter_times, INTER_TIMES)
  np.testing.assert_array_equal(ds.inter_ratings, INTER_RATINGS)
  assert ds.inter_users.dtype == np.int32
  assert ds.inter_items.dtype == np.int32
  assert ds.inter_times.dtype == np.int64
  assert ds.inter_ratings.dtype == np.float32
  assert [list(s) for s in ds.sequences()] == [[], [3, 1, 4], [2, 1], [5, 3],
                                               [6]]
  assert (ds.num_users, ds.num_items, ds.num_interactions) == (4, 6, 8)


@pytest.mark.parametrize("layout", ["raw", "atomic"])
def test_ml100k_item_and_user_features(tmp_path, layout):
  make = _raw_dir if layout == "raw" else _atomic_dir
  ds = movielens.load_ml100k(make(tmp_path / layout))
  assert tuple(ds.item_features) == ("title", "year", "genres")
  assert ds.item_features["title"] == TITLES
  assert ds.item_features["year"] == YEARS
  assert ds.item_features["genres"] == GENRES
  assert tuple(ds.user_features) == ("age", "gender", "occupation", "zip_code")
  assert ds.user_features["age"] == (None, 49, 39, 25, 28)
  assert ds.user_features["gender"] == (None, "M", "F", "M", "M")
  assert ds.user_features["occupation"] == (None, "writer", "executive",
                                            "writer", "technician")
  # Zip codes stay strings (leading zeros kept).
  assert ds.user_features["zip_code"] == (None, "55105", "00000", "40206",
                                          "80525")
  assert ds.item_text(1) == "title: Kolya; year: 1996; genres: Comedy"
  assert ds.item_text(2) == ("title: L.A. Confidential; year: 1997; genres: "
                             "Crime, Film-Noir, Mystery, Thriller")
  assert ds.item_text(4) == ""  # The placeholder item has nothing.
  assert ds.item_text(5) == (
      "title: Land Before Time III: The Time of the Great Giving; year: 1995;"
      " genres: Animation, Children's")
  assert ds.item_text(6) == ("title: Misérables, Les; year: 1995; genres: "
                             "Drama, Musical")
  assert ds.user_text(1) == ("age: 49; gender: M; occupation: writer; "
                             "zip code: 55105")
  assert ds.user_text(2) == ("age: 39; gender: F; occupation: executive; "
                             "zip code: 00000")


def test_ml100k_layouts_agree(tmp_path):
  raw = movielens.load_ml100k(_raw_dir(tmp_path / "raw"))
  atomic = movielens.load_ml100k(_atomic_dir(tmp_path / "atomic"))
  for field in ("user_raw_ids", "item_raw_ids", "inter_users", "inter_items",
                "inter_times", "inter_ratings"):
    np.testing.assert_array_equal(getattr(raw, field), getattr(atomic, field))
  assert raw.item_features == atomic.item_features
  assert raw.user_features == atomic.user_features
  assert [raw.item_text(i) for i in range(7)
         ] == [atomic.item_text(i) for i in range(7)]


def test_ml100k_raw_year_is_the_title_year(tmp_path):
  """Release dates are often later; RecBole's year is the title's."""
  root = _raw_dir(tmp_path)
  ds = movielens.load_ml100k(root)
  assert ds.item_features["year"][1] == 1996  # "Kolya (1996)|24-Jan-1997".
  # Without a year in the title, the release date's year is used.
  _write(
      root / "u.item",
      ["242|Kolya|24-Jan-1997||url|" + _flags("Comedy")] + U_ITEM[1:],
      encoding="latin-1")
  ds = movielens.load_ml100k(root)
  assert ds.item_features["title"][1] == "Kolya"
  assert ds.item_features["year"][1] == 1997


def test_ml100k_reports(tmp_path):
  raw = movielens.load_ml100k(_raw_dir(tmp_path / "raw"))
  atomic = movielens.load_ml100k(_atomic_dir(tmp_path / "atomic"))
  common = {
      "ratings_read": 8,
      "items_read": 7,
      "items_without_title": 1,
      "items_without_year": 1,
      "items_without_genres": 1,
      "items_without_metadata": 0,
      "metadata_items_without_interactions": 1,
      "users_without_profile": 0,
      "profiles_without_interactions": 1,
      "duplicate_user_item_interactions": 0,
  }
  assert dict(raw.report) == dict(common, layout="grouplens-raw")
  assert dict(atomic.report) == dict(
      common, layout="recbole-atomic", items_year_from_title=1)


def test_ml100k_prefers_raw_layout_when_both_present(tmp_path):
  root = _atomic_dir(_raw_dir(tmp_path))
  _write(root / "ml-100k.inter", ["broken"])  # Would fail if it were read.
  assert movielens.load_ml100k(root).report["layout"] == "grouplens-raw"


def test_ml100k_counts_duplicates_and_missing_metadata(tmp_path):
  root = _raw_dir(tmp_path)
  _write(root / "u.data",
         U_DATA + ["196\t242\t5\t891000000", "7\t9999\t1\t891000001"])
  ds = movielens.load_ml100k(root)
  assert ds.report["duplicate_user_item_interactions"] == 1
  assert ds.report["items_without_metadata"] == 1
  assert ds.report["users_without_profile"] == 1
  assert ds.item_features["title"][-1] is None
  assert ds.user_features["age"][-1] is None
  assert list(ds.item_raw_ids[-1:]) == ["9999"]


def test_load_dataset_dispatches(tmp_path):
  ds = data_lib.load_dataset("ml-100k", root=_raw_dir(tmp_path))
  assert ds.name == "ml-100k" and ds.num_interactions == 8
  with pytest.raises(data_lib.DataError, match="no extra arguments"):
    data_lib.load_dataset("ml-100k", root=tmp_path, seed=1)


# ml-1m: users 1..5 cover age codes 1, 56, 25, 45, 18 and occupations 10,
# 16, 15, 20, 0. User 1's 1193 and 914 tie in time.
RATINGS_DAT = [
    "1::1193::5::978300760",
    "1::661::3::978302109",
    "2::1193::4::978298413",
    "1::914::3::978300760",
    "3::3408::4::978300275",
    "3::73::2::978300100",
    "4::3408::2::978300000",
    "5::661::1::978300000",
]
MOVIES_DAT = [
    "1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
    "661::James and the Giant Peach (1996)::Animation|Children's|Musical",
    "914::My Fair Lady (1964)::Musical|Romance",
    "3408::Erin Brockovich (2000)::Drama",
    "73::Misérables, Les (1995)::Drama|Musical",
]
USERS_DAT = [
    "1::F::1::10::48067",
    "2::M::56::16::70072",
    "3::M::25::15::55117",
    "4::F::45::20::02460",
    "5::M::18::0::55455",
]


def _ml1m_dir(root: pathlib.Path) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  _write(root / "ratings.dat", RATINGS_DAT)
  _write(root / "movies.dat", MOVIES_DAT, encoding="latin-1")
  _write(root / "users.dat", USERS_DAT)
  return root


def test_ml1m_loads(tmp_path):
  ds = data_lib.load_dataset("ml-1m", root=_ml1m_dir(tmp_path))
  assert ds.name == "ml-1m"
  assert list(ds.user_raw_ids) == [PAD, "1", "2", "3", "4", "5"]
  assert list(ds.item_raw_ids) == [PAD, "1193", "661", "914", "3408", "73"]
  np.testing.assert_array_equal(ds.inter_users, [1, 1, 1, 2, 3, 3, 4, 5])
  np.testing.assert_array_equal(ds.inter_items, [1, 3, 2, 1, 5, 4, 4, 2])
  np.testing.assert_array_equal(ds.inter_times, [
      978300760, 978300760, 978302109, 978298413, 978300100, 978300275,
      978300000, 978300000
  ])
  np.testing.assert_array_equal(ds.inter_ratings, [5, 3, 3, 4, 2, 4, 2, 1])
  assert ds.item_features["title"] == (None, "One Flew Over the Cuckoo's Nest",
                                       "James and the Giant Peach",
                                       "My Fair Lady", "Erin Brockovich",
                                       "Misérables, Les")
  assert ds.item_features["year"] == (None, 1975, 1996, 1964, 2000, 1995)
  assert ds.item_features["genres"][2] == ("Animation", "Children's", "Musical")
  assert ds.report["ratings_read"] == 8
  assert ds.report["movies_read"] == 5


def test_ml1m_decodes_age_and_occupation(tmp_path):
  ds = movielens.load_ml1m(_ml1m_dir(tmp_path))
  assert ds.user_features["age"] == (None, "Under 18", "56+", "25-34", "45-49",
                                     "18-24")
  assert ds.user_features["occupation"] == (None, "K-12 student",
                                            "self-employed", "scientist",
                                            "writer", "other")
  assert ds.user_features["gender"] == (None, "F", "M", "M", "F", "M")
  assert ds.user_features["zip_code"][4] == "02460"
  assert ds.user_text(1) == ("age: Under 18; gender: F; occupation: K-12 "
                             "student; zip code: 48067")
  assert set(movielens.AGES_1M) == {1, 18, 25, 35, 45, 50, 56}
  assert len(movielens.OCCUPATIONS_1M) == 21


@pytest.mark.parametrize("line, expected", [
    ("2::M::30::16::70072", "'Age' must be one of"),
    ("2::M::56::21::70072", "'Occupation' must be in 0..20"),
    ("2::M::56::x::70072", "'Occupation' must be an integer, got 'x'"),
    ("2::m::56::16::70072", "'gender' must be M or F, got 'm'"),
])
def test_ml1m_bad_users(tmp_path, line, expected):
  root = _ml1m_dir(tmp_path)
  _write(root / "users.dat", [USERS_DAT[0], line] + USERS_DAT[2:])
  with pytest.raises(parsing.DataError) as e:
    movielens.load_ml1m(root)
  assert f"{root / 'users.dat'}:2" in str(e.value)
  assert expected in str(e.value)


def _replace(lines, index, line):
  lines = list(lines)
  lines[index] = line
  return lines


# (layout, file, lines, text that must be in the message besides the path).
BAD_INPUTS = {
    "wrong_field_count": ("raw", "u.data", _replace(U_DATA, 2, "196\t377\t1"),
                          ":3: expected 4 fields"),
    "wrong_field_count_item": ("raw", "u.item",
                               _replace(U_ITEM, 1, "302|L.A. (1997)|x"),
                               ":2: expected 24 fields"),
    "bad_genre_flag": ("raw", "u.item", _replace(U_ITEM, 0,
                                                 U_ITEM[0][:-1] + "2"),
                       ":1: genre flags must be 0/1"),
    "missing_atomic_column":
        ("atomic", "ml-100k.inter",
         _replace(ATOMIC_INTER, 0, "user_id:token\titem_id:token\t"
                  "timestamp:float"), ":1: header"),
    "untyped_atomic_header":
        ("atomic", "ml-100k.user",
         _replace(ATOMIC_USER, 0,
                  "user_id\tage\tgender\toccupation\tzip_code"), ":1: header"),
    "header_only":
        ("atomic", "ml-100k.item", ATOMIC_ITEM[:1], "found 0 data rows"),
    "non_numeric_timestamp": ("raw", "u.data",
                              _replace(U_DATA, 1, "186\t302\t3\t89171x742"),
                              ":2: field 'timestamp' must be an integer, got "
                              "'89171x742'"),
    "fractional_timestamp": ("atomic", "ml-100k.inter",
                             _replace(ATOMIC_INTER, 3, "196\t377\t1\t8.5"),
                             ":4: field 'timestamp' must be an integer"),
    "non_numeric_rating": ("raw", "u.data",
                           _replace(U_DATA, 0, "196\t242\tgood\t881250949"),
                           ":1: field 'rating' must be a number"),
    "bad_year": ("atomic", "ml-100k.item",
                 _replace(ATOMIC_ITEM, 1, "242\tKolya\t19x6\tComedy"),
                 ":2: field 'release_year' must be an integer, got '19x6'"),
    "bad_gender": ("raw", "u.user", _replace(U_USER, 1, "186|39|W|x|0"),
                   ":2: field 'gender' must be M or F, got 'W'"),
    "bad_gender_atomic": ("atomic", "ml-100k.user",
                          _replace(ATOMIC_USER, 1, "22\t25\t\twriter\t40206"),
                          ":2: field 'gender' must be M or F, got ''"),
    "bad_age": ("raw", "u.user", _replace(U_USER, 0, "22|0|M|writer|40206"),
                ":1: field 'age' out of range: '0'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_ml100k_bad_input(tmp_path, case):
  layout, name, lines, expected = BAD_INPUTS[case]
  root = (_raw_dir if layout == "raw" else _atomic_dir)(tmp_path)
  _write(
      root / name, lines, encoding="latin-1" if name == "u.item" else "utf-8")
  with pytest.raises(parsing.DataError) as e:
    movielens.load_ml100k(root)
  assert str(root / name) in str(e.value)
  assert expected in str(e.value)


@pytest.mark.parametrize("name", ["u.data", "u.item", "u.user"])
def test_ml100k_empty_file(tmp_path, name):
  root = _raw_dir(tmp_path)
  (root / name).write_bytes(b"")
  with pytest.raises(parsing.DataError, match="file is empty") as e:
    movielens.load_ml100k(root)
  assert str(root / name) in str(e.value)


@pytest.mark.parametrize(
    "cut, expected",
    [
        # Cut inside the last field: the field count is still right, only the
        # missing newline shows the truncation.
        ("244\t543\t2\t88060",
         "last line '244\\t543\\t2\\t88060' has no newline"),
        ("244\t54", ":8: expected 4 fields"),
    ])
def test_ml100k_truncated_file(tmp_path, cut, expected):
  root = _raw_dir(tmp_path)
  text = "".join(line + "\n" for line in U_DATA[:-1]) + cut
  (root / "u.data").write_text(text)
  with pytest.raises(parsing.DataError) as e:
    movielens.load_ml100k(root)
  assert str(root / "u.data") in str(e.value)
  assert expected in str(e.value)


def test_ml1m_truncated_latin1_file(tmp_path):
  root = _ml1m_dir(tmp_path)
  data = (root / "movies.dat").read_bytes()
  (root / "movies.dat").write_bytes(data[:-len("|Musical\n")])
  with pytest.raises(parsing.DataError, match="has no newline") as e:
    movielens.load_ml1m(root)
  assert str(root / "movies.dat") in str(e.value)
  assert "Misérables, Les (1995)::Drama'" in str(e.value)


def test_atomic_item_file_in_latin1_is_rejected(tmp_path):
  """RecBole's atomic files are UTF-8; a latin-1 copy must fail loudly."""
  root = _atomic_dir(tmp_path)
  _write(root / "ml-100k.item", ATOMIC_ITEM, encoding="latin-1")
  with pytest.raises(parsing.DataError, match="UnicodeDecodeError") as e:
    movielens.load_ml100k(root)
  assert str(root / "ml-100k.item") in str(e.value)


def test_unknown_dataset_name():
  with pytest.raises(data_lib.DataError) as e:
    data_lib.load_dataset("ml-10m")
  message = str(e.value)
  assert "'ml-10m'" in message
  for known in ("ml-100k", "ml-1m", "amazon-<category>", "synthetic"):
    assert known in message


@pytest.mark.parametrize("name, present, missing", [
    ("ml-100k", (), "u.data"),
    ("ml-100k", ("u.data", "u.item"), "u.user"),
    ("ml-100k", ("ml-100k.inter", "ml-100k.user"), "ml-100k.item"),
    ("ml-1m", ("ratings.dat", "users.dat"), "movies.dat"),
])
def test_explicit_root_missing_files(tmp_path, name, present, missing):
  for f in present:
    (tmp_path / f).write_text("x\n")
  with pytest.raises(parsing.DataError) as e:
    data_lib.load_dataset(name, root=tmp_path)
  message = str(e.value)
  assert str(tmp_path) in message
  assert repr(name) in message
  assert missing in message
  assert not (tmp_path / "cache").exists()  # Nothing was fetched.


def test_explicit_root_that_does_not_exist(tmp_path):
  with pytest.raises(parsing.DataError, match="no directory"):
    movielens.load_ml1m(tmp_path / "nowhere")

"""Tests of dataset file resolution, caching and download verification."""

import hashlib
import io
import json
import pathlib
import struct
import urllib.request
import zipfile

import numpy as np
import pytest

from taiji_jax.data import dataset as dataset_lib
from taiji_jax.data import fetch
from taiji_jax.data import parsing
from taiji_jax.data import synthetic

FILES = {"a.txt": b"alpha\n", "b.txt": b"beta\n"}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
  """Points the cache into tmp_path and hides any real data directory."""
  monkeypatch.setenv("TAIJI_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.delenv("TAIJI_DATA_DIR", raising=False)


def _writer(label, calls, files=None):
  """A source that records its call and writes `files` into dest."""

  def fetch_fn(dest):
    calls.append(label)
    for name, content in (FILES if files is None else files).items():
      (dest / name).write_bytes(content)

  return fetch.Source(f"source {label}", fetch_fn)


def _failing(label, calls, error):

  def fetch_fn(dest):
    calls.append(label)
    (dest / "a.txt").write_bytes(b"partial")
    raise error

  return fetch.Source(f"source {label}", fetch_fn)


def _directory(path, files=None):
  path.mkdir(parents=True)
  for name, content in (FILES if files is None else files).items():
    (path / name).write_bytes(content)
  return path


def test_explicit_root_wins(tmp_path):
  root = _directory(tmp_path / "mine")
  calls = []
  path, description = fetch.resolve(
      "toy", list(FILES), [_writer("A", calls)], root=root)
  assert path == root
  assert description == f"local directory {root}"
  assert calls == []
  assert not (tmp_path / "cache").exists()


def test_explicit_root_missing_files_is_an_error(tmp_path):
  root = _directory(tmp_path / "mine", {"a.txt": b"x"})
  calls = []
  with pytest.raises(parsing.DataError) as e:
    fetch.resolve("toy", list(FILES), [_writer("A", calls)], root=root)
  message = str(e.value)
  assert str(root) in message and "'toy'" in message
  assert "['a.txt', 'b.txt']" in message  # Expected.
  assert "found ['a.txt']" in message
  assert calls == []  # No fallback from an explicit root.


def test_explicit_root_beats_data_dir(tmp_path, monkeypatch):
  _directory(tmp_path / "data" / "toy")
  monkeypatch.setenv("TAIJI_DATA_DIR", str(tmp_path / "data"))
  root = _directory(tmp_path / "mine")
  path, _ = fetch.resolve("toy", list(FILES), [], root=root)
  assert path == root


def test_data_dir_is_used(tmp_path, monkeypatch):
  expected = _directory(tmp_path / "data" / "toy")
  monkeypatch.setenv("TAIJI_DATA_DIR", str(tmp_path / "data"))
  calls = []
  path, description = fetch.resolve("toy", list(FILES), [_writer("A", calls)])
  assert path == expected
  assert description == f"local directory {expected}"
  assert calls == []


def test_data_dir_without_files_is_an_error(tmp_path, monkeypatch):
  _directory(tmp_path / "data" / "toy", {"b.txt": b"x"})
  monkeypatch.setenv("TAIJI_DATA_DIR", str(tmp_path / "data"))
  calls = []
  with pytest.raises(parsing.DataError, match="does not hold the files"):
    fetch.resolve("toy", list(FILES), [_writer("A", calls)])
  assert calls == []


def test_data_dir_without_dataset_falls_through(tmp_path, monkeypatch):
  _directory(tmp_path / "data" / "other")
  monkeypatch.setenv("TAIJI_DATA_DIR", str(tmp_path / "data"))
  calls = []
  path, _ = fetch.resolve("toy", list(FILES), [_writer("A", calls)])
  assert path == tmp_path / "cache" / "toy"
  assert calls == ["A"]


def test_first_working_source_is_used(tmp_path):
  calls = []
  sources = [
      _writer("A", calls),
      _writer("B", calls, {
          "a.txt": b"other\n",
          "b.txt": b"other\n"
      })
  ]
  path, description = fetch.resolve("toy", list(FILES), sources)
  assert calls == ["A"]
  assert path == tmp_path / "cache" / "toy"
  assert description == f"source A (cached in {path})"
  for name, content in FILES.items():
    assert (path / name).read_bytes() == content


@pytest.mark.parametrize("error", [
    OSError("connection refused"),
    parsing.DataError("received 3 bytes"),
    zipfile.BadZipFile("not a zip"),
])
def test_failing_source_falls_through(tmp_path, error):
  calls = []
  sources = [_failing("A", calls, error), _writer("B", calls)]
  path, description = fetch.resolve("toy", list(FILES), sources)
  assert calls == ["A", "B"]
  assert description.startswith("source B")
  assert (path / "a.txt").read_bytes() == FILES["a.txt"]


def test_source_with_wrong_files_falls_through(tmp_path):
  calls = []
  sources = [_writer("A", calls, {"a.txt": b"x"}), _writer("B", calls)]
  _, description = fetch.resolve("toy", list(FILES), sources)
  assert calls == ["A", "B"]
  assert description.startswith("source B")


def test_all_sources_failing(tmp_path):
  calls = []
  sources = [
      _failing("A", calls, OSError("connection refused")),
      _writer("B", calls, {"b.txt": b"x"}),
      _failing("C", calls, parsing.DataError("bad CRC")),
  ]
  with pytest.raises(parsing.DataError) as e:
    fetch.resolve("toy", list(FILES), sources)
  message = str(e.value)
  assert calls == ["A", "B", "C"]
  assert "'toy'" in message
  assert "source A: connection refused" in message
  assert "source B: source provided ['b.txt']" in message
  assert "source C: bad CRC" in message
  assert "TAIJI_DATA_DIR" in message
  # Nothing half-fetched was cached.
  assert not (tmp_path / "cache" / "toy" / fetch.MANIFEST).exists()


def test_no_sources(tmp_path):
  with pytest.raises(parsing.DataError, match="Could not obtain"):
    fetch.resolve("toy", list(FILES), [])


def test_cache_manifest_and_reuse(tmp_path):
  calls = []
  path, _ = fetch.resolve("toy", list(FILES), [_writer("A", calls)])
  manifest = json.loads((path / fetch.MANIFEST).read_text())
  assert manifest == {
      "source": "source A",
      "sha256": {
          n: hashlib.sha256(c).hexdigest() for n, c in FILES.items()
      },
  }
  again, description = fetch.resolve("toy", list(FILES), [_writer("B", calls)])
  assert again == path
  assert calls == ["A"]
  assert description == f"cache {path} (originally from source A)"


def test_cache_is_per_dataset(tmp_path):
  calls = []
  fetch.resolve("toy", list(FILES), [_writer("A", calls)])
  path, _ = fetch.resolve("other", list(FILES), [_writer("B", calls)])
  assert calls == ["A", "B"]
  assert path == tmp_path / "cache" / "other"


def test_corrupted_cache_is_rejected(tmp_path):
  calls = []
  path, _ = fetch.resolve("toy", list(FILES), [_writer("A", calls)])
  data = bytearray((path / "b.txt").read_bytes())
  data[0] ^= 1
  (path / "b.txt").write_bytes(bytes(data))
  with pytest.raises(parsing.DataError) as e:
    fetch.resolve("toy", list(FILES), [_writer("B", calls)])
  assert str(path / "b.txt") in str(e.value)
  assert "corrupt" in str(e.value)
  assert calls == ["A"]


def test_missing_cached_file_is_rejected(tmp_path):
  path, _ = fetch.resolve("toy", list(FILES), [_writer("A", [])])
  (path / "a.txt").unlink()
  with pytest.raises(parsing.DataError, match="is missing, manifest says"):
    fetch.resolve("toy", list(FILES), [])


def test_pinned_digest(tmp_path):
  calls = []
  good = hashlib.sha256(FILES["a.txt"]).hexdigest()
  sources = [
      _writer("A", calls, {
          "a.txt": b"alpha?\n",
          "b.txt": b"beta\n"
      }),
      _writer("B", calls),
  ]
  path, description = fetch.resolve(
      "toy", list(FILES), sources, pinned={"a.txt": good})
  assert calls == ["A", "B"]
  assert description.startswith("source B")
  assert (path / "a.txt").read_bytes() == FILES["a.txt"]


def test_pinned_digest_mismatch_everywhere(tmp_path):
  with pytest.raises(parsing.DataError) as e:
    fetch.resolve(
        "toy", list(FILES), [_writer("A", [])], pinned={"b.txt": "0" * 64})
  assert "b.txt: SHA-256" in str(e.value)
  assert "does not match the pinned " + "0" * 64 in str(e.value)


def test_alternative_layouts(tmp_path):
  layouts = [["u.data", "u.item"], ["x.inter"]]
  calls = []
  # The second layout alone satisfies the request.
  sources = [_writer("A", calls, {"x.inter": b"1\n", "junk": b""})]
  path, _ = fetch.resolve("toy", layouts, sources)
  assert (path / "x.inter").read_bytes() == b"1\n"
  assert not (path / "junk").exists()  # Only the layout's files are kept.
  manifest = json.loads((path / fetch.MANIFEST).read_text())
  assert set(manifest["sha256"]) == {"x.inter"}
  # Pins of the other layout do not apply.
  path, _ = fetch.resolve("toy2", layouts, sources, pinned={"u.data": "0"})
  assert (path / "x.inter").is_file()
  # A root with either layout works; the message lists both otherwise.
  root = _directory(tmp_path / "root", {"u.data": b"", "u.item": b""})
  assert fetch.resolve("toy", layouts, [], root=root)[0] == root
  (root / "u.item").unlink()
  with pytest.raises(parsing.DataError) as e:
    fetch.resolve("toy", layouts, [], root=root)
  assert "['u.data', 'u.item'] or ['x.inter']" in str(e.value)


def _zip_bytes(members, compression):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", compression) as z:
    for name, content in members.items():
      z.writestr(name, content)
  return bytearray(buf.getvalue())


def _data_offset(archive, name):
  """Offset of a member's (compressed) data in the archive bytes."""
  with zipfile.ZipFile(io.BytesIO(bytes(archive))) as z:
    info = z.getinfo(name)
  start = info.header_offset
  name_len, extra_len = struct.unpack("<HH", archive[start + 26:start + 30])
  return start + 30 + name_len + extra_len, info.compress_size


PAYLOAD = b"".join(
    b"%d\t%d\t3\t88125%04d\n" % (u, u * 7, u) for u in range(1, 400))


def test_extract_zip(tmp_path):
  archive = tmp_path / "d.zip"
  archive.write_bytes(
      _zip_bytes({
          "ml/u.data": PAYLOAD,
          "ml/u.item": b"item\n"
      }, zipfile.ZIP_DEFLATED))
  out = tmp_path / "out"
  out.mkdir()
  fetch.extract_zip(archive, {"ml/u.data": "u.data"}, out)
  assert (out / "u.data").read_bytes() == PAYLOAD
  assert sorted(p.name for p in out.iterdir()) == ["u.data"]


@pytest.mark.parametrize(
    "compression, corrupt",
    [
        # Stored data with a flipped byte: only the CRC check notices.
        (zipfile.ZIP_STORED, "flip"),
        # Deflated data with a flipped byte: decodes to wrong bytes or fails.
        (zipfile.ZIP_DEFLATED, "flip"),
        # Deflated data whose first block header is invalid (BTYPE=11): zlib
        # fails before any CRC is computed.
        (zipfile.ZIP_DEFLATED, "block"),
    ],
    ids=["stored-flip", "deflated-flip", "deflated-block"])
def test_extract_zip_rejects_corrupt_member(tmp_path, compression, corrupt):
  data = _zip_bytes({"ml/u.item": b"ok\n", "ml/u.data": PAYLOAD}, compression)
  offset, size = _data_offset(data, "ml/u.data")
  if corrupt == "flip":
    data[offset + size // 2] ^= 0x55
  else:
    data[offset] = 0x07
  archive = tmp_path / "d.zip"
  archive.write_bytes(bytes(data))
  out = tmp_path / "out"
  out.mkdir()
  with pytest.raises(parsing.DataError) as e:
    fetch.extract_zip(archive, {"ml/u.item": "u.item"}, out)
  assert str(archive) in str(e.value)
  assert "corrupt" in str(e.value)
  assert not (out / "u.item").exists()


def test_extract_zip_missing_member(tmp_path):
  archive = tmp_path / "d.zip"
  archive.write_bytes(_zip_bytes({"ml/u.data": PAYLOAD}, zipfile.ZIP_STORED))
  with pytest.raises(parsing.DataError, match="member ml/u.user not found"):
    fetch.extract_zip(archive, {"ml/u.user": "u.user"}, tmp_path)


def test_download_file_url(tmp_path):
  src = tmp_path / "src.bin"
  src.write_bytes(PAYLOAD)
  dest = tmp_path / "dest.bin"
  fetch.download(src.as_uri(), dest)
  assert dest.read_bytes() == PAYLOAD
  assert not (tmp_path / "dest.bin.part").exists()


def test_download_file_url_sets_content_length(tmp_path):
  """The check below is live for file:// URLs too."""
  src = tmp_path / "src.bin"
  src.write_bytes(PAYLOAD)
  with urllib.request.urlopen(src.as_uri()) as response:
    assert int(response.headers.get("Content-Length")) == len(PAYLOAD)


def test_download_missing_file_url(tmp_path):
  with pytest.raises(OSError):
    fetch.download((tmp_path / "nope").as_uri(), tmp_path / "dest")
  assert not (tmp_path / "dest").exists()


class _ShortResponse(io.BytesIO):
  """A response that delivers fewer bytes than it announces."""

  def __init__(self, body, announced):
    super().__init__(body)
    self.headers = {"Content-Length": str(announced)}


def test_download_rejects_truncated_body(tmp_path, monkeypatch):
  monkeypatch.setattr(urllib.request, "urlopen",
                      lambda *a, **k: _ShortResponse(b"12345", 9))
  dest = tmp_path / "dest"
  with pytest.raises(parsing.DataError) as e:
    fetch.download("https://example.invalid/x.zip", dest)
  assert "https://example.invalid/x.zip" in str(e.value)
  assert "received 5 bytes, server announced 9" in str(e.value)
  assert not dest.exists()
  assert not (tmp_path / "dest.part").exists()


def test_zip_source_end_to_end(tmp_path):
  """zip_source over file:// URLs: a corrupt archive falls through."""
  bad = _zip_bytes({"ml/u.data": PAYLOAD}, zipfile.ZIP_DEFLATED)
  offset, _ = _data_offset(bad, "ml/u.data")
  bad[offset] = 0x07
  (tmp_path / "bad.zip").write_bytes(bytes(bad))
  (tmp_path / "good.zip").write_bytes(
      _zip_bytes({"ml/u.data": PAYLOAD}, zipfile.ZIP_DEFLATED))
  sources = [
      fetch.zip_source((tmp_path / "missing.zip").as_uri(),
                       {"ml/u.data": "u.data"}),
      fetch.zip_source((tmp_path / "bad.zip").as_uri(),
                       {"ml/u.data": "u.data"}),
      fetch.zip_source((tmp_path / "good.zip").as_uri(),
                       {"ml/u.data": "u.data"}),
  ]
  path, description = fetch.resolve("toy", ["u.data"], sources)
  assert description.startswith(f"zip {(tmp_path / 'good.zip').as_uri()}")
  assert (path / "u.data").read_bytes() == PAYLOAD
  assert sorted(
      p.name for p in path.iterdir()) == ["taiji_manifest.json", "u.data"]


def test_file_source_end_to_end(tmp_path):
  for name, content in FILES.items():
    (tmp_path / name).write_bytes(content)
  source = fetch.file_source(
      {name: (tmp_path / name).as_uri() for name in FILES})
  path, _ = fetch.resolve("toy", list(FILES), [source])
  for name, content in FILES.items():
    assert (path / name).read_bytes() == content


def test_cache_root_default(monkeypatch):
  monkeypatch.delenv("TAIJI_CACHE_DIR")
  assert fetch.cache_root() == (
      pathlib.Path.home() / ".cache" / "taiji_jax" / "datasets")


def test_dataset_save_load_round_trip(tmp_path):
  original = synthetic.make_synthetic(num_users=20, num_items=30, seed=3)
  original.save(tmp_path / "saved")
  loaded = dataset_lib.Dataset.load(tmp_path / "saved")
  assert loaded.name == original.name and loaded.source == original.source
  for field in ("user_raw_ids", "item_raw_ids", "inter_users", "inter_items",
                "inter_times"):
    np.testing.assert_array_equal(
        getattr(loaded, field), getattr(original, field))
    assert getattr(loaded, field).dtype == getattr(original, field).dtype
  np.testing.assert_array_equal(loaded.inter_ratings, original.inter_ratings)
  assert loaded.item_features == original.item_features  # tuples restored
  assert loaded.user_features == original.user_features
  assert loaded.item_text(5) == original.item_text(5)
  assert dict(loaded.report) == dict(original.report)


def test_parse_cached_parses_once_per_manifest(tmp_path, monkeypatch):
  monkeypatch.setenv("TAIJI_CACHE_DIR", str(tmp_path / "cache"))
  directory = tmp_path / "cache" / "toy"
  directory.mkdir(parents=True)
  (directory / fetch.MANIFEST).write_text('{"source": "s", "sha256": {}}')
  calls = []

  def parse():
    calls.append(1)
    return synthetic.make_synthetic(num_users=12, num_items=20, seed=1)

  first = fetch.parse_cached(directory, "from A", parse, "v1")
  second = fetch.parse_cached(directory, "from B", parse, "v1")
  assert len(calls) == 1
  assert second.source == "from B"
  np.testing.assert_array_equal(first.inter_items, second.inter_items)
  fetch.parse_cached(directory, "x", parse, "v2")  # new parser version
  assert len(calls) == 2
  (directory / fetch.MANIFEST).write_text('{"source": "t", "sha256": {}}')
  fetch.parse_cached(directory, "x", parse, "v2")  # re-fetched files
  assert len(calls) == 3
  # A directory outside the cache (an explicit root) is always parsed.
  outside = tmp_path / "root"
  outside.mkdir()
  (outside / fetch.MANIFEST).write_text("{}")
  fetch.parse_cached(outside, "x", parse, "v2")
  fetch.parse_cached(outside, "x", parse, "v2")
  assert len(calls) == 5


def _slow_fetch_in_subprocess(cache_dir, log_path, barrier):
  """Resolves 'toy' with a slow source that logs each fetch (for the test)."""
  import os  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  os.environ["TAIJI_CACHE_DIR"] = cache_dir

  def fetch_fn(dest):
    with open(log_path, "a") as log:
      log.write("fetch\n")
    time.sleep(0.5)
    for name, content in FILES.items():
      (dest / name).write_bytes(content)

  barrier.wait()
  path, _ = fetch.resolve("toy", list(FILES), [fetch.Source("slow", fetch_fn)])
  assert (path / "a.txt").read_bytes() == FILES["a.txt"]


def test_concurrent_resolves_fetch_once(tmp_path):
  import multiprocessing  # pylint: disable=g-import-not-at-top
  ctx = multiprocessing.get_context("spawn")
  barrier = ctx.Barrier(3)
  log = tmp_path / "fetches.log"
  procs = [
      ctx.Process(
          target=_slow_fetch_in_subprocess,
          args=(str(tmp_path / "cache"), str(log), barrier)) for _ in range(3)
  ]
  for p in procs:
    p.start()
  for p in procs:
    p.join(60)
  assert [p.exitcode for p in procs] == [0, 0, 0]
  assert log.read_text() == "fetch\n"

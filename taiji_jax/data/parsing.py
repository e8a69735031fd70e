"""Strict readers for delimited and line-JSON files.

Every error names the file, the 1-based line number and the offending value,
so a malformed or truncated file is caught before anything trains on it.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import json
import os
from typing import Any, Iterator, Sequence
import zlib

import numpy as np


class DataError(ValueError):
  """A data file is missing, malformed or inconsistent."""


def where(path: os.PathLike | str, line: int | None = None) -> str:
  return f"{os.fspath(path)}:{line}" if line is not None else os.fspath(path)


def open_text(path: os.PathLike | str, encoding: str = "utf-8"):
  """Opens a text file, transparently gunzipping `*.gz`."""
  if not os.path.exists(path):
    raise DataError(f"{where(path)}: file not found.")
  if os.path.getsize(path) == 0:
    raise DataError(f"{where(path)}: file is empty.")
  if os.fspath(path).endswith(".gz"):
    return gzip.open(path, "rt", encoding=encoding, newline="")
  return open(path, "r", encoding=encoding, newline="")


# Errors a damaged or mis-encoded file raises while being read.
_READ_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError)


@contextlib.contextmanager
def _reading(path: os.PathLike | str, progress: list[int]):
  """Turns low-level read failures into a DataError naming file and line."""
  try:
    yield
  except _READ_ERRORS as e:
    raise DataError(
        f"{where(path)}: cannot read past line {progress[0]} "
        f"({type(e).__name__}: {e}); the file is truncated, corrupt or not "
        "in the expected encoding.") from None


def read_delimited(path: os.PathLike | str,
                   sep: str,
                   num_fields: int,
                   *,
                   encoding: str = "utf-8",
                   header: Sequence[str] | None = None,
                   min_rows: int = 1) -> Iterator[tuple[int, list[str]]]:
  """Yields (line_number, fields) of a delimited text file.

  Args:
    path: the file.
    sep: field separator ("\\t", "|", "::").
    num_fields: exact number of fields every data line must have.
    encoding: text encoding (MovieLens item files are latin-1).
    header: if given, the first line must split into exactly these names
      (RecBole atomic files, where names carry a `:type` suffix).
    min_rows: fewer data rows than this is an error (empty/truncated file).

  Raises:
    DataError: wrong header, a line with the wrong number of fields, a file
      that does not end in a newline (truncated), or too few rows.
  """
  rows = 0
  last = ""
  progress = [0]
  with _reading(path, progress), open_text(path, encoding) as f:
    for number, line in enumerate(f, start=1):
      progress[0] = number
      last = line
      if number == 1 and header is not None:
        names = line.rstrip("\r\n").split(sep)
        if names != list(header):
          raise DataError(f"{where(path, 1)}: header {names!r} does not match "
                          f"the expected columns {list(header)!r}.")
        continue
      body = line.rstrip("\r\n")
      if not body:
        # A blank last line is common; blank lines elsewhere are not data.
        continue
      fields = body.split(sep)
      if len(fields) != num_fields:
        raise DataError(
            f"{where(path, number)}: expected {num_fields} fields separated by "
            f"{sep!r}, found {len(fields)}: {body[:200]!r}.")
      rows += 1
      yield number, fields
  if last and not last.endswith("\n"):
    raise DataError(f"{where(path)}: last line {last[:200]!r} has no newline; "
                    "the file looks truncated.")
  if rows < min_rows:
    raise DataError(
        f"{where(path)}: found {rows} data rows, expected at least {min_rows}.")


def read_json_lines(
    path: os.PathLike | str, required: Sequence[str] = ()
) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (line_number, record) from a JSON-lines file (optionally .gz).

  Lines that are not strict JSON are parsed as Python literals, because the
  2014 Amazon metadata files (`meta_*.json.gz`) are written with Python's
  `repr` (single quotes). `ast.literal_eval` never executes code.

  Raises:
    DataError: a line that parses as neither, a record that is not an object,
      or one without a required key.
  """
  rows = 0
  progress = [0]
  with _reading(path, progress), open_text(path) as f:
    for number, line in enumerate(f, start=1):
      progress[0] = number
      body = line.strip()
      if not body:
        continue
      try:
        record = json.loads(body)
      except json.JSONDecodeError:
        try:
          record = ast.literal_eval(body)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
          raise DataError(f"{where(path, number)}: not a JSON/Python record "
                          f"({type(e).__name__}): {body[:200]!r}.") from None
      if not isinstance(record, dict):
        raise DataError(f"{where(path, number)}: expected an object, got "
                        f"{type(record).__name__}: {body[:200]!r}.")
      for key in required:
        if key not in record:
          raise DataError(f"{where(path, number)}: missing required key "
                          f"{key!r} in {body[:200]!r}.")
      rows += 1
      yield number, record
  if rows == 0:
    raise DataError(f"{where(path)}: no records found.")


def to_int(value: Any, path: os.PathLike | str, line: int, field: str) -> int:
  """Parses an integer field (accepting '881250949' and '881250949.0')."""
  try:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
      return int(value)
    text = str(value).strip()
    try:
      return int(text)
    except ValueError:
      number = float(text)
      if not number.is_integer():
        raise ValueError(text) from None
      return int(number)
  except (ValueError, TypeError, OverflowError):
    raise DataError(f"{where(path, line)}: field {field!r} must be an integer, "
                    f"got {value!r}.") from None


def to_float(value: Any, path: os.PathLike | str, line: int,
             field: str) -> float:
  """Parses a finite float field."""
  if isinstance(value, bool):
    raise DataError(f"{where(path, line)}: field {field!r} must be a number, "
                    f"got {value!r}.")
  try:
    number = float(value)
  except (ValueError, TypeError):
    raise DataError(f"{where(path, line)}: field {field!r} must be a number, "
                    f"got {value!r}.") from None
  if number != number or number in (float("inf"), float("-inf")):
    raise DataError(f"{where(path, line)}: field {field!r} must be finite, "
                    f"got {value!r}.")
  return number

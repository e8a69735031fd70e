"""Text embeddings of a catalogue, cached in a workdir under a content key.

`text_embeddings(enc_cfg, texts, path)` encodes `texts` with the encoder
`enc_cfg` names (`{"name", "path", "batch_size"}`, see
`taiji_jax.text.load_text_encoder`) unless `path` (an .npz) already holds
them under the same key: the encoder's name and path and a SHA-256 of the
texts, so a changed catalogue or encoder is recomputed, never reused.
Stages that need the same embeddings find each other's files by that key
(`cached_key`) instead of importing each other.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import time
from typing import Callable, Sequence

from absl import logging
import numpy as np


def cached_array(path: pathlib.Path, key: str,
                 compute: Callable[[], np.ndarray]) -> np.ndarray:
  """The float32 array stored at `path` under `key`, else `compute()`,
  written atomically (a crash leaves the old file or none)."""
  if path.is_file():
    with np.load(path, allow_pickle=False) as f:
      if str(f["key"]) == key:
        return f["x"]
    logging.info("%s: cache key changed, recomputing", path)
  x = np.asarray(compute(), np.float32)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, x=x, key=np.asarray(key))
  os.replace(tmp, path)
  return x


def cached_key(path: pathlib.Path) -> str | None:
  """The key a `cached_array` file was stored under, None if absent."""
  if not path.is_file():
    return None
  with np.load(path, allow_pickle=False) as f:
    return str(f["key"])


def text_key(enc_cfg, texts: Sequence[str]) -> str:
  """The cache key of text embeddings: encoder, its path, the texts."""
  from taiji_jax.text import encoder  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
  key = f"{enc_cfg.name}|{enc_cfg.path}|{digest}"
  sig = encoder.signature(enc_cfg.name, enc_cfg.path or None)
  return f"{key}|{sig}" if sig else key


def text_embeddings(enc_cfg,
                    texts: Sequence[str],
                    path: pathlib.Path,
                    progress: bool = False,
                    also: Sequence[pathlib.Path] = ()) -> np.ndarray:
  """(N, D) embeddings of `texts` by the encoder `enc_cfg` names.

  Args:
    enc_cfg: {"name", "path", "batch_size"}.
    texts: the N texts.
    path: the .npz this call caches into.
    progress: a progress bar while encoding.
    also: other .npz files (another stage's cache) read instead when they
      hold the same key; never written.
  """
  from taiji_jax import text  # pylint: disable=g-import-not-at-top
  key = text_key(enc_cfg, texts)
  for other in also:
    if cached_key(other) == key:
      with np.load(other, allow_pickle=False) as f:
        return f["x"]

  def compute():
    encoder = text.load_text_encoder(enc_cfg.name, path=enc_cfg.path or None)
    start = time.perf_counter()
    x = encoder.encode(texts, batch_size=enc_cfg.batch_size, progress=progress)
    logging.info("encoded %d texts with %s in %.1f s", len(texts),
                 enc_cfg.name, time.perf_counter() - start)
    return x

  return cached_array(path, key, compute)

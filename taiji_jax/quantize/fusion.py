"""Fusing content and collaborative item representations before quantizing.

GR4AD's UA-SID and LETTER both argue that SIDs built from content alone
ignore collaborative signal and SIDs from CF embeddings alone lose the
semantics an LLM can use. `fuse` concatenates any named parts with weights:
each part is L2-normalised per item and scaled by sqrt(w_p / sum w), so the
squared distance between two fused items is the weighted sum of the parts'
squared (cosine) distances and every fused row has unit norm:

  ||f(a) - f(b)||^2 = sum_p (w_p / W) ||a_p/|a_p| - b_p/|b_p|||^2.

Weights {"content": 1} give content-only SIDs, {"collaborative": 1} CF-only.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def fuse(parts: Mapping[str, np.ndarray],
         weights: Mapping[str, float]) -> np.ndarray:
  """(N, sum D_p) float32 fused embeddings of the parts with weight > 0.

  Args:
    parts: name -> (N, D_p) embeddings, all with the same N.
    weights: name -> non-negative weight; parts with weight 0 are dropped
      (and need not be in `parts`).

  Raises:
    ValueError: unknown/missing part, negative or all-zero weights, rows of
      different counts, or non-finite / all-zero embedding rows (the message
      names the part and the first bad row).
  """
  unknown = {k for k, w in weights.items() if w != 0} - set(parts)
  if unknown:
    raise ValueError(f"fusion weights name parts {sorted(unknown)} that were "
                     f"not computed; available: {sorted(parts)}")
  negative = {k: w for k, w in weights.items() if w < 0}
  if negative:
    raise ValueError(f"fusion weights must be >= 0, got {negative}")
  active = {k: float(w) for k, w in weights.items() if w > 0}
  if not active:
    raise ValueError(f"fusion weights are all zero: {dict(weights)}")
  total = sum(active.values())
  rows = {k: len(parts[k]) for k in active}
  if len(set(rows.values())) != 1:
    raise ValueError(f"fusion parts have different item counts: {rows}")
  out = []
  for name in sorted(active):
    x = np.asarray(parts[name], np.float32)
    if x.ndim != 2:
      raise ValueError(f"fusion part {name!r}: expected (N, D), got {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x).all(1))
    if bad.size:
      raise ValueError(f"fusion part {name!r}: {bad.size} rows with NaN/inf, "
                       f"first row {bad[0]}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    zero = np.flatnonzero(norm[:, 0] == 0)
    if zero.size:
      raise ValueError(f"fusion part {name!r}: {zero.size} all-zero rows, "
                       f"first row {zero[0]}")
    out.append(x / norm * np.sqrt(active[name] / total))
  return np.concatenate(out, axis=1)

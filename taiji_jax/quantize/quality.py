"""Quality report of a built tokenizer (item -> semantic ID).

What a researcher checks before training on SIDs: how many items collided
before resolution, how much of each codebook is used and how evenly
(utilisation, entropy, perplexity), how much of the embedding the codes keep
(relative reconstruction error), and whether the coarse codes mean something
(label purity of the first-level clusters against a shuffled baseline, e.g.
genres on MovieLens).
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import numpy as np

from taiji_jax.quantize import collisions


def level_usage(codes_nl: np.ndarray,
                codebook_sizes: Sequence[int]) -> list[dict[str, float]]:
  """Per level: utilisation, entropy (nats), normalised entropy, perplexity.

  Utilisation is the fraction of the K_l codes used by at least one item;
  normalised entropy divides by log(K_l) (1 = perfectly uniform use of the
  whole codebook); perplexity = exp(entropy), the effective number of codes.
  """
  out = []
  for l, k in enumerate(codebook_sizes):
    counts = np.bincount(codes_nl[:, l], minlength=k).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    out.append({
        "codebook_size": int(k),
        "used": int((counts > 0).sum()),
        "utilisation": float((counts > 0).mean()),
        "entropy": entropy,
        "normalised_entropy": entropy / np.log(k) if k > 1 else 1.0,
        "perplexity": float(np.exp(entropy)),
    })
  return out


def label_purity(clusters_n: np.ndarray,
                 labels: Sequence[Sequence[str]],
                 shuffles: int = 20,
                 seed: int = 0) -> dict[str, float]:
  """How well clusters agree with item labels (e.g. genres).

  Each cluster's purity is the fraction of its items carrying the cluster's
  most common label (items may have several labels, as MovieLens genres);
  the overall purity weights clusters by size. Items without labels are
  ignored. The same figure for a random assignment with the same cluster
  sizes (mean over `shuffles` permutations) is the baseline: multi-label
  purity is far above 1/num_labels even for random clusters, so only the
  lift over the baseline says the clusters are semantic.
  """
  keep = [i for i, lab in enumerate(labels) if lab]
  if not keep:
    raise ValueError("label purity: no item has a label")
  clusters = np.asarray(clusters_n)[keep]
  labels = [tuple(labels[i]) for i in keep]

  def purity(assign):
    members = collections.defaultdict(list)
    for c, lab in zip(assign, labels):
      members[c].append(lab)
    hits = 0
    for labs in members.values():
      counts = collections.Counter(x for lab in labs for x in lab)
      top = counts.most_common(1)[0][0]
      hits += sum(top in lab for lab in labs)
    return hits / len(labels)

  rng = np.random.default_rng(seed)
  base = float(
      np.mean([purity(rng.permutation(clusters)) for _ in range(shuffles)]))
  value = purity(clusters)
  return {
      "purity": value,
      "random_purity": base,
      "lift": value / base,
      "items": len(labels)
  }


def report(semantic_codes_nl: np.ndarray,
           final_codes_nl: np.ndarray,
           codebook_sizes: Sequence[int],
           reconstruction_error: float | None = None,
           labels: Sequence[Sequence[str]] | None = None,
           label_field: str = "") -> dict[str, Any]:
  """The full report for one tokenizer.

  Args:
    semantic_codes_nl: (N, L) codes from the quantizer, before resolution.
    final_codes_nl: (N, L') unique codes after collision resolution.
    codebook_sizes: K_l of the L' final levels.
    reconstruction_error: mean ||x - x_hat||^2 / mean ||x||^2 of the
      quantizer on these items (None if not applicable).
    labels: per item (N,) a tuple of labels for the coherence figure.
    label_field: name of the label (shown in the printout).
  """
  before = collisions.collision_stats(semantic_codes_nl)
  after = collisions.collision_stats(final_codes_nl)
  out: dict[str, Any] = {
      "items": int(len(final_codes_nl)),
      "levels": int(final_codes_nl.shape[1]),
      "codebook_sizes": [int(k) for k in codebook_sizes],
      "collisions_before": before,
      "collision_rate_after": after["collision_rate"],
      "usage": level_usage(final_codes_nl, codebook_sizes),
      "reconstruction_error": reconstruction_error,
  }
  if labels is not None:
    out["coherence"] = {
        "field": label_field,
        **label_purity(semantic_codes_nl[:, 0], labels)
    }
  return out


def format_reports(reports: dict[str, dict[str, Any]]) -> str:
  """Side-by-side table of several tokenizers' reports."""
  names = list(reports)
  rows: list[tuple[str, list[str]]] = []

  def add(label, fn):
    rows.append((label, [fn(reports[n]) for n in names]))

  add("items", lambda r: f"{r['items']}")
  add("codebook sizes", lambda r: "/".join(map(str, r["codebook_sizes"])))
  add("collision rate before",
      lambda r: f"{r['collisions_before']['collision_rate']:.4f}")
  add("largest collision group",
      lambda r: f"{r['collisions_before']['max_group']}")
  add("collision rate after", lambda r: f"{r['collision_rate_after']:.4f}")
  add(
      "reconstruction error", lambda r: "-" if r["reconstruction_error"] is None
      else f"{r['reconstruction_error']:.4f}")
  levels = max(r["levels"] for r in reports.values())
  for l in range(levels):
    for key, fmt in (("utilisation", "{:.3f}"), ("normalised_entropy",
                                                 "{:.3f}"), ("perplexity",
                                                             "{:.1f}")):
      add(f"L{l + 1} {key.replace('_', ' ')}",
          lambda r, l=l, key=key, fmt=fmt: fmt.format(r["usage"][l][key])
          if l < r["levels"] else "-")
  if all("coherence" in r for r in reports.values()):
    field = reports[names[0]]["coherence"]["field"]
    add(f"L1 {field} purity", lambda r: f"{r['coherence']['purity']:.3f}")
    add("  shuffled baseline",
        lambda r: f"{r['coherence']['random_purity']:.3f}")
    add("  lift", lambda r: f"{r['coherence']['lift']:.2f}x")
  width = max(len(label) for label, _ in rows) + 2
  col = max(12, *(len(n) + 2 for n in names))
  lines = [" " * width + "".join(f"{n:>{col}}" for n in names)]
  lines.append("-" * len(lines[0]))
  lines += [
      f"{label:<{width}}" + "".join(f"{v:>{col}}"
                                    for v in values)
      for label, values in rows
  ]
  return "\n".join(lines)

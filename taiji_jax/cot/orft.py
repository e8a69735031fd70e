"""ORFT: keep the rationales that make the true answer likely.

Taiji's open-ended rejection-sampling fine-tuning scores each candidate
rationale z of a prompt x by the perplexity of the answer's SID tokens
y_1..y_T under a scorer model,

  PPL(y | x, z) = exp(-(1/T) sum_t log P(y_t | x, <think> z </think>
                                         <answer>, y_<t)),

and keeps the candidates with PPL < R, R = the median PPL of all
candidates (the paper's rule; `threshold` takes any quantile). A prompt may
keep 0..k of its k candidates.

Scoring rows use the SFT row conventions (`train/sid_rows.py`): one row
per candidate, left-padded with <pad> so every row ends on its last real
token,

  <pad>.. [prompt] <think> [rationale] </think> <answer> [SID] </answer>

with an answer mask on exactly the SID tokens (optionally </answer> too).
`answer_nll` is the jitted per-row mean NLL of the masked tokens;
`answer_perplexity` runs it over any number of rows in fixed-shape batches
(one compilation) and returns numpy.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from taiji_jax.evaluate import figures
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.sidlm import rows as sid_rows

PERCENTILES = (5, 25, 50, 75, 95)
STATS_FILE = "orft_stats.json"
SCORES_FILE = "orft_scores.npz"
HISTOGRAM_FILE = "orft_ppl_hist.png"


def scoring_rows(prompts: Sequence[Sequence[int]] | np.ndarray,
                 rationales: Sequence[Sequence[int]],
                 answers: Sequence[Sequence[int]] | np.ndarray,
                 vocab,
                 length: int | None = None,
                 mask_answer_end: bool = False) -> dict[str, np.ndarray]:
  """ORFT's scoring rows: `reasoning_rows` with the mask on the answer."""
  rows = reasoning_rows(prompts, rationales, answers, vocab, length,
                        "answer", mask_answer_end)
  return {"tokens": rows["tokens"], "answer_mask": rows["loss_mask"]}


def reasoning_rows(prompts: Sequence[Sequence[int]] | np.ndarray,
                   rationales: Sequence[Sequence[int]],
                   answers: Sequence[Sequence[int]] | np.ndarray,
                   vocab,
                   length: int | None = None,
                   target: str = "reasoning",
                   mask_answer_end: bool = False) -> dict[str, np.ndarray]:
  """Left-padded `[prompt] <think> z </think> <answer> SID </answer>` rows.

  One row convention for ORFT scoring and CoT fine-tuning (Taiji's L_ORFT,
  the loss on both the <think> and the <answer> part).

  Args:
    prompts: R prompts: token lists, or an (R, P) array left-padded with
      `vocab.pad_id` (e.g. `sid_rows.prompt_rows`); leading pads are dropped.
    rationales: R rationale token lists, without the <think> markers (e.g.
      `vocab.encode(text)`).
    answers: R answer SIDs as token lists or an (R, L) array (rows of
      `vocab.item_token_table(sids)`).
    vocab: anything with the special ids `pad_id`, `think_id`,
      `think_end_id`, `answer_id`, `answer_end_id` (a `text.vocab.Vocab`).
    length: row length T; default the longest row.
    target: which tokens the mask covers: "answer" (the SID tokens, ORFT's
      perplexity) or "reasoning" (everything after the prompt, <think>
      through </answer>: the CoT SFT loss).
    mask_answer_end: with "answer", also cover </answer>.

  Returns:
    {"tokens": (R, T) int32, "loss_mask": (R, T) bool}.

  Raises:
    ValueError: inputs of different counts, an empty answer, a rationale
      holding a think/answer marker, or a row longer than `length`.
  """
  if target not in ("answer", "reasoning"):
    raise ValueError(f"target must be 'answer' or 'reasoning', got "
                     f"{target!r}.")
  if not len(prompts) == len(rationales) == len(answers):
    raise ValueError(f"prompts, rationales and answers differ in count: "
                     f"{len(prompts)}, {len(rationales)}, {len(answers)}.")
  pad = vocab.pad_id
  markers = {
      vocab.think_id, vocab.think_end_id, vocab.answer_id, vocab.answer_end_id
  }
  rows, masks = [], []
  for n, (prompt, rationale,
          answer) in enumerate(zip(prompts, rationales, answers)):
    prompt = [int(t) for t in prompt]
    first = next((j for j, t in enumerate(prompt) if t != pad), len(prompt))
    prompt = prompt[first:]
    rationale = [int(t) for t in rationale]
    answer = [int(t) for t in answer]
    if not answer:
      raise ValueError(f"row {n}: empty answer.")
    if markers.intersection(rationale):
      raise ValueError(f"row {n}: the rationale holds a <think>/<answer> "
                       "marker token; pass its text tokens only.")
    head = [
        *prompt, vocab.think_id, *rationale, vocab.think_end_id, vocab.answer_id
    ]
    rows.append(head + answer + [vocab.answer_end_id])
    if target == "answer":
      masks.append([0] * len(head) + [1] * len(answer) +
                   [int(mask_answer_end)])
    else:
      masks.append([0] * len(prompt) + [1] * (len(rows[-1]) - len(prompt)))
  if length is None:
    length = max((len(r) for r in rows), default=1)
  # The SFT rows' left padding, so both stay one convention.
  return {
      "tokens": sid_rows.left_pad(rows, length, pad),
      "loss_mask": sid_rows.left_pad(masks, length, 0).astype(bool),
  }


def answer_nll_from_logits(logits_btv: jax.Array, targets_bt: jax.Array,
                           mask_bt: jax.Array) -> jax.Array:
  """(B,) mean NLL of the masked-in targets of each row; NaN where none.

  `targets_bt` are already shifted (target t follows input t).
  """

  def row(logits_tv, targets_t, mask_t):
    return decoder_lib.next_token_loss(logits_tv[None], targets_t[None],
                                       mask_t[None])

  nll_b, count_b = jax.vmap(row)(logits_btv, targets_bt, mask_bt)
  return jnp.where(count_b > 0, nll_b, jnp.nan)


@functools.partial(nnx.jit, static_argnames=("pad_id",))
def answer_nll(model, tokens_bt: jax.Array, answer_mask_bt: jax.Array,
               pad_id: int) -> jax.Array:
  """(B,) per-row mean -log P(answer token | everything before it).

  Args:
    model: a `models.decoder.Decoder` (any module mapping (tokens,
      attention_mask_bt=...) to (B, T, V) logits).
    tokens_bt: (B, T) left-padded rows (`scoring_rows`).
    answer_mask_bt: (B, T) true on the tokens to score.
    pad_id: the <pad> id (never attended).

  Returns:
    (B,) float32; NaN for a row with no masked token.
  """
  inputs_bt = tokens_bt[:, :-1]
  logits_btv = model(inputs_bt, attention_mask_bt=inputs_bt != pad_id)
  return answer_nll_from_logits(logits_btv, tokens_bt[:, 1:],
                                answer_mask_bt[:, 1:])


def batched_answer_nll(model,
                       tokens: np.ndarray,
                       answer_mask: np.ndarray,
                       pad_id: int,
                       batch_size: int = 32,
                       put: Callable[[dict[str, np.ndarray]], Any]
                       | None = None,
                       progress: bool = False) -> np.ndarray:
  """(R,) float64 `answer_nll` of every row, in batches of one shape.

  The last batch is filled up with copies of row 0 (dropped after), so
  `answer_nll` compiles once. `put` places a {"tokens", "answer_mask"}
  batch on devices (e.g. an SFT `Setup.put_batch` for a sharded model).
  """
  tokens = np.asarray(tokens, np.int32)
  answer_mask = np.asarray(answer_mask, bool)
  if tokens.ndim != 2 or tokens.shape != answer_mask.shape:
    raise ValueError(f"tokens {tokens.shape} and answer_mask "
                     f"{answer_mask.shape} must be the same (R, T).")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  num = len(tokens)
  out = np.empty(num, np.float64)
  starts = range(0, num, batch_size)
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    starts = tqdm.tqdm(starts, desc="orft scoring", unit="batch")
  for start in starts:
    idx = np.arange(start, start + batch_size)
    idx = np.where(idx < num, idx, 0)
    batch = {"tokens": tokens[idx], "answer_mask": answer_mask[idx]}
    if put is not None:
      batch = put(batch)
    nll = answer_nll(model, batch["tokens"], batch["answer_mask"], pad_id)
    real = min(batch_size, num - start)
    out[start:start + real] = np.asarray(jax.device_get(nll))[:real]
  return out


def answer_perplexity(model,
                      tokens: np.ndarray,
                      answer_mask: np.ndarray,
                      pad_id: int,
                      batch_size: int = 32,
                      **kwargs) -> np.ndarray:
  """(R,) float64 PPL = exp(mean answer NLL) of every row (NaN: no answer)."""
  return perplexity(
      batched_answer_nll(model, tokens, answer_mask, pad_id, batch_size,
                         **kwargs))


def perplexity(nll) -> np.ndarray:
  """exp(nll) in float64 (no overflow for any float32 NLL)."""
  return np.exp(np.asarray(nll, np.float64))


def threshold(ppl, quantile: float = 0.5) -> float:
  """R = the `quantile` of the finite PPLs (0.5: the median, Taiji's rule).

  NumPy's linear interpolation, so an even count gets the mean of the two
  middle values. Non-finite PPLs (rows without an answer) are ignored.

  Raises:
    ValueError: quantile outside [0, 1] or no finite PPL.
  """
  if not 0.0 <= quantile <= 1.0:
    raise ValueError(f"quantile must be in [0, 1], got {quantile}.")
  ppl = np.asarray(ppl, np.float64).reshape(-1)
  finite = ppl[np.isfinite(ppl)]
  if finite.size == 0:
    raise ValueError("no finite perplexity to take a threshold of.")
  return float(np.quantile(finite, quantile))


def accept(ppl, r: float) -> np.ndarray:
  """Bool mask of kept candidates: PPL strictly below R (NaN: rejected)."""
  return np.asarray(ppl, np.float64) < r


def acceptance_stats(ppl, accepted, prompt_ids, r: float) -> dict[str, Any]:
  """What ORFT kept, as JSON-ready numbers.

  Args:
    ppl: (R,) candidate perplexities.
    accepted: (R,) bool, `accept(ppl, r)`.
    prompt_ids: (R,) the prompt each candidate belongs to (any hashable
      ints, e.g. the row of the prompt).
    r: the threshold used.

  Returns:
    {"candidates", "accepted", "acceptance_rate", "threshold", "prompts",
     "max_candidates_per_prompt" (k), "kept_per_prompt" (list: entry j =
     prompts keeping exactly j candidates, j = 0..k), "prompts_with_none",
     "nonfinite_ppl", "ppl_percentiles" {"p5", ..., "p95"} of the finite
     PPLs, "accepted_ppl_median", "rejected_ppl_median"}.
  """
  ppl = np.asarray(ppl, np.float64).reshape(-1)
  accepted = np.asarray(accepted, bool).reshape(-1)
  prompt_ids = np.asarray(prompt_ids).reshape(-1)
  if not len(ppl) == len(accepted) == len(prompt_ids):
    raise ValueError(f"ppl, accepted and prompt_ids differ in length: "
                     f"{len(ppl)}, {len(accepted)}, {len(prompt_ids)}.")
  _, inverse, sizes = np.unique(
      prompt_ids, return_inverse=True, return_counts=True)
  kept = np.bincount(inverse, weights=accepted, minlength=len(sizes))
  k = int(sizes.max(initial=0))
  kept_hist = np.bincount(kept.astype(np.int64), minlength=k + 1)
  finite = np.isfinite(ppl)

  def median(values):
    return float(np.median(values)) if values.size else None

  n = len(ppl)
  return {
      "candidates": n,
      "accepted": int(accepted.sum()),
      "acceptance_rate": float(accepted.mean()) if n else 0.0,
      "threshold": float(r),
      "prompts": len(sizes),
      "max_candidates_per_prompt": k,
      "kept_per_prompt": [int(c) for c in kept_hist],
      "prompts_with_none": int(kept_hist[0]) if len(sizes) else 0,
      "nonfinite_ppl": int((~finite).sum()),
      "ppl_percentiles": {
          f"p{p}":
              (float(np.percentile(ppl[finite], p)) if finite.any() else None)
          for p in PERCENTILES
      },
      "accepted_ppl_median": median(ppl[accepted & finite]),
      "rejected_ppl_median": median(ppl[~accepted & finite]),
  }


def plot_ppl_histogram(ppl,
                       r: float,
                       path: os.PathLike | str,
                       accepted=None,
                       bins: int = 40) -> pathlib.Path:
  """Writes a PNG histogram of the finite PPLs (log-spaced bins) with R.

  Accepted and rejected candidates are stacked in two colours (`accepted`
  default: `accept(ppl, r)`). (`evaluate.figures`: a bare Agg canvas.)
  """
  ppl = np.asarray(ppl, np.float64).reshape(-1)
  accepted = accept(ppl, r) if accepted is None else np.asarray(accepted, bool)
  finite = np.isfinite(ppl) & (ppl > 0)
  values = ppl[finite]
  fig, ax = figures.new(figsize=(6, 4))
  if values.size:
    lo, hi = values.min(), values.max()
    edges = np.geomspace(lo, hi if hi > lo else lo * 1.01, bins + 1)
    ax.hist([ppl[finite & accepted], ppl[finite & ~accepted]],
            bins=edges,
            stacked=True,
            color=["tab:green", "tab:gray"],
            label=["kept (PPL < R)", "rejected"])
    ax.set_xscale("log")
  ax.axvline(r, color="tab:red", linestyle="--", label=f"R = {r:.3g}")
  rate = accepted[finite].mean() if finite.any() else 0.0
  ax.set_title(f"ORFT answer perplexity: {finite.sum()} candidates, "
               f"{rate:.0%} kept")
  ax.set_xlabel("perplexity of the answer SID tokens")
  ax.set_ylabel("candidates")
  ax.legend()
  return figures.save(fig, path)


def write_report(directory: os.PathLike | str, ppl, accepted, prompt_ids,
                 r: float) -> dict[str, Any]:
  """Writes `orft_stats.json`, `orft_scores.npz` and the histogram PNG.

  Returns the statistics (`acceptance_stats`).
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  stats = acceptance_stats(ppl, accepted, prompt_ids, r)
  np.savez(
      directory / SCORES_FILE,
      ppl=np.asarray(ppl, np.float64),
      accepted=np.asarray(accepted, bool),
      prompt_ids=np.asarray(prompt_ids))
  plot_ppl_histogram(ppl, r, directory / HISTOGRAM_FILE, accepted)
  tmp = directory / (STATS_FILE + ".tmp")
  tmp.write_text(json.dumps(stats, indent=2))
  os.replace(tmp, directory / STATS_FILE)
  return stats

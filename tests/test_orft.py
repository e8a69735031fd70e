"""ORFT: scoring rows, answer NLL vs a direct computation, the R rule."""

import json
import types

from flax import nnx
import jax
import numpy as np
import pytest

from taiji_jax.cot import orft
from taiji_jax.models import decoder as decoder_lib

# The special ids of `text.vocab.Vocab`; SID tokens 8..29, text 30..66.
IDS = types.SimpleNamespace(
    pad_id=0, think_id=4, think_end_id=5, answer_id=6, answer_end_id=7)
V = 67


@pytest.fixture(scope="module")
def model():
  # Random parameters put straight into the abstract model (no init to
  # compile); std 0.3 makes the logits far from uniform.
  cfg = decoder_lib.DecoderConfig.tiny(V)
  graphdef, state = nnx.split(decoder_lib.abstract_decoder(cfg))
  rng = np.random.default_rng(0)
  state = jax.tree.map(
      lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), state)
  return nnx.merge(graphdef, state)


def _example():
  rng = np.random.default_rng(0)
  prompts = [[1] + rng.integers(30, V, n).tolist() for n in (5, 2, 7)]
  rationales = [rng.integers(30, V, n).tolist() for n in (0, 3, 9)]
  answers = [rng.integers(8, 30, 3).tolist() for _ in range(3)]
  return prompts, rationales, answers


def _direct_nll(model, tokens, mask):
  """Mean -log softmax of the masked tokens, by NumPy.

  The rows are moved to the left edge (right padding) and run without an
  attention mask: causal attention alone keeps the padding out of every
  real position, so this path shares no masking code with `answer_nll`.
  """
  lengths = (tokens != IDS.pad_id).sum(1)
  right = np.zeros_like(tokens)
  right_mask = np.zeros_like(mask)
  for j, n in enumerate(lengths):
    right[j, :n] = tokens[j, -n:]
    right_mask[j, :n] = mask[j, -n:]
  logits = np.asarray(
      nnx.jit(lambda m, x: m(x))(model, right[:, :-1]), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, right[:, 1:, None], -1)[..., 0]
  return np.array(
      [-picked[j][right_mask[j, 1:]].mean() for j in range(len(tokens))])


def test_rows_are_left_padded_with_the_mask_on_the_sid_only():
  prompts, rationales, answers = _example()
  rows = orft.scoring_rows(prompts, rationales, answers, IDS)
  tokens, mask = rows["tokens"], rows["answer_mask"]
  want_len = max(
      len(p) + len(r) + 3 + 3 + 1 for p, r in zip(prompts, rationales))
  assert tokens.shape == mask.shape == (3, want_len)
  for j, (p, r, a) in enumerate(zip(prompts, rationales, answers)):
    row = p + [4] + r + [5, 6] + a + [7]
    assert tokens[j, -len(row):].tolist() == row
    assert np.all(tokens[j, :-len(row)] == 0)
    np.testing.assert_array_equal(
        np.flatnonzero(mask[j]), want_len - 4 + np.arange(3))
    assert tokens[j][mask[j]].tolist() == a
  with_end = orft.scoring_rows(
      prompts, rationales, answers, IDS, length=40, mask_answer_end=True)
  assert with_end["tokens"].shape == (3, 40)
  assert np.all(
      with_end["tokens"][with_end["answer_mask"]].reshape(3, 4)[:, 3] == 7)
  # A left-padded prompt array (sid_rows.prompt_rows) gives the same rows.
  padded = np.zeros((3, 12), np.int32)
  for j, p in enumerate(prompts):
    padded[j, 12 - len(p):] = p
  again = orft.scoring_rows(padded, rationales, np.asarray(answers), IDS)
  np.testing.assert_array_equal(again["tokens"], tokens)
  with pytest.raises(ValueError, match="marker"):
    orft.scoring_rows(prompts[:1], [[30, 4, 31]], answers[:1], IDS)
  with pytest.raises(ValueError, match="tokens > length"):
    orft.scoring_rows(prompts, rationales, answers, IDS, length=10)
  with pytest.raises(ValueError, match="differ in count"):
    orft.scoring_rows(prompts, rationales[:2], answers, IDS)


def test_answer_nll_equals_a_direct_log_softmax(model):
  prompts, rationales, answers = _example()
  rows = orft.scoring_rows(prompts, rationales, answers, IDS)
  tokens, mask = rows["tokens"], rows["answer_mask"]
  nll = np.asarray(orft.answer_nll(model, tokens, mask, 0))
  want = _direct_nll(model, tokens, mask)
  np.testing.assert_allclose(nll, want, rtol=2e-5)
  # Not trivially uniform, and different per row.
  assert np.ptp(nll) > 0.05 and np.all(np.abs(nll - np.log(V)) > 0.01)
  # More left padding changes nothing.
  wide = orft.scoring_rows(
      prompts, rationales, answers, IDS, length=tokens.shape[1] + 5)
  np.testing.assert_allclose(
      orft.answer_nll(model, wide["tokens"], wide["answer_mask"], 0),
      nll,
      rtol=2e-5)
  # The rationale is context: another one (same lengths) changes the NLL.
  other = orft.scoring_rows(prompts, [[30] * len(r) for r in rationales],
                            answers, IDS)
  changed = orft.answer_nll(model, other["tokens"], other["answer_mask"], 0)
  assert changed[0] == nll[0]  # row 0 has an empty rationale
  assert np.all(np.abs(np.asarray(changed)[1:] - nll[1:]) > 1e-3)
  np.testing.assert_allclose(orft.perplexity(nll), np.exp(want), rtol=1e-4)


def test_batched_scoring_matches_one_batch(model):
  prompts, rationales, answers = _example()
  length = orft.scoring_rows(prompts, rationales, answers,
                             IDS)["tokens"].shape[1]
  rows = orft.scoring_rows(prompts * 2 + prompts[:1],
                           rationales * 2 + [[31, 32]],
                           answers * 2 + answers[:1], IDS, length)
  tokens, mask = rows["tokens"], rows["answer_mask"]
  mask[-1] = False  # a row without answer tokens scores NaN
  whole = np.asarray(orft.answer_nll(model, tokens, mask, 0))
  batched = orft.batched_answer_nll(model, tokens, mask, 0, batch_size=3)
  assert batched.shape == (7,) and batched.dtype == np.float64
  np.testing.assert_allclose(batched[:6], whole[:6], rtol=2e-5)
  np.testing.assert_allclose(batched[:3], batched[3:6])
  assert np.isnan(batched[6]) and np.isnan(whole[6])
  ppl = orft.answer_perplexity(model, tokens, mask, 0, batch_size=3)
  np.testing.assert_allclose(ppl[:6], np.exp(whole[:6]), rtol=1e-4)
  assert not orft.accept(ppl, np.inf)[6]
  with pytest.raises(ValueError, match="batch_size"):
    orft.batched_answer_nll(model, tokens, mask, 0, batch_size=0)


def test_threshold_is_the_median_and_accept_is_strict():
  assert orft.threshold([3.0, 1.0, 2.0]) == 2.0
  assert orft.threshold([4.0, 1.0, 2.0, 3.0]) == 2.5  # mean of the middle two
  ties = np.array([1.0, 2.0, 2.0, 2.0, 3.0])
  r = orft.threshold(ties)
  assert r == 2.0
  # PPL < R: the tied median values are rejected.
  np.testing.assert_array_equal(
      orft.accept(ties, r), [True, False, False, False, False])
  assert orft.threshold([1.0, 2.0, 3.0, 4.0, 5.0], quantile=0.25) == 2.0
  assert orft.threshold([1.0, 2.0, 3.0, 4.0, 5.0], quantile=1.0) == 5.0
  assert orft.threshold([1.0, np.nan, 3.0, np.inf]) == 2.0  # finite only
  np.testing.assert_array_equal(
      orft.accept([1.0, 2.0, np.nextafter(2.0, 3.0), np.nan], 2.0),
      [True, False, False, False])
  with pytest.raises(ValueError, match="quantile"):
    orft.threshold([1.0], quantile=1.5)
  with pytest.raises(ValueError, match="no finite"):
    orft.threshold([np.nan])


def test_acceptance_stats_on_a_hand_example():
  # Three prompts of k = 3 candidates; R = the median = 5.
  ppl = np.array([1.0, 2.0, 9.0, 4.0, 5.0, 6.0, 3.0, 7.0, 8.0])
  prompts = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
  r = orft.threshold(ppl)
  assert r == 5.0
  accepted = orft.accept(ppl, r)
  stats = orft.acceptance_stats(ppl, accepted, prompts, r)
  assert stats["candidates"] == 9 and stats["accepted"] == 4
  assert stats["acceptance_rate"] == pytest.approx(4 / 9)
  assert stats["threshold"] == 5.0 and stats["prompts"] == 3
  assert stats["max_candidates_per_prompt"] == 3
  # Prompt 0 keeps 2 (1, 2), prompt 1 keeps 1 (4), prompt 2 keeps 1 (3).
  assert stats["kept_per_prompt"] == [0, 2, 1, 0]
  assert stats["prompts_with_none"] == 0
  assert stats["ppl_percentiles"]["p50"] == 5.0
  assert stats["ppl_percentiles"]["p25"] == 3.0
  assert stats["accepted_ppl_median"] == 2.5
  assert stats["rejected_ppl_median"] == 7.0
  assert stats["nonfinite_ppl"] == 0
  json.dumps(stats)  # JSON-ready
  none = orft.acceptance_stats(ppl, np.zeros(9, bool), prompts, 0.5)
  assert none["kept_per_prompt"] == [3, 0, 0, 0]
  assert none["prompts_with_none"] == 3 and none["acceptance_rate"] == 0.0


def test_histogram_and_report_are_written(tmp_path):
  rng = np.random.default_rng(0)
  ppl = np.exp(rng.normal(1.5, 0.8, 60))
  ppl[3] = np.nan
  r = orft.threshold(ppl)
  path = orft.plot_ppl_histogram(ppl, r, tmp_path / "sub" / "h.png")
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
  prompts = np.repeat(np.arange(20), 3)
  stats = orft.write_report(tmp_path / "orft", ppl, orft.accept(ppl, r),
                            prompts, r)
  saved = json.loads((tmp_path / "orft" / orft.STATS_FILE).read_text())
  assert saved == stats and saved["nonfinite_ppl"] == 1
  assert saved["accepted"] == 29  # strictly below the median of 59 values
  assert (tmp_path / "orft" / orft.HISTOGRAM_FILE).stat().st_size > 5000
  with np.load(tmp_path / "orft" / orft.SCORES_FILE) as scores:
    np.testing.assert_array_equal(scores["prompt_ids"], prompts)

"""Trie-constrained beam search and sampling never leave the item catalogue."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taiji_jax.generate import constrained
from taiji_jax.quantize import semantic_ids as sid_lib

SIZES = (5, 4, 3)
OFFSETS = (3, 8, 12)  # 3 "text" tokens, then the SID tokens of each level
VOCAB = 15


def _sids(num_items=37, seed=0):
  """Random distinct SIDs of a (5, 4, 3) trie (at most 60 items)."""
  rng = np.random.default_rng(seed)
  flat = rng.choice(np.prod(SIZES), num_items, replace=False)
  codes = np.stack(np.unravel_index(flat, SIZES), 1)
  padded = np.concatenate([np.full((1, 3), -1), codes])
  return sid_lib.SemanticIds(padded, SIZES)


def _bigram(seed=0, scale=3.0):
  """A model whose next-token logits depend only on the last token."""
  table = scale * jax.random.normal(jax.random.key(seed), (VOCAB, VOCAB))

  def step_fn(tokens_n, cache):
    return table[tokens_n], {"last": tokens_n, "calls": cache["calls"] + 1}

  return table, step_fn


def _brute_force(table, sids, prompt_token, exclude=()):
  """Exact log p(SID) of every allowed item, best first."""
  logp = np.asarray(jax.nn.log_softmax(table, -1))
  out = []
  for item in range(1, sids.num_items + 1):
    if item in exclude:
      continue
    prev, total = prompt_token, 0.0
    for l, code in enumerate(sids.item_to_sid(item)):
      tok = OFFSETS[l] + code
      total += logp[prev, tok]
      prev = tok
    out.append((total, item))
  return sorted(out, key=lambda t: (-t[0], t[1]))


def _prefill(table, prompt_b):
  return table[prompt_b], {"last": prompt_b, "calls": jnp.zeros((), jnp.int32)}


def test_beam_search_with_all_beams_is_exact_enumeration():
  sids = _sids()
  table, step_fn = _bigram()
  prompt = jnp.array([0, 1, 2])
  logits, cache = _prefill(table, prompt)
  run = jax.jit(
      functools.partial(
          constrained.beam_search,
          step_fn,
          level_offsets=OFFSETS,
          num_beams=sids.num_items))
  out = run(logits, cache, sids.trie)
  for b, p in enumerate(prompt.tolist()):
    want = _brute_force(table, sids, p)
    np.testing.assert_array_equal(
        np.asarray(out.items[b]), [i for _, i in want])
    np.testing.assert_allclose(
        np.asarray(out.scores[b]), [s for s, _ in want], rtol=1e-5)
    for item, code in zip(np.asarray(out.items[b]), np.asarray(out.codes[b])):
      assert sids.item_to_sid(int(item)) == tuple(code.tolist())


def test_beam_search_excludes_history_without_losing_other_items():
  sids = _sids()
  table, step_fn = _bigram(seed=1)
  # Exclude the 10 best items of prompt 0 (with a repeat and padding).
  best = [i for _, i in _brute_force(table, sids, 0)][:10]
  history = jnp.array([best + [best[0], 0], best[5:] + [0] * 7])
  logits, cache = _prefill(table, jnp.array([0, 0]))
  out = jax.jit(
      functools.partial(
          constrained.beam_search, step_fn, level_offsets=OFFSETS,
          num_beams=8))(
              logits, cache, sids.trie, exclude_bh=history, paths=sids.paths)
  for b in range(2):
    excluded = set(np.asarray(history[b]).tolist()) - {0}
    want = [i for _, i in _brute_force(table, sids, 0, excluded)][:8]
    got = np.asarray(out.items[b]).tolist()
    assert not excluded & set(got)
    # Beam search with 8 beams is not exhaustive, but on this small trie the
    # best item must be found and every returned item must be valid.
    assert got[0] == want[0]
    assert all(1 <= i <= sids.num_items for i in got)
    assert len(set(got)) == 8


def test_fewer_allowed_items_than_beams_pads_with_zero():
  sids = _sids(num_items=6)
  table, step_fn = _bigram(seed=2)
  history = jnp.array([[1, 2, 3, 4]])
  logits, cache = _prefill(table, jnp.array([0]))
  out = constrained.beam_search(
      step_fn,
      logits,
      cache,
      sids.trie,
      OFFSETS,
      num_beams=4,
      exclude_bh=history,
      paths=sids.paths)
  assert sorted(np.asarray(out.items[0, :2]).tolist()) == [5, 6]
  np.testing.assert_array_equal(np.asarray(out.items[0, 2:]), [0, 0])
  assert np.all(np.isneginf(np.asarray(out.scores[0, 2:])))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_ten_thousand_samples_are_valid_items_outside_the_history(temperature):
  sids = _sids(num_items=50, seed=3)
  table, step_fn = _bigram(seed=4, scale=6.0)
  n = 10_000
  rng = np.random.default_rng(5)
  history = rng.integers(0, 51, (n, 12))
  prompt = jnp.asarray(rng.integers(0, 3, n))
  logits, cache = _prefill(table, prompt)
  out = jax.jit(
      functools.partial(
          constrained.sample,
          step_fn,
          level_offsets=OFFSETS,
          temperature=temperature))(
              logits,
              cache,
              sids.trie,
              key=jax.random.key(0),
              exclude_bh=jnp.asarray(history),
              paths=sids.paths)
  items = np.asarray(out.items[:, 0])
  assert np.all((items >= 1) & (items <= 50))
  assert not np.any(items[:, None] == history)
  # The sampled codes are the items' SIDs and the scores their log-probs.
  codes = np.asarray(out.codes[:, 0])
  np.testing.assert_array_equal(codes, sids.codes[items])
  logp = np.asarray(jax.nn.log_softmax(table, -1))
  prev = np.asarray(prompt)
  want = np.zeros(n)
  for l in range(3):
    tok = OFFSETS[l] + codes[:, l]
    want += logp[prev, tok]
    prev = tok
  np.testing.assert_allclose(np.asarray(out.scores[:, 0]), want, rtol=1e-4)


def test_ten_thousand_beam_decodes_are_valid_distinct_and_sorted():
  sids = _sids(num_items=50, seed=6)
  table, step_fn = _bigram(seed=7, scale=6.0)
  n, w = 2_000, 5  # 10,000 decoded items
  rng = np.random.default_rng(8)
  history = rng.integers(0, 51, (n, 12))
  logits, cache = _prefill(table, jnp.asarray(rng.integers(0, 3, n)))
  out = jax.jit(
      functools.partial(
          constrained.beam_search, step_fn, level_offsets=OFFSETS,
          num_beams=w))(
              logits,
              cache,
              sids.trie,
              exclude_bh=jnp.asarray(history),
              paths=sids.paths)
  items = np.asarray(out.items)
  scores = np.asarray(out.scores)
  assert np.all((items >= 1) & (items <= 50))
  assert not np.any(items[:, :, None] == history[:, None, :])
  assert all(len(set(row)) == w for row in items.tolist())
  assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_temperature_sampling_matches_the_constrained_distribution():
  sids = _sids(num_items=8, seed=9)
  table, step_fn = _bigram(seed=10)
  n = 20_000
  logits, cache = _prefill(table, jnp.zeros((n,), jnp.int32))
  out = constrained.sample(step_fn, logits, cache, sids.trie, OFFSETS,
                           jax.random.key(1))
  # Exact distribution of the constrained sampler: per level, softmax over
  # the allowed tokens only.
  logp = np.asarray(jax.nn.log_softmax(table, -1))
  probs = {}
  for item in range(1, 9):
    sid = sids.item_to_sid(item)
    prev, p = 0, 1.0
    for l in range(3):
      prefix = sid[:l]
      allowed = sorted({
          sids.item_to_sid(i)[l]
          for i in range(1, 9)
          if sids.item_to_sid(i)[:l] == prefix
      })
      w = np.exp(logp[prev, [OFFSETS[l] + a for a in allowed]])
      p *= w[allowed.index(sid[l])] / w.sum()
      prev = OFFSETS[l] + sid[l]
    probs[item] = p
  assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
  counts = np.bincount(np.asarray(out.items[:, 0]), minlength=9)[1:] / n
  np.testing.assert_allclose(
      counts, [probs[i] for i in range(1, 9)], atol=0.015)


def _random_decoder_setup(num_items=60, seed=11):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from taiji_jax.models import decoder as decoder_lib  # pylint: disable=g-import-not-at-top
  sids = _sids(num_items=num_items, seed=seed)
  cfg = decoder_lib.DecoderConfig.tiny(vocab_size=VOCAB + 6)
  model = decoder_lib.Decoder(cfg, rngs=nnx.Rngs(seed))
  # Larger logits than the default init, so the model has strong opinions
  # that the constraint must override.
  model.embed[...] = model.embed[...] * 40.0
  return sids, model


def _run_decoder(fn, model, *args, **kwargs):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, *args):
    return fn(nnx.merge(graphdef, state), *args, **kwargs)

  return run(state, *args)


@pytest.mark.parametrize("mode", ["beam", "sample_t0.5", "sample_t2"])
def test_ten_thousand_decodes_from_a_random_decoder_are_valid(mode):
  from taiji_jax.generate import recommend  # pylint: disable=g-import-not-at-top
  sids, model = _random_decoder_setup()
  rng = np.random.default_rng(12)
  beams = 5
  n = 2_000 if mode == "beam" else 10_000
  prompts = rng.integers(0, VOCAB + 6, (n, 6))
  prompts[:, :2] = np.where(rng.random((n, 2)) < 0.5, 0, prompts[:, :2])
  prompts[:, -1] = np.maximum(prompts[:, -1], 1)  # last token is real
  history = jnp.asarray(rng.integers(0, 61, (n, 15)))
  if mode == "beam":
    out = _run_decoder(
        lambda m, p, h: recommend.recommend(
            m, p, sids.trie, OFFSETS, beams, exclude_bh=h, paths=sids.paths),
        model, jnp.asarray(prompts), history)
  else:
    temperature = float(mode.split("_t")[1])
    out = _run_decoder(
        lambda m, p, h: recommend.sample_items(
            m,
            p,
            sids.trie,
            OFFSETS,
            jax.random.key(3),
            temperature=temperature,
            exclude_bh=h,
            paths=sids.paths), model, jnp.asarray(prompts), history)
  items = np.asarray(out.items)
  assert items.size == 10_000
  assert np.all((items >= 1) & (items <= sids.num_items))
  assert not np.any(items[:, :, None] == np.asarray(history)[:, None, :])
  np.testing.assert_array_equal(np.asarray(out.codes), sids.codes[items])
  assert all(len(set(row)) == row.size for row in items)
  assert np.all(np.isfinite(np.asarray(out.scores)))
  # Unconstrained, this model's first token is mostly not a valid first SID
  # token: the constraint, not the model, keeps the outputs valid.
  logits = np.asarray(
      model(
          jnp.asarray(prompts[:500]),
          attention_mask_bt=jnp.asarray(prompts[:500] != 0)))
  first = logits[:, -1].argmax(-1) - OFFSETS[0]
  valid_first = set(np.unique(sids.codes[1:, 0]).tolist())
  assert np.mean([f in valid_first for f in first]) < 0.5

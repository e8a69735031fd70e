"""Think-then-recommend decoding against no-cache references and hand cases.

The cached, batched decoding of `generate.think` is checked row by row
against plain references: the rationale recomputed greedily with full
forward passes (no cache) over each row's own unpadded sequence, the SID
scores recomputed exactly the same way after the row's full prompt
`[prompt] <think> rationale </think> <answer>`, and the beams of the plain
`recommend.recommend` on those full prompts written out as contiguous
sequences. If the masked <pad> that finished rows feed were visible to the
decoder (attended or advancing RoPE positions), they would disagree.

Vocabulary layout: specials 0..7 (<pad> 0, <think> 4, </think> 5, <answer> 6,
</answer> 7), the SID tokens of the (5, 4, 3) levels from 8, 13 and 17, text
pieces 20..39.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taiji_jax.generate import recommend
from taiji_jax.generate import think
from taiji_jax.quantize import semantic_ids as sid_lib
from taiji_jax.testing import decoders

PAD, THINK, THINK_END, ANSWER, ANSWER_END = 0, 4, 5, 6, 7
SIZES = (5, 4, 3)
OFFSETS = (8, 13, 17)
TEXT = 20
V = 40
MAX_THINK = 6
BEAMS = 4
# A rationale may only use three text pieces and the stop token, so that a
# random model closes its thought early on some rows and not on others.
THINK_TOKENS = (THINK_END, 20, 21, 22)


def _allowed(tokens):
  mask = np.zeros(V, bool)
  mask[list(tokens)] = True
  return mask


ALLOWED = _allowed(THINK_TOKENS)
MARKERS = dict(think_id=THINK, think_end_id=THINK_END, answer_id=ANSWER)


@pytest.fixture(scope="module")
def sids():
  """37 random distinct SIDs of a (5, 4, 3) trie."""
  rng = np.random.default_rng(0)
  flat = rng.choice(np.prod(SIZES), 37, replace=False)
  codes = np.stack(np.unravel_index(flat, SIZES), 1)
  return sid_lib.SemanticIds(np.concatenate([np.full((1, 3), -1), codes]),
                             SIZES)


@pytest.fixture(scope="module")
def model():
  # Random parameters (std 0.5): far from uniform logits, so greedy
  # choices have clear margins and depend on the context (with this seed
  # some rows close their thought, some not).
  return decoders.random_decoder(V)


@pytest.fixture(scope="module")
def prompts():
  """(8, 7) left-padded text prompts of real lengths 2..7."""
  rng = np.random.default_rng(100)
  b, t = 8, 7
  lengths = rng.permutation(np.arange(b)) % (t - 1) + 2
  out = np.zeros((b, t), np.int32)
  for row, n in enumerate(lengths):
    out[row, t - n:] = rng.integers(TEXT, V, n)
  assert len(set(lengths.tolist())) > 3
  return out


def _real(prompt_row):
  return [int(x) for x in prompt_row if x != PAD]


_FORWARD_SHAPE = (32, 32)
_forward = nnx.jit(lambda m, tokens: m(tokens))


def _last_logits(model, seqs):
  """Next-token logits after each sequence, by a full forward pass.

  No cache and no attention mask: the sequences are right-padded to one
  shape (one compile), and causal attention alone keeps the padding out of
  every real position, so each row reads exactly its own unpadded tokens.

  Returns:
    Per sequence, (len(seq), V) float64 logits at each of its positions.
  """
  rows, width = _FORWARD_SHAPE
  assert len(seqs) <= rows and max(map(len, seqs)) <= width
  tokens = np.zeros(_FORWARD_SHAPE, np.int32)
  for row, seq in enumerate(seqs):
    tokens[row, :len(seq)] = seq
  logits = np.asarray(_forward(model, jnp.asarray(tokens)), np.float64)
  return [logits[row, :len(seq)] for row, seq in enumerate(seqs)]


def _greedy_reference(model, contexts, allowed, stop_id, max_new):
  """Greedy continuations of each context, one full forward pass a step."""
  seqs = [list(c) for c in contexts]
  outs = [[] for _ in contexts]
  for _ in range(max_new):
    live = [r for r, out in enumerate(outs) if not out or out[-1] != stop_id]
    if not live:
      break
    logits = _last_logits(model, [seqs[r] for r in live])
    for r, logits_tv in zip(live, logits):
      token = int(np.argmax(np.where(allowed, logits_tv[-1], -np.inf)))
      outs[r].append(token)
      seqs[r].append(token)
  return outs


def _sid_loglik(model, context, codes_kl):
  """Exact log p(SID | context) of each SID by a full forward pass."""
  seqs = [list(context) + [o + int(c) for o, c in zip(OFFSETS, codes)]
          for codes in codes_kl]
  out = []
  for seq, logits_tv in zip(seqs, _last_logits(model, seqs)):
    logp = logits_tv - logits_tv.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    n = len(context)
    out.append(sum(logp[n - 1 + l, seq[n + l]] for l in range(len(OFFSETS))))
  return np.array(out)


def _check_thought(tokens, length, closed, generated, stop_id, budget):
  """`Thought` fields of one row against the reference token list."""
  stopped = bool(generated) and generated[-1] == stop_id
  assert bool(closed) == stopped
  assert int(length) == len(generated) - int(stopped)
  want = generated + [PAD] * (budget - len(generated))
  np.testing.assert_array_equal(tokens, want)


def _think_then_recommend(model, sids, **static):
  """Jitted `think_then_recommend` with the static arguments bound."""
  run = nnx.jit(lambda m, p, arrays: think.think_then_recommend(
      m, p, sids.trie, OFFSETS, BEAMS, allowed_v=jnp.asarray(ALLOWED),
      max_think=MAX_THINK, paths=sids.paths, **MARKERS, **static, **arrays))
  # Arrays (the key, the history) are traced; everything else is static.
  return lambda p, **arrays: run(model, jnp.asarray(p), arrays)


def test_think_token_mask_is_text_plus_stop():
  mask = think.think_token_mask(np.arange(V) >= TEXT, THINK_END)
  assert mask.shape == (V,) and mask.dtype == bool
  np.testing.assert_array_equal(np.flatnonzero(mask), [THINK_END] +
                                list(range(TEXT, V)))
  # Wherever the text ids lie: a pretrained tokenizer's come first.
  first = think.think_token_mask(np.arange(V) < 10, THINK_END)
  np.testing.assert_array_equal(np.flatnonzero(first),
                                sorted(set(range(10)) | {THINK_END}))


def test_greedy_think_then_recommend_matches_uncached_reference(
    model, prompts, sids):
  out = _think_then_recommend(model, sids)(prompts)
  thought = jax.tree.map(np.asarray, out.thought)
  assert thought.tokens.shape == (len(prompts), MAX_THINK)
  # Precondition: rows that close early (so feed masked <pad> for the rest
  # of the budget, one after real rationale tokens), and rows that the
  # budget closes.
  assert thought.closed.any() and not thought.closed.all()
  assert np.any(thought.closed & (thought.length > 0))
  items, scores = np.asarray(out.items), np.asarray(out.scores)
  codes = np.asarray(out.codes)
  np.testing.assert_array_equal(codes, sids.codes[items])
  assert np.all(items > 0) and np.all(scores[:, :-1] >= scores[:, 1:])
  assert all(len(set(row)) == BEAMS for row in items.tolist())
  # (a) The rationale, step by step over each row's unpadded sequence.
  contexts = [_real(prompt) + [THINK] for prompt in prompts]
  generated = _greedy_reference(model, contexts, ALLOWED, THINK_END,
                                MAX_THINK)
  fulls = []
  for row, context in enumerate(contexts):
    _check_thought(thought.tokens[row], thought.length[row],
                   thought.closed[row], generated[row], THINK_END, MAX_THINK)
    # The full prompt, the thought closed for the model where it did not
    # close it itself.
    rationale = generated[row][:int(thought.length[row])]
    fulls.append(context + rationale + [THINK_END, ANSWER])
    # (b) The scores are the exact SID log-likelihoods after that prompt.
    np.testing.assert_allclose(
        scores[row], _sid_loglik(model, fulls[-1], codes[row]), atol=1e-4)
  # (b) Plain beam search on the full prompts (each one contiguous, only
  # left-padded to a common width) gives the same beams.
  width = max(map(len, fulls))
  padded = np.array([[PAD] * (width - len(f)) + f for f in fulls], np.int32)
  run = nnx.jit(
      lambda m, p: recommend.recommend(m, p, sids.trie, OFFSETS, BEAMS))
  want = run(model, jnp.asarray(padded))
  np.testing.assert_array_equal(items, np.asarray(want.items))
  np.testing.assert_allclose(scores, np.asarray(want.scores), atol=1e-4)


def test_merge_beams_keeps_best_score_of_each_distinct_item():
  ninf = -np.inf
  items = np.array([[3, 5, 3, 0, 7, 5, 0], [2, 2, 0, 0, 9, 9, 0]], np.int32)
  scores = np.array([[-1.0, -2.0, -0.5, ninf, -3.0, -4.0, 5.0],
                     [-1.0, -0.2, ninf, ninf, -5.0, -6.0, ninf]], np.float32)
  # Codes (item, position) tell which duplicate was kept.
  codes = np.stack([items, np.broadcast_to(np.arange(7), items.shape)], -1)
  got_items, got_scores, got_codes = map(
      np.asarray,
      jax.jit(think.merge_beams, static_argnums=3)(jnp.asarray(items),
                                                   jnp.asarray(scores),
                                                   jnp.asarray(codes), 4))
  np.testing.assert_array_equal(got_items, [[3, 5, 7, 0], [2, 9, 0, 0]])
  np.testing.assert_array_equal(
      got_scores,
      np.array([[-0.5, -2.0, -3.0, ninf], [-0.2, -5.0, ninf, ninf]],
               np.float32))
  np.testing.assert_array_equal(got_codes[0, :3], [[3, 2], [5, 1], [7, 4]])
  np.testing.assert_array_equal(got_codes[1, :2], [[2, 1], [9, 4]])
  # At least k distinct items: no padding.
  got_items, got_scores, _ = think.merge_beams(
      jnp.asarray(items), jnp.asarray(scores), jnp.asarray(codes), 2)
  np.testing.assert_array_equal(np.asarray(got_items), [[3, 5], [2, 9]])
  np.testing.assert_array_equal(
      np.asarray(got_scores), np.array([[-0.5, -2.0], [-0.2, -5.0]],
                                       np.float32))


def test_format_check_flags_each_violation(sids):
  item = 11
  a, b, c = (o + int(x) for o, x in zip(OFFSETS, sids.codes[item]))
  # A path through valid codes of every level that is no item's SID.
  sid_set = {tuple(r) for r in sids.codes[1:].tolist()}
  missing = next((i, j, k) for i in range(5) for j in range(4)
                 for k in range(3) if (i, j, k) not in sid_set)
  assert sids.lookup(np.array([missing]))[0] == 0
  x, y, z = (o + int(v) for o, v in zip(OFFSETS, missing))
  cases = {
      # name: (tokens, (think_open, think_closed, answer, compliant))
      "compliant": ([4, 25, 30, 5, 6, a, b, c, 7], (1, 1, 1, 1)),
      "empty_thought": ([4, 5, 6, a, b, c, 7, 33], (1, 1, 1, 1)),
      "no_think": ([25, 30, 5, 6, a, b, c, 7], (0, 0, 0, 0)),
      "sid_in_think": ([4, 25, a, 5, 6, a, b, c, 7], (1, 0, 0, 0)),
      "marker_in_think": ([4, 25, 6, 5, 6, a, b, c, 7], (1, 0, 0, 0)),
      "no_think_end": ([4, 25, 30, 31, 32, 6, a, b, c, 7], (1, 0, 0, 0)),
      "no_answer": ([4, 25, 5, a, b, c, 7], (1, 1, 0, 0)),
      "level_order": ([4, 25, 5, 6, b, a, c, 7], (1, 1, 0, 0)),
      "short_sid": ([4, 25, 5, 6, a, b, 7], (1, 1, 0, 0)),
      "not_an_item": ([4, 25, 5, 6, x, y, z, 7], (1, 1, 1, 0)),
      "no_answer_end": ([4, 25, 5, 6, a, b, c, 0], (1, 1, 0, 0)),
      "truncated": ([4, 25, 30, 31, 32, 33, 34, 5, 6, a, b, c], (1, 1, 0, 0)),
  }
  n = 12
  tokens = np.zeros((len(cases), n), np.int32)
  for row, (seq, _) in enumerate(cases.values()):
    tokens[row, :len(seq)] = seq
  assert tokens[-1, -1] == c  # the truncated row ends at its last SID token
  run = jax.jit(lambda t: think.format_check(
      t, sids.trie, OFFSETS, **MARKERS, answer_end_id=ANSWER_END,
      text_mask_v=np.arange(V) >= TEXT))
  flags = jax.tree.map(np.asarray, run(jnp.asarray(tokens)))
  names = ("think_open", "think_closed", "answer", "compliant")
  assert set(flags) == set(names)
  for name in names:
    assert flags[name].shape == (len(cases),)
    assert flags[name].dtype == np.float32
  for row, (case, (_, want)) in enumerate(cases.items()):
    got = tuple(int(flags[name][row]) for name in names)
    assert got == want, case


def test_sampled_traces_are_merged_into_distinct_allowed_items(
    model, prompts, sids):
  traces = 3
  rng = np.random.default_rng(7)
  history = np.zeros((len(prompts), 36), np.int32)
  for row in range(len(prompts)):
    history[row, :6] = rng.choice(np.arange(1, 38), 6, replace=False)
  history[1, 6] = history[1, 0]  # a repeat
  # Row 0 may only receive the two items it has not seen: its traces' beams
  # (and the merge) are padded with 0 / -inf.
  history[0, :35] = np.setdiff1d(np.arange(1, 38), [4, 29])
  left = {4, 29}
  assert set(history[0].tolist()) - {0} == set(range(1, 38)) - left
  run = _think_then_recommend(model, sids, num_traces=traces, temperature=1.0)
  key = jax.random.key(3)
  out = run(prompts, key=key, exclude_bh=history)
  items, scores = np.asarray(out.items), np.asarray(out.scores)
  assert items.shape == scores.shape == (len(prompts), BEAMS)
  assert set(items[0, :2].tolist()) == left
  np.testing.assert_array_equal(items[0, 2:], [0, 0])
  assert np.all(np.isneginf(scores[0, 2:]))
  for row in range(1, len(prompts)):
    assert np.all((items[row] >= 1) & (items[row] <= sids.num_items))
    assert len(set(items[row].tolist())) == BEAMS
    assert not set(items[row].tolist()) & set(history[row].tolist())
  real = items > 0
  assert np.all(np.isfinite(scores[real]))
  assert np.all(scores[:, :-1] >= scores[:, 1:])  # best first
  np.testing.assert_array_equal(
      np.asarray(out.codes)[real], sids.codes[items[real]])

  # The thoughts: (row, trace) major, only allowed tokens, <pad> after </think>.
  thought = jax.tree.map(np.asarray, out.thought)
  assert thought.tokens.shape == (len(prompts) * traces, MAX_THINK)
  for tokens, length, closed in zip(*thought):
    assert set(tokens[:length].tolist()) <= set(THINK_TOKENS[1:])
    if closed:
      assert tokens[length] == THINK_END
      assert np.all(tokens[length + 1:] == PAD)
    else:
      assert length == MAX_THINK
  # Sampled, not greedy: a user's traces are not all the same.
  per_user = thought.tokens.reshape(len(prompts), traces, MAX_THINK)
  assert any(len({t.tobytes() for t in user}) > 1 for user in per_user)

  # Each item scores its best exact log-likelihood over the user's traces
  # (prompt b, trace t at row b * traces + t), under every one of which it
  # is a valid candidate.
  for row in range(len(prompts)):
    contexts = []
    for t in range(traces):
      tokens, length, _ = (x[row * traces + t] for x in thought)
      contexts.append(_real(prompts[row]) + [THINK] +
                      tokens[:length].tolist() + [THINK_END, ANSWER])
    k = int(real[row].sum())
    loglik_tk = np.stack([
        _sid_loglik(model, context, np.asarray(out.codes)[row, :k])
        for context in contexts
    ])
    np.testing.assert_allclose(scores[row, :k], loglik_tk.max(0), atol=1e-4)

  # Deterministic per key; another key reasons differently.
  again = run(prompts, key=key, exclude_bh=history)
  for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(out)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  other = run(prompts, key=jax.random.key(4), exclude_bh=history)
  assert not np.array_equal(np.asarray(other.thought.tokens), thought.tokens)


def test_generate_until_samples_only_allowed_tokens_deterministically(
    model, prompts):
  allowed = _allowed([THINK_END, 24, 27, 31, 33, 38])
  budget = 8

  @nnx.jit
  def run(m, p, key):
    b, t = p.shape
    cache = m.init_cache(b, t + budget)
    logits, cache = m.decode_step(p, cache, attention_mask_bt=p != PAD)
    return think.generate_until(
        m, logits[:, -1], cache, THINK_END, budget,
        allowed_v=jnp.asarray(allowed), key=key, temperature=2.0)[0]

  p = jnp.asarray(np.repeat(prompts, 4, 0))  # 32 rows, 4 per prompt
  out = jax.tree.map(np.asarray, run(model, p, jax.random.key(0)))
  assert out.tokens.shape == (32, budget)
  for tokens, length, closed in zip(*out):
    live = tokens[:length + int(closed)]
    assert allowed[live].all()
    assert np.all(tokens[:length] != THINK_END)
    assert (tokens[length] == THINK_END) if closed else (length == budget)
    assert np.all(tokens[length + int(closed):] == PAD)
  assert out.closed.any()
  assert len({row.tobytes() for row in out.tokens}) > 8
  again = jax.tree.map(np.asarray, run(model, p, jax.random.key(0)))
  for got, want in zip(again, out):
    np.testing.assert_array_equal(got, want)
  other = jax.tree.map(np.asarray, run(model, p, jax.random.key(1)))
  assert not np.array_equal(other.tokens, out.tokens)


def test_free_generate_is_greedy_and_never_emits_pad(model, prompts):
  # Any token can be the stop; this one is this model's choice on some rows
  # soon, on others late or never.
  stop, budget = 18, 10
  run = nnx.jit(lambda m, p: think.free_generate(m, p, stop, budget))
  out = jax.tree.map(np.asarray, run(model, jnp.asarray(prompts)))
  assert out.tokens.shape == (len(prompts), budget)
  assert out.closed.any() and not out.closed.all()
  generated = _greedy_reference(model, [_real(p) for p in prompts],
                                np.arange(V) != PAD, stop, budget)
  for row in range(len(prompts)):
    tokens, length, closed = (x[row] for x in out)
    assert np.all(tokens[:length + int(closed)] != PAD)
    _check_thought(tokens, length, closed, generated[row], stop, budget)


def test_invalid_arguments_raise(model, prompts, sids):
  p = jnp.asarray(prompts[:2])
  common = dict(
      allowed_v=jnp.asarray(ALLOWED), max_think=MAX_THINK, **MARKERS)
  with pytest.raises(ValueError, match="num_traces"):
    think.think_then_recommend(model, p, sids.trie, OFFSETS, BEAMS,
                               num_traces=2, **common)
  with pytest.raises(ValueError, match="num_traces"):
    think.think_then_recommend(model, p, sids.trie, OFFSETS, BEAMS,
                               key=jax.random.key(0), num_traces=0, **common)
  logits = jnp.zeros((2, V))
  cache = model.init_cache(2, 4)
  with pytest.raises(ValueError, match="max_new"):
    think.generate_until(model, logits, cache, THINK_END, 0)
  with pytest.raises(ValueError, match="temperature"):
    think.generate_until(model, logits, cache, THINK_END, 3,
                         key=jax.random.key(0), temperature=0.0)

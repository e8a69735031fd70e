"""SemanticIds, collision resolution, the trie, fusion and the quality report."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taiji_jax.quantize import collisions
from taiji_jax.quantize import fusion
from taiji_jax.quantize import quality
from taiji_jax.quantize import semantic_ids as sid_lib


def _random_codes(n, sizes, seed=0):
  rng = np.random.default_rng(seed)
  return np.stack([rng.integers(0, k, n) for k in sizes], 1)


def _with_padding(codes):
  return np.concatenate([np.full((1, codes.shape[1]), -1), codes])


def _trie_paths(trie):
  """Every (prefix, node) reachable in the trie, by depth (from the CSR)."""
  frontier = [((), 0)]
  paths = {0: frontier}
  for l, level in enumerate(trie):
    nxt = []
    for prefix, node in frontier:
      for e in range(level.offsets[node], level.offsets[node + 1]):
        nxt.append((prefix + (int(level.tokens[e]),), int(level.children[e])))
    paths[l + 1] = nxt
    frontier = nxt
  return paths


@pytest.mark.parametrize("method", collisions.METHODS)
def test_resolution_makes_codes_unique_and_keeps_semantic_levels(method):
  codes = _random_codes(500, (4, 3, 2))  # 24 tuples for 500 items
  assert collisions.collision_stats(codes)["collision_rate"] > 0.9
  raw = [f"item{i}" for i in range(500)]
  final, size = collisions.resolve(codes, method, raw_ids=raw, hash_size=64)
  assert final.shape == (500, 4)
  np.testing.assert_array_equal(final[:, :3], codes)
  assert len(np.unique(final, axis=0)) == 500
  assert final[:, 3].max() < size
  assert collisions.collision_stats(final)["collision_rate"] == 0.0


def test_extra_level_numbers_groups_in_item_order():
  codes = np.array([[1, 2], [0, 0], [1, 2], [3, 3], [1, 2]])
  final, size = collisions.resolve(codes, "extra_level")
  np.testing.assert_array_equal(final[:, 2], [0, 0, 1, 0, 2])
  assert size == 3


def test_hash_level_depends_on_raw_id_not_order():
  codes = np.zeros((5, 1), int)
  raw = ["a", "b", "c", "d", "e"]
  final, _ = collisions.resolve(codes, "hash", raw_ids=raw, hash_size=1024)
  # These five ids do not clash in 1024 slots, so each last code is exactly
  # the item's own hash.
  hashes = [collisions.stable_hash(r, 1024) for r in raw]
  assert len(set(hashes)) == 5
  np.testing.assert_array_equal(final[:, 1], hashes)
  perm = [3, 0, 4, 1, 2]
  again, _ = collisions.resolve(
      codes[perm], "hash", raw_ids=[raw[i] for i in perm], hash_size=1024)
  np.testing.assert_array_equal(again[:, 1], final[perm, 1])


def test_hash_level_too_small_is_a_clear_error():
  with pytest.raises(ValueError, match="5 items share one semantic code"):
    collisions.resolve(
        np.zeros((5, 2), int), "hash", raw_ids=list("abcde"), hash_size=4)
  with pytest.raises(ValueError, match="unknown collision method"):
    collisions.resolve(np.zeros((5, 2), int), "random")


def test_trie_holds_every_prefix_and_nothing_else():
  sizes = (5, 4, 3)
  codes = np.unique(_random_codes(40, sizes, seed=1), axis=0)
  sids = sid_lib.SemanticIds(_with_padding(codes), sizes)
  paths = _trie_paths(sids.trie)
  for depth in range(1, 4):
    want = {tuple(row[:depth]) for row in codes.tolist()}
    got = [p for p, _ in paths[depth]]
    assert len(got) == len(set(got))
    assert set(got) == want
  # Leaves are the items, and each leaf is the item with that SID.
  for prefix, item in paths[3]:
    assert sids.item_to_sid(item) == prefix
    assert sids.sid_to_item(prefix) == item
  assert sorted(item for _, item in paths[3]) == list(range(1, len(codes) + 1))


def test_jitted_mask_and_step_follow_the_trie():
  sizes = (5, 4, 7)
  codes = np.unique(_random_codes(70, sizes, seed=6), axis=0)
  sids = sid_lib.SemanticIds(_with_padding(codes), sizes)
  paths = _trie_paths(sids.trie)
  mask_fn = jax.jit(sid_lib.trie_valid_mask)
  next_fn = jax.jit(sid_lib.trie_next)
  for depth, level in enumerate(sids.trie):
    nodes = sorted({node for _, node in paths[depth]})
    prefix_of = {node: p for p, node in paths[depth]}
    mask = np.asarray(mask_fn(level, jnp.asarray(nodes, jnp.int32)))
    assert mask.shape == (len(nodes), sizes[depth])
    for row, node in zip(mask, nodes):
      want = {p[-1] for p, _ in paths[depth + 1] if p[:-1] == prefix_of[node]}
      assert set(np.flatnonzero(row).tolist()) == want
    # Every (node, token) pair: the step agrees with the dense table.
    dense = level.to_dense()
    node_b = np.repeat(np.arange(len(nodes)), sizes[depth])
    token_b = np.tile(np.arange(sizes[depth]), len(nodes))
    got = np.asarray(next_fn(level, jnp.asarray(node_b), jnp.asarray(token_b)))
    np.testing.assert_array_equal(got, dense[node_b, token_b])
    np.testing.assert_array_equal(
        sid_lib.trie_next(level, node_b, token_b, np), got)
    np.testing.assert_array_equal(mask, dense[nodes] >= 0)


def test_trie_memory_is_linear_in_items_not_codebook_size():
  # One huge collision group on the last level (as with extra_level at 1M
  # items): edges stay O(items) although the last level has 1000 codes.
  codes = np.stack([np.zeros(1000, int), np.arange(1000)], 1)
  sids = sid_lib.SemanticIds(_with_padding(codes), (1, 1000))
  assert sids.trie[1].tokens.shape == (1000,)
  assert sids.trie[1].max_degree == 1000
  assert sum(level.nbytes for level in sids.trie) < 10 * 4 * 1000


def test_lookup_and_walk_trie_in_jit_agree_with_the_dict():
  sizes = (6, 5, 4)
  codes = np.unique(_random_codes(60, sizes, seed=2), axis=0)
  sids = sid_lib.SemanticIds(_with_padding(codes), sizes)
  queries = np.concatenate([
      codes,
      _random_codes(200, sizes, seed=3),
      np.array([[-1, 0, 0], [0, 5, 0], [6, 0, 0]])
  ])
  want = []
  for q in queries.tolist():
    try:
      want.append(sids.sid_to_item(q))
    except KeyError:
      want.append(0)
  np.testing.assert_array_equal(sids.lookup(queries), want)
  got = jax.jit(sid_lib.walk_trie)(sids.trie, jnp.asarray(queries))
  np.testing.assert_array_equal(np.asarray(got), want)


def test_non_unique_or_out_of_range_codes_are_rejected():
  codes = _with_padding(np.array([[0, 1], [0, 1], [1, 0]]))
  with pytest.raises(sid_lib.SemanticIdError, match=r"items \[1, 2\]"):
    sid_lib.SemanticIds(codes, (2, 2))
  with pytest.raises(sid_lib.SemanticIdError, match="level 1: item 2"):
    sid_lib.SemanticIds(_with_padding(np.array([[0, 1], [0, 2]])), (2, 2))
  with pytest.raises(sid_lib.SemanticIdError, match="row 0"):
    sid_lib.SemanticIds(np.array([[0, 0], [0, 1]]), (2, 2))
  with pytest.raises(sid_lib.SemanticIdError, match="2 codebook sizes"):
    sid_lib.SemanticIds(_with_padding(np.array([[0, 1, 1]])), (2, 2))


def test_save_load_round_trip_and_catalogue_check(tmp_path):
  sizes = (4, 4, 2)
  codes = np.unique(_random_codes(20, sizes, seed=4), axis=0)
  raw = [None] + [f"m{i}" for i in range(len(codes))]
  sids = sid_lib.SemanticIds(
      _with_padding(codes), sizes, sid_lib.catalogue_fingerprint(raw),
      {"quantizer": "test"})
  sids.save(tmp_path)
  loaded = sid_lib.SemanticIds.load(tmp_path, item_raw_ids=raw)
  np.testing.assert_array_equal(loaded.codes, sids.codes)
  assert loaded.codebook_sizes == sizes
  assert loaded.meta == {"quantizer": "test"}
  for a, b in zip(loaded.trie, sids.trie):
    np.testing.assert_array_equal(a.to_dense(), b.to_dense())
  swapped = raw[:1] + raw[2:3] + raw[1:2] + raw[3:]
  with pytest.raises(sid_lib.SemanticIdError, match="another item catalogue"):
    sid_lib.SemanticIds.load(tmp_path, item_raw_ids=swapped)
  with pytest.raises(
      sid_lib.SemanticIdError,
      match=f"SIDs for {len(codes)} items, the catalogue has {len(codes) + 1}"):
    sid_lib.SemanticIds.load(tmp_path, item_raw_ids=raw + ["extra"])
  with pytest.raises(FileNotFoundError, match="no semantic IDs"):
    sid_lib.SemanticIds.load(tmp_path / "nowhere")


def test_load_rejects_a_tampered_file(tmp_path):
  codes = _with_padding(np.array([[0, 1], [1, 0]]))
  sid_lib.SemanticIds(codes, (2, 2)).save(tmp_path)
  with np.load(tmp_path / sid_lib.FILE_NAME) as f:
    arrays = dict(f)
  arrays["codes"] = _with_padding(np.array([[0, 1], [0, 1]]))
  np.savez(tmp_path / sid_lib.FILE_NAME, **arrays)
  with pytest.raises(sid_lib.SemanticIdError, match="not unique"):
    sid_lib.SemanticIds.load(tmp_path)


def test_level_usage_entropy_and_perplexity():
  codes = np.array([[0, 0], [1, 0], [2, 0], [3, 0]])
  usage = quality.level_usage(codes, (8, 2))
  assert usage[0]["utilisation"] == 0.5
  assert usage[0]["perplexity"] == pytest.approx(4.0)
  assert usage[0]["normalised_entropy"] == pytest.approx(np.log(4) / np.log(8))
  assert usage[1]["perplexity"] == pytest.approx(1.0)


def test_label_purity_sees_planted_clusters_and_random_ones_do_not():
  rng = np.random.default_rng(0)
  genres = ["a", "b", "c", "d"]
  labels = [(genres[i % 4],) for i in range(400)]
  planted = np.array([i % 4 for i in range(400)])
  result = quality.label_purity(planted, labels)
  assert result["purity"] == 1.0
  assert result["lift"] > 3.0
  noise = quality.label_purity(rng.integers(0, 4, 400), labels)
  assert noise["lift"] < 1.2


def test_report_and_table():
  codes = _random_codes(300, (8, 8), seed=5)
  final, size = collisions.resolve(codes, "extra_level")
  labels = [("x",) if c < 4 else ("y",) for c in codes[:, 0]]
  rep = quality.report(codes, final, (8, 8, size), 0.25, labels, "genres")
  assert rep["collision_rate_after"] == 0.0
  assert rep["collisions_before"]["collision_rate"] > 0
  assert rep["coherence"]["purity"] == 1.0
  table = quality.format_reports({"one": rep, "two": rep})
  assert "L1 genres purity" in table and "0.2500" in table


def test_fusion_distances_are_weighted_cosine_distances():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(10, 5)), rng.normal(size=(10, 3)) * 7
  fused = fusion.fuse({
      "content": a,
      "collaborative": b
  }, {
      "content": 3.0,
      "collaborative": 1.0
  })
  np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, rtol=1e-5)
  an = a / np.linalg.norm(a, axis=1, keepdims=True)
  bn = b / np.linalg.norm(b, axis=1, keepdims=True)
  for i, j in itertools.combinations(range(4), 2):
    want = (0.75 * np.sum((an[i] - an[j])**2) + 0.25 * np.sum(
        (bn[i] - bn[j])**2))
    assert np.sum((fused[i] - fused[j])**2) == pytest.approx(want, rel=1e-4)
  only = fusion.fuse({"content": a, "collaborative": b}, {"content": 1.0})
  np.testing.assert_allclose(only, an, rtol=1e-5)
  # A zero-weight part need not have been computed (content-only SIDs).
  np.testing.assert_allclose(
      fusion.fuse({"content": a}, {
          "content": 1.0,
          "collaborative": 0.0
      }),
      an,
      rtol=1e-5)


def test_fusion_bad_inputs():
  a = np.ones((3, 2))
  with pytest.raises(ValueError, match="not computed"):
    fusion.fuse({"content": a}, {"collaborative": 1.0})
  with pytest.raises(ValueError, match="all zero"):
    fusion.fuse({"content": a}, {"content": 0.0})
  bad = a.copy()
  bad[2, 1] = np.nan
  with pytest.raises(
      ValueError, match="'content': 1 rows with NaN/inf, first "
      "row 2"):
    fusion.fuse({"content": bad}, {"content": 1.0})
  with pytest.raises(ValueError, match="different item counts"):
    fusion.fuse({"content": a, "x": np.ones((4, 2))}, {"content": 1, "x": 1})

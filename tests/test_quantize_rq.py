"""Tests of residual quantisation: residual.py, rq_kmeans.py and rq_vae.py."""

import dataclasses

import chex
from flax import nnx
import jax
import numpy as np
import pytest

from taiji_jax.quantize import kmeans
from taiji_jax.quantize import residual
from taiji_jax.quantize import rq_kmeans
from taiji_jax.quantize import rq_vae


def _mixture(n, dim, components, seed=0):
  """Gaussian mixture with geometrically spread component scales."""
  rng = np.random.default_rng(seed)
  centers_cd = 4.0 * rng.standard_normal((components, dim))
  labels_n = rng.integers(0, components, n)
  x_nd = centers_cd[labels_n] + rng.standard_normal((n, dim))
  return x_nd.astype(np.float32)


def _planted(n=600, dim=16, seed=0):
  """Items = coarse center + fine offset + noise: an (8, 8)-code structure."""
  rng = np.random.default_rng(seed)
  coarse_cd = 3.0 * rng.standard_normal((8, dim))
  fine_cd = rng.standard_normal((8, dim))
  a_n, b_n = rng.integers(0, 8, n), rng.integers(0, 8, n)
  x_nd = coarse_cd[a_n] + fine_cd[b_n] + 0.05 * rng.standard_normal((n, dim))
  return x_nd.astype(np.float32)


def _separated_codebooks(sizes, dim, seed=0):
  """Codebooks whose level-l scale is 0.02**l: greedy decoding is exact."""
  rng = np.random.default_rng(seed)
  return tuple((0.02**l * rng.standard_normal((k, dim))).astype(np.float32)
               for l, k in enumerate(sizes))


def _min_gap(cb_kd):
  d_kk = np.asarray(kmeans.pairwise_sq_dists(cb_kd, cb_kd))
  return float(np.sqrt(d_kk[~np.eye(len(cb_kd), dtype=bool)].min()))


def test_encode_decode_roundtrip_with_separated_codebooks():
  sizes, dim = (31, 7, 5), 16
  codebooks = _separated_codebooks(sizes, dim)
  # Precondition: each level's smallest gap exceeds twice what all deeper
  # levels can add, so the nearest codeword is always the planted one.
  for l in range(len(sizes) - 1):
    deeper = sum(np.linalg.norm(cb, axis=1).max() for cb in codebooks[l + 1:])
    assert _min_gap(codebooks[l]) > 2 * deeper
  rng = np.random.default_rng(1)
  codes_nl = np.stack([rng.integers(0, k, 200) for k in sizes], axis=1)
  x_nd = residual.residual_decode(codebooks, codes_nl)
  got_nl, quantized_nd, norms_l1 = residual.residual_encode(
      codebooks, x_nd, chunk=64)
  np.testing.assert_array_equal(got_nl, codes_nl)
  np.testing.assert_allclose(quantized_nd, x_nd, atol=1e-6)
  assert norms_l1.shape == (4,) and float(norms_l1[-1]) < 1e-5
  np.testing.assert_array_equal(
      residual.residual_decode(codebooks, got_nl), quantized_nd)


def test_residual_encode_jit_and_eager_agree():
  x_nd = _mixture(90, 6, 5)
  codebooks = tuple(x_nd[i:i + k] for i, k in ((0, 11), (20, 3)))
  encode = jax.jit(residual.residual_encode, static_argnames=("chunk",))
  jitted = encode(codebooks, x_nd, chunk=32)
  with jax.disable_jit():
    eager = residual.residual_encode(codebooks, x_nd, chunk=32)
  np.testing.assert_array_equal(jitted[0], eager[0])
  chex.assert_trees_all_close(jitted[1:], eager[1:], rtol=1e-5, atol=1e-5)


def test_rq_kmeans_codes_in_range_and_residuals_shrink():
  x_nd = _mixture(1000, 12, 20)
  sizes = (13, 13, 7)  # Shrinking levels, as GR4AD's multi-resolution.
  model = rq_kmeans.fit(jax.random.key(0), x_nd, sizes, iters=15)
  assert model.codes.shape == (1000, 3) and model.codes.dtype == np.int32
  for l, k in enumerate(sizes):
    assert model.codebooks[l].shape == (k, 12)
    assert 0 <= int(model.codes[:, l].min()) <= int(model.codes[:, l].max()) < k
  norms = model.stats["residual_norms"]
  assert len(norms) == 4 and all(a > b for a, b in zip(norms, norms[1:]))
  assert all(len(model.stats[f]) == 3 for f in ("inertia", "seconds"))
  assert all(0.5 < u <= 1.0 for u in model.stats["utilisation"])
  # The fitted codes are exactly what encode gives, and the residual norms
  # agree with the shared residual helper.
  np.testing.assert_array_equal(rq_kmeans.encode(model, x_nd), model.codes)
  _, quantized_nd, norms_l1 = jax.jit(residual.residual_encode)(model.codebooks,
                                                                x_nd)
  np.testing.assert_allclose(norms_l1, norms, rtol=1e-4)
  np.testing.assert_allclose(
      rq_kmeans.decode(model, model.codes), quantized_nd, atol=1e-5)


def test_rq_kmeans_is_deterministic_balanced_and_normalises():
  x_nd = _mixture(1000, 12, 20, seed=2)
  # Equal level sizes: one compilation serves both levels.
  a = rq_kmeans.fit(jax.random.key(3), x_nd, (13, 13), iters=8, balanced=True)
  b = rq_kmeans.fit(jax.random.key(3), x_nd, (13, 13), iters=8, balanced=True)
  np.testing.assert_array_equal(a.codes, b.codes)
  chex.assert_trees_all_equal(a.codebooks, b.codebooks)
  for l, k in enumerate((13, 13)):
    sizes_k = np.bincount(np.asarray(a.codes[:, l]), minlength=k)
    assert sizes_k.max() <= kmeans.default_capacity(1000, k)
  unit = rq_kmeans.fit(
      jax.random.key(3), x_nd, (13, 13), iters=8, normalize=True)
  assert unit.normalize
  np.testing.assert_allclose(unit.stats["residual_norms"][0], 1.0, rtol=1e-5)
  # Encoding is scale invariant once inputs are normalised.
  np.testing.assert_array_equal(
      rq_kmeans.encode(unit, 3.0 * x_nd), rq_kmeans.encode(unit, x_nd))


def test_rq_kmeans_and_residual_bad_inputs():
  x_nd = _mixture(50, 4, 3)
  key = jax.random.key(0)
  bad = x_nd.copy()
  bad[7, 2] = np.nan
  with pytest.raises(ValueError, match=r"1 of 50 rows .* first is row 7"):
    rq_kmeans.fit(key, bad, (4, 4))
  with pytest.raises(ValueError, match=r"k=64 .* N=50"):
    rq_kmeans.fit(key, x_nd, (8, 64))
  with pytest.raises(ValueError, match=r"codebook_sizes"):
    rq_kmeans.fit(key, x_nd, ())
  with pytest.raises(ValueError, match=r"2-D"):
    rq_kmeans.fit(key, x_nd[0], (2,))
  codebooks = (x_nd[:5], x_nd[5:8])
  with pytest.raises(ValueError, match=r"\(N, 2\)"):
    residual.residual_decode(codebooks, np.zeros((3, 3), np.int32))
  with pytest.raises(ValueError, match=r"level 1 must be in \[0, 3\)"):
    residual.residual_decode(codebooks, np.array([[0, 3]]))
  with pytest.raises(ValueError, match=r"codebook 1 has dim 2"):
    residual.residual_encode((x_nd[:5], x_nd[:3, :2]), x_nd)


def _small_config(**overrides):
  kwargs = dict(
      input_dim=16,
      hidden_dims=(32,),
      latent_dim=8,
      codebook_sizes=(8, 8),
      batch_size=100,
      epochs=30,
      lr=3e-3,
      kmeans_init_iters=10)
  kwargs.update(overrides)
  return rq_vae.RQVAEConfig(**kwargs)


def test_rq_vae_learns_and_uses_its_codebooks():
  x_nd = _planted()
  config = _small_config()
  model, history = rq_vae.train(x_nd, config)
  assert len(history) == 30
  first, last = history[0], history[-1]
  assert last["recon_loss"] < 0.3 * first["recon_loss"]
  assert all(u > 0.5 for u in last["utilisation"])
  assert all(1.0 < p <= 8.0 for p in last["perplexity"])
  codes_nl = np.asarray(rq_vae.encode(model, x_nd, batch_size=256))
  assert codes_nl.shape == (600, 2) and codes_nl.dtype == np.int32
  assert codes_nl.min() >= 0 and codes_nl.max() < 8
  x_hat_nd = np.asarray(rq_vae.reconstruct(model, x_nd))
  assert x_hat_nd.shape == x_nd.shape
  err = np.mean(np.sum((x_hat_nd - x_nd)**2, axis=1))
  assert err < 0.3 * np.mean(np.sum((x_nd - x_nd.mean(0))**2, axis=1))
  # Same seed, same everything.
  again, history_again = rq_vae.train(x_nd, config)
  np.testing.assert_array_equal(rq_vae.encode(again, x_nd), codes_nl)
  assert history_again[-1]["loss"] == last["loss"]


def test_restart_dead_codes_replaces_only_dead_codes():
  codebook_kz = np.arange(12, dtype=np.float32).reshape(4, 3)
  residuals_bz = np.full((5, 3), -1.0, np.float32)
  usage_k = np.array([3, 0, 7, 0])
  new_kz, count = rq_vae.restart_dead_codes(codebook_kz, usage_k, residuals_bz,
                                            jax.random.key(0), 1.0)
  assert int(count) == 2
  new_kz = np.asarray(new_kz)
  np.testing.assert_array_equal(new_kz[[0, 2]], codebook_kz[[0, 2]])
  np.testing.assert_array_equal(new_kz[[1, 3]], -1.0)


def test_rq_vae_dead_code_restart_revives_a_dead_code():
  x_nd = _planted(seed=1)
  config = _small_config(epochs=3)
  model = rq_vae.init(x_nd, config)
  model.codebooks[0][...] = model.codebooks[0][...].at[3].set(1e3)  # Dead.
  assert not (np.asarray(rq_vae.encode(model, x_nd))[:, 0] == 3).any()

  revived, history = rq_vae.train(x_nd, config, model=model)
  assert history[0]["restarted"][0] >= 1
  assert (np.asarray(rq_vae.encode(revived, x_nd))[:, 0] == 3).any()
  assert np.abs(np.asarray(revived.codebooks[0][...][3])).max() < 1e2

  no_restart = dataclasses.replace(config, dead_code_threshold=0.0)
  still_dead, history = rq_vae.train(x_nd, no_restart, model=model)
  assert history[0]["restarted"] == [0, 0]
  assert not (np.asarray(rq_vae.encode(still_dead, x_nd))[:, 0] == 3).any()
  # The model passed in is left untouched.
  assert float(model.codebooks[0][...][3, 0]) == 1e3


def test_rq_vae_bad_inputs():
  x_nd = _planted(n=100)
  with pytest.raises(
      ValueError, match=r"size 256 needs at least 256 items, "
      r"got N=100"):
    rq_vae.train(x_nd, rq_vae.RQVAEConfig(input_dim=16))
  bad = x_nd.copy()
  bad[[3, 50]] = np.inf
  with pytest.raises(ValueError, match=r"2 of 100 rows .* first is row 3"):
    rq_vae.train(bad, _small_config())
  with pytest.raises(ValueError, match=r"dim 16 .* input_dim is 12"):
    rq_vae.train(x_nd, _small_config(input_dim=12))
  with pytest.raises(ValueError, match=r"optimizer must be one of"):
    _small_config(optimizer="lion")
  with pytest.raises(ValueError, match=r"2-D"):
    rq_vae.encode(rq_vae.create(_small_config()), x_nd[0])


def test_optimizers_by_name_and_adamw_spares_codebooks():
  model = rq_vae.create(_small_config())
  params = nnx.state(model, nnx.Param)
  zeros = jax.tree.map(np.zeros_like, params)
  for name in rq_vae.OPTIMIZERS:
    optimizer = rq_vae.make_optimizer(_small_config(optimizer=name))
    updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params),
                                           params)
    leaves = jax.tree.leaves(updates)
    assert all(np.isfinite(u).all() for u in leaves)
    if name == "adamw":  # Zero gradients: only the decay moves anything.
      assert np.abs(updates["codebooks"][0][...]).max() == 0.0
      assert np.abs(updates["encoder"]["layers"][0]["kernel"][...]).max() > 0
      assert np.abs(updates["encoder"]["layers"][0]["bias"][...]).max() == 0.0

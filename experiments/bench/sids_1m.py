r"""Benchmarks building RQ-KMeans semantic IDs for 1M synthetic items.

  .venv/bin/python experiments/bench/sids_1m.py                 # 1M x 384
  .venv/bin/python experiments/bench/sids_1m.py --n=100000      # quick check
  .venv/bin/python experiments/bench/sids_1m.py --n=100000 --rqvae

Makes `--n` seeded float32 embeddings of dim `--d` from a hierarchical
Gaussian mixture (`--components` centers in sqrt(components) groups) of
intrinsic dim `--latent_dim`, L2-normalised like text encoder outputs, then
fits RQ-KMeans with `--sizes` codebooks, resolves collisions (`--collisions`)
and builds the `SemanticIds` (maps and trie). Prints one JSON line: per-level
seconds (k-means++ seeding, Lloyd loop and the final assignment), total
wall time, peak RSS of the process (host RAM, which on CPU includes the
arrays), and the collision rate - the fraction of items whose full code
tuple is shared with at least one other item.

`--rqvae` also trains the RQ-VAE for `--rqvae_epochs` epochs on the first
`--rqvae_n` items and adds its timings (first epoch includes compilation).
"""

import json
import platform
import resource
import time

from absl import app
from absl import flags
import jax
import numpy as np

from taiji_jax import launch
from taiji_jax.quantize import collisions
from taiji_jax.quantize import rq_kmeans
from taiji_jax.quantize import rq_vae
from taiji_jax.quantize import semantic_ids as sid_lib

_N = flags.DEFINE_integer("n", 1_000_000, "Number of items.")
_D = flags.DEFINE_integer("d", 384, "Embedding dim.")
_SIZES = flags.DEFINE_list("sizes", ["256", "256", "256"],
                           "Codebook size per level.")
_ITERS = flags.DEFINE_integer("iters", 20, "Max Lloyd steps per level.")
_TOL = flags.DEFINE_float("tol", 1e-4, "Relative inertia change to stop.")
_BALANCED = flags.DEFINE_boolean("balanced", False,
                                 "Capacity-constrained clusters.")
_COMPONENTS = flags.DEFINE_integer("components", 2000,
                                   "Gaussian mixture components.")
_LATENT_DIM = flags.DEFINE_integer(
    "latent_dim", 32, "Intrinsic dim of the synthetic data (0: full rank).")
_COLLISIONS = flags.DEFINE_enum("collisions", "extra_level", collisions.METHODS,
                                "Collision resolution.")
_HASH_SIZE = flags.DEFINE_integer(
    "hash_size", 4096, "Codes of the hash level (--collisions=hash).")
_CHUNK = flags.DEFINE_integer("chunk", 4096, "Rows per distance block.")
_SEED = flags.DEFINE_integer("seed", 0, "Data and k-means seed.")
_RQVAE = flags.DEFINE_boolean("rqvae", False, "Also time the RQ-VAE.")
_RQVAE_N = flags.DEFINE_integer("rqvae_n", 100_000, "RQ-VAE items.")
_RQVAE_EPOCHS = flags.DEFINE_integer("rqvae_epochs", 3, "RQ-VAE epochs.")
_RQVAE_BATCH = flags.DEFINE_integer("rqvae_batch", 1024, "RQ-VAE batch.")


def make_embeddings(n: int,
                    d: int,
                    components: int,
                    seed: int,
                    latent_dim: int = 32) -> np.ndarray:
  """(n, d) float32 unit rows from a seeded hierarchical Gaussian mixture.

  Like text embeddings, the data has coarse topics, finer sub-topics and a
  low intrinsic dimension: in a `latent_dim`-dim space, sqrt(components)
  groups have standard-normal centers, each component is a group center
  plus a N(0, 0.5^2) offset, each item a component center plus N(0, s^2)
  noise with s drawn in [0.2, 0.5] per component; component weights are
  Zipf-like (1/rank). A random orthonormal map lifts the latents to `d`
  dims, a little isotropic noise (std 0.01 per dim) is added and rows are
  L2-normalised. Generated in blocks to keep the peak near one copy of the
  output.
  """
  rng = np.random.default_rng(seed)
  r = min(latent_dim, d) if latent_dim > 0 else d
  groups = max(1, int(np.sqrt(components)))
  group_gr = rng.standard_normal((groups, r), dtype=np.float32)
  centers_cr = group_gr[rng.integers(0, groups, components)]
  centers_cr += 0.5 * rng.standard_normal((components, r), dtype=np.float32)
  spread_c = rng.uniform(0.2, 0.5, components).astype(np.float32)
  weights_c = 1.0 / np.arange(1, components + 1)
  labels_n = rng.choice(components, n, p=weights_c / weights_c.sum())
  lift_rd = np.linalg.qr(rng.standard_normal((d, r)))[0].T.astype(np.float32)
  x_nd = np.empty((n, d), np.float32)
  block = 65536
  for start in range(0, n, block):
    lab_b = labels_n[start:start + block]
    z_br = rng.standard_normal((len(lab_b), r), dtype=np.float32)
    z_br *= spread_c[lab_b, None]
    z_br += centers_cr[lab_b]
    x_bd = z_br @ lift_rd / np.sqrt(r)
    x_bd += 0.01 * rng.standard_normal(x_bd.shape, dtype=np.float32)
    x_bd /= np.linalg.norm(x_bd, axis=1, keepdims=True)
    x_nd[start:start + len(lab_b)] = x_bd
  return x_nd


def collision_rate(codes_nl: np.ndarray) -> tuple[float, int]:
  """(fraction of items sharing their full code with another, #unique)."""
  stats = collisions.collision_stats(codes_nl)
  return stats["collision_rate"], round(stats["distinct_codes"] * len(codes_nl))


def _peak_rss_mib() -> float:
  # ru_maxrss is KiB on Linux, bytes on macOS.
  scale = 1 / 1024 if platform.system() != "Darwin" else 1 / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch.setup()
  sizes = tuple(int(s) for s in _SIZES.value)
  start = time.perf_counter()
  x_nd = make_embeddings(_N.value, _D.value, _COMPONENTS.value, _SEED.value,
                         _LATENT_DIM.value)
  data_seconds = time.perf_counter() - start

  fit_start = time.perf_counter()
  model = rq_kmeans.fit(
      jax.random.key(_SEED.value),
      x_nd,
      sizes,
      iters=_ITERS.value,
      tol=_TOL.value,
      balanced=_BALANCED.value,
      chunk=_CHUNK.value)
  codes_nl = np.asarray(model.codes)
  fit_seconds = time.perf_counter() - fit_start
  rate, unique = collision_rate(codes_nl)
  stats = model.stats
  result = {
      "bench": "sids_1m",
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
      "n": _N.value,
      "d": _D.value,
      "sizes": list(sizes),
      "iters": _ITERS.value,
      "balanced": _BALANCED.value,
      "components": _COMPONENTS.value,
      "latent_dim": _LATENT_DIM.value,
      "data_seconds": round(data_seconds, 2),
      "level_seconds": [round(s, 2) for s in stats["seconds"]],
      "level_iterations": stats["iterations"],
      "level_mse": [round(m, 5) for m in stats["mse"]],
      "utilisation": [round(u, 4) for u in stats["utilisation"]],
      "residual_norms": [round(r, 4) for r in stats["residual_norms"]],
      "fit_seconds": round(fit_seconds, 2),
      "collision_rate": round(rate, 5),
      "unique_codes": unique,
  }
  # Collision resolution and the SemanticIds maps + trie (what the pipeline
  # saves), timed separately from the quantizer.
  sid_start = time.perf_counter()
  final_nl, extra = collisions.resolve(
      codes_nl,
      _COLLISIONS.value,
      raw_ids=np.arange(len(codes_nl)),
      hash_size=_HASH_SIZE.value)
  resolve_seconds = time.perf_counter() - sid_start
  sids = sid_lib.SemanticIds(
      np.concatenate([np.full((1, final_nl.shape[1]), -1, np.int32), final_nl]),
      sizes + (extra,))
  result.update({
      "collisions":
          _COLLISIONS.value,
      "max_collision_group":
          collisions.collision_stats(codes_nl)["max_group"],
      "final_codebook_sizes":
          list(sids.codebook_sizes),
      "resolve_seconds":
          round(resolve_seconds, 2),
      "semantic_ids_seconds":
          round(time.perf_counter() - sid_start - resolve_seconds, 2),
      "trie_mib":
          round(sum(level.nbytes for level in sids.trie) / 2**20, 1),
      "unique_after":
          bool(len(np.unique(sids.codes[1:], axis=0)) == len(codes_nl)),
  })
  del sids
  if _BALANCED.value:
    result["max_cluster_size"] = [
        int(np.bincount(codes_nl[:, l], minlength=k).max())
        for l, k in enumerate(sizes)
    ]

  if _RQVAE.value:
    config = rq_vae.RQVAEConfig(
        input_dim=_D.value,
        codebook_sizes=sizes,
        batch_size=_RQVAE_BATCH.value,
        epochs=_RQVAE_EPOCHS.value,
        seed=_SEED.value)
    vae_start = time.perf_counter()
    vae, history = rq_vae.train(x_nd[:_RQVAE_N.value], config)
    train_seconds = time.perf_counter() - vae_start
    vae_codes_nl = np.asarray(rq_vae.encode(vae, x_nd[:_RQVAE_N.value]))
    vae_rate, _ = collision_rate(vae_codes_nl)
    result["rqvae"] = {
        "n": min(_RQVAE_N.value, _N.value),
        "epochs": _RQVAE_EPOCHS.value,
        "batch_size": _RQVAE_BATCH.value,
        "train_seconds": round(train_seconds, 2),
        "epoch_seconds": [round(h["seconds"], 2) for h in history],
        "recon_loss": [round(h["recon_loss"], 5) for h in history],
        "utilisation": [round(u, 4) for u in history[-1]["utilisation"]],
        "collision_rate": round(vae_rate, 5),
    }
  result["total_seconds"] = round(time.perf_counter() - start, 2)
  result["peak_rss_mib"] = round(_peak_rss_mib(), 1)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)

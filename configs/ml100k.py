r"""The default end-to-end pipeline on MovieLens-100k (`make run`).

  .venv/bin/python experiments/pipeline.py --config configs/ml100k.py \
      --workdir runs/ml100k

Stages (each into `runs/ml100k/<stage>/` with its own results.json):
  popularity  MostPop reference (~2 s)
  sasrec      SASRec, configs/ml100k_sasrec.py (~380 s on 2 CPU cores;
              test Recall@10 0.2057, NDCG@10 0.1089, history masked)
  sids        semantic IDs, configs/ml100k_sids.py (RQ-KMeans default and
              RQ-VAE on MiniLM text + SASRec item embeddings; README)

Expected: the whole `make run` took 8.5 min on a 2-core CPU (README).
`:smoke` runs every stage on the synthetic dataset in about 30 s. Override any
stage field, e.g. `--config.sasrec.train.lr=3e-4`.
"""

import pathlib

import ml_collections

from taiji_jax import config_lib

_HERE = pathlib.Path(__file__).parent


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False)
  c = ml_collections.ConfigDict()
  c.stages = ("popularity", "sasrec", "sids")
  c.report_ks = (5, 10, 20)
  c.sasrec = config_lib.load_config_file(_HERE / "ml100k_sasrec.py",
                                         "smoke" if arg.smoke else None)
  c.sids = config_lib.load_config_file(_HERE / "ml100k_sids.py",
                                       "smoke" if arg.smoke else None)
  return c.lock()

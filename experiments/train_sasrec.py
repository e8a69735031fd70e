r"""Trains and evaluates SASRec; see configs/ml100k_sasrec.py for launches.

  python experiments/train_sasrec.py --config configs/ml100k_sasrec.py \
      --workdir runs/ml100k/sasrec

Re-running the same command resumes from the workdir's latest checkpoint.
"""

from taiji_jax import launch
from taiji_jax.train import sasrec_trainer

if __name__ == "__main__":
  launch.entry_point(sasrec_trainer.train_and_evaluate,
                     "configs/ml100k_sasrec.py", "SASRec config.")

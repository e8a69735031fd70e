r"""Trains and evaluates SASRec; see configs/ml100k_sasrec.py for launches.

  python experiments/train_sasrec.py --config configs/ml100k_sasrec.py \
      --workdir runs/ml100k/sasrec

Re-running the same command resumes from the workdir's latest checkpoint.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from taiji_jax import launch
from taiji_jax.train import sasrec_trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/ml100k_sasrec.py", "Experiment config.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch.setup()
  sasrec_trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

r"""RL alignment of the SFT model; see configs/ml100k_rl.py for launches.

  python experiments/train_rl.py --config configs/ml100k_rl.py \
      --workdir runs/ml100k/rl

Needs a finished SFT run (default `<workdir>/../sft`) and, for the
preference reward, a SASRec run (default next to the SFT run). Re-running
the same command resumes from the workdir's latest checkpoint.
"""

from taiji_jax import launch
from taiji_jax.stages import rl as rl_stage

if __name__ == "__main__":
  launch.entry_point(rl_stage.train_and_evaluate, "configs/ml100k_rl.py",
                     "RL config.")

r"""Fine-tunes the SID decoder; see configs/ml100k_sft.py for launches.

  python experiments/train_sft.py --config configs/ml100k_sft.py \
      --workdir runs/ml100k/sft

Needs the sids stage's `semantic_ids.npz` (default `<workdir>/../sids`).
Re-running the same command resumes from the workdir's latest checkpoint.
"""

from taiji_jax import launch
from taiji_jax.stages import sft as sft_stage

if __name__ == "__main__":
  launch.entry_point(sft_stage.train_and_evaluate, "configs/ml100k_sft.py",
                     "SFT config.")

r"""Builds semantic IDs (RQ-KMeans, RQ-VAE); see configs/ml100k_sids.py.

  python experiments/sids_stage.py --config configs/ml100k_sids.py \
      --workdir runs/ml100k/sids

Re-running the same command reuses the embeddings and SIDs already built.
"""

from taiji_jax import launch
from taiji_jax.stages import sids as sids_stage

if __name__ == "__main__":
  launch.entry_point(sids_stage.run, "configs/ml100k_sids.py",
                     "Semantic-ID config.")

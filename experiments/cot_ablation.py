r"""The reasoning ablation (no CoT / direct / RUPR / RUPR + ORFT).

  python experiments/cot_ablation.py \
      --config configs/ml100k_cot_ablation.py --workdir runs/ml100k_cot

See configs/ml100k_cot_ablation.py and taiji_jax/cot/cot_ablation.py.
Re-running the same command resumes (finished sub-runs are reused).
"""

from taiji_jax import launch
from taiji_jax.studies import cot_ablation

if __name__ == "__main__":
  launch.entry_point(cot_ablation.run, "configs/ml100k_cot_ablation.py",
                     "CoT ablation config.")

r"""Fixed reward weights vs POPO / POPO-light / MGDA; see
configs/ml100k_pareto.py.

  python experiments/pareto.py --config configs/ml100k_pareto.py \
      --workdir runs/ml100k_pareto
"""

from taiji_jax import launch
from taiji_jax.studies import pareto

if __name__ == "__main__":
  launch.entry_point(pareto.run, "configs/ml100k_pareto.py",
                     "Pareto experiment config.")

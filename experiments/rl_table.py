r"""RL vs SFT over seeds; see configs/ml100k_rl_table.py.

  python experiments/rl_table.py --config configs/ml100k_rl_table.py \
      --workdir runs/ml100k_rl
"""

from taiji_jax import launch
from taiji_jax.studies import rl_table

if __name__ == "__main__":
  launch.entry_point(rl_table.run, "configs/ml100k_rl_table.py",
                     "RL-vs-SFT table config.")

r"""Runs the whole pipeline (`make run`); see configs/ml100k.py.

  python experiments/pipeline.py --config configs/ml100k.py \
      --workdir runs/ml100k

Re-running the same command resumes every unfinished stage.
"""

from taiji_jax import launch
from taiji_jax import pipeline

if __name__ == "__main__":
  launch.entry_point(pipeline.run, "configs/ml100k.py", "Pipeline config.")

r"""Runs the whole pipeline (`make run`); see configs/ml100k.py.

  python experiments/pipeline.py --config configs/ml100k.py \
      --workdir runs/ml100k

Re-running the same command resumes every unfinished stage.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from taiji_jax import launch
from taiji_jax import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/ml100k.py", "Pipeline config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch.setup()
  pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

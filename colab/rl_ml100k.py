# %% [markdown]
# # RL alignment (GRPO family) on MovieLens-100k
#
# Reproduces the README's RL-vs-SFT table with library code only: the
# function behind `experiments/rl_table.py`. Needs the sasrec and sids stages
# of `make run` in `runs/ml100k/`; with SMOKE = True it runs one seed of the
# smoke variant on the synthetic dataset instead (needs
# `make run CONFIG=configs/ml100k.py:smoke WORKDIR=runs/smoke` first). A
# jupytext "percent" notebook: `pip install -e .` in a checkout, then run it.

# %%
import pathlib

import matplotlib.pyplot as plt

from taiji_jax import config_lib
from taiji_jax.stages import rl as rl_stage
from taiji_jax.studies import rl_table

SMOKE = True
OBJECTIVE = "grpo"  # or dr_grpo, dapo, ecpo, gbpo, dpo, rspo
ROOT = pathlib.Path.cwd()
if not (ROOT / "configs").exists():  # run from colab/
  ROOT = ROOT.parent
WORKDIR = ROOT / "runs" / ("smoke_rl_table" if SMOKE else "ml100k_rl")

# %% [markdown]
# ## SFT, then RL from it, for every seed
# Each seed trains (or reuses) its SFT run, then the RL run; the table has
# the SFT model, the RL model selected on valid NDCG@10 and the last one.

# %%
arg = ",".join(filter(None, ["smoke" if SMOKE else "",
                             f"objective={OBJECTIVE}"]))
config = config_lib.load_config_file(ROOT / "configs" / "ml100k_rl_table.py",
                                     arg)
root = ROOT / "runs" / ("smoke" if SMOKE else "ml100k")
config = config_lib.with_overrides(
    config, **{
        "sft.sids_workdir": str(root / "sids"),
        "rl.sasrec_workdir": str(root / "sasrec"),
    })
summary = rl_table.run(config, WORKDIR)  # prints the table

# %% [markdown]
# ## Training curves of seed 0
# The two rewards of the sampled answers, and the KL to the SFT reference.

# %%
records = [r for r in rl_stage.read_metrics(WORKDIR / "seed_0" / "rl")
           if r["step"] > 0]
steps = [r["step"] for r in records]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for name in config.rl.rewards:
  axes[0].plot(steps, [r[f"reward/{name}/mean"] for r in records], label=name)
axes[0].set_xlabel("RL step")
axes[0].set_ylabel("mean reward of the rollouts")
axes[0].legend()
axes[1].plot(steps, [r["kl"] for r in records])
axes[1].set_xlabel("RL step")
axes[1].set_ylabel("k3 KL to the SFT model (per token)")
fig.tight_layout()

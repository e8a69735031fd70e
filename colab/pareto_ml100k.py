# %% [markdown]
# # The Pareto experiment on MovieLens-100k: fixed weights vs POPO & co.
#
# Reproduces the README's "Pareto front" table and figures with library
# code only: the function behind `experiments/pareto.py` (`make pareto`).
# Needs the sasrec and sids stages of `make run` in `runs/ml100k/`; with
# SMOKE = True it runs one seed of the smoke variant on the synthetic
# dataset instead (needs `make run CONFIG=configs/ml100k.py:smoke
# WORKDIR=runs/smoke` first). A jupytext "percent" notebook: `pip install -e
# .` in a checkout, then run it.

# %%
import pathlib

from IPython import display

from taiji_jax import config_lib
from taiji_jax.stages import rl as rl_stage
from taiji_jax.studies import pareto

SMOKE = True
ROOT = pathlib.Path.cwd()
if not (ROOT / "configs").exists():  # run from colab/
  ROOT = ROOT.parent
WORKDIR = ROOT / "runs" / ("smoke_pareto" if SMOKE else "ml100k_pareto")

# %% [markdown]
# ## Every seed: SFT, then one GRPO run per weighting
# Fixed semantic weights 0, 0.25, 0.5, 0.75, 1 (preference = 1 - w) and the
# adaptive rules popo, popo_light and mgda, which start at 0.5 / 0.5, and
# GDPO (per-reward normalisation, fixed 0.5 / 0.5). popo and mgda use the
# consistent loss sum_k w_k L_k + KL (`weighting_cfg.combine`). A finished
# seed is read back from its `seed_results.json`.

# %%
config = config_lib.load_config_file(ROOT / "configs" / "ml100k_pareto.py",
                                     "smoke" if SMOKE else None)
root = ROOT / "runs" / ("smoke" if SMOKE else "ml100k")
config = config_lib.with_overrides(
    config, **{
        "sft.sids_workdir": str(root / "sids"),
        "rl.sasrec_workdir": str(root / "sasrec"),
    })
summary = pareto.run(config, WORKDIR)  # prints the tables

# %% [markdown]
# ## The (semantic, preference) plane and the weights over training

# %%
display.display(display.Image(str(WORKDIR / "front.png")))
display.display(display.Image(str(WORKDIR / "weights.png")))

# %% [markdown]
# ## Why the rules move the way they do (seed 0)
# The per-reward gradient norms and their cosine, logged every step by the
# gradient-based rules, with POPO's indicators I_k (`grads/popo_I/*`) and
# the alignment a_k = <g_k, d> / |d|^2 of each reward with the applied
# direction d (`grads/alignment/*`): POPO's step is eta / mu (|g_k|^2 +
# <g_k, g_j>), so it moves weight to the reward with the larger gradient;
# MGDA on l2-normalised gradients gives each reward a weight inversely
# proportional to its norm.

# %%
for name in ("popo", "mgda"):
  records = rl_stage.read_metrics(WORKDIR / "seed_0" / name)
  first, last = records[0], records[-1]
  print(name, {k: (round(first[k], 4), round(last[k], 4))
               for k in first
               if k.startswith(("grads/", "weights/", "weights_state/"))})

# %% [markdown]
# # SASRec on MovieLens-100k with taiji_jax
#
# Reproduces the SASRec and MostPop rows of the README's results table with
# library code only (the same functions `make run` calls). This is a
# jupytext "percent" notebook: open it in Jupyter/Colab with jupytext, or
# run it as a script. From a checkout of the repository:
#
#     pip install -e .
#
# On Colab, clone the repository first and `pip install -e .` inside it.

# %%
import json
import pathlib

from taiji_jax import config_lib
from taiji_jax import pipeline
from taiji_jax.data import load_dataset

ROOT = pathlib.Path.cwd()
if not (ROOT / "configs").exists():  # run from colab/
  ROOT = ROOT.parent

# %% [markdown]
# ## The data and the split
# The loader says where the files came from (GroupLens, the RecBole wheel,
# or the local cache) and reports every repaired or missing value.

# %%
dataset = load_dataset("ml-100k")
print(dataset.source)
print(dataset.statistics())
print(dataset.report)
split = dataset.split_leave_one_out(max_len=50)
print(split["counts"])
print("user 1:", dataset.user_text(1))
print("item 1:", dataset.item_text(1))

# %% [markdown]
# ## Train and evaluate
# `SMOKE = True` runs the synthetic smoke config in seconds; set it to False
# for the real run (minutes on a laptop CPU, see the README for timings).

# %%
SMOKE = True
config = config_lib.load_config_file(ROOT / "configs" / "ml100k.py",
                                     "smoke" if SMOKE else None)
workdir = ROOT / "runs" / ("colab_smoke" if SMOKE else "ml100k")
summary = pipeline.run(config, workdir)

# %%
print(json.dumps(summary["sasrec"]["test"], indent=1))

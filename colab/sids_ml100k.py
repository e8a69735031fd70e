# %% [markdown]
# # Semantic IDs for MovieLens-100k with taiji_jax
#
# Reproduces the README's "Semantic IDs" table for one seed with library code
# only (the functions the `sids` stage of `make run` calls): MiniLM text
# embeddings in Flax, fused with the SASRec item table, quantized by
# RQ-KMeans and RQ-VAE, collisions resolved, quality reports side by side.
# Needs a trained SASRec in `runs/ml100k/sasrec` (`make run` or
# `colab/sasrec_ml100k.py` with SMOKE = False, which also build these SIDs;
# this notebook then reuses them); without one it builds content-only SIDs. A jupytext
# "percent" notebook: `pip install -e .` in a checkout, then run it.

# %%
import pathlib

import numpy as np

from taiji_jax import config_lib
from taiji_jax.quantize import SemanticIds
from taiji_jax.stages import artifacts
from taiji_jax.stages import sids as sids_stage

ROOT = pathlib.Path.cwd()
if not (ROOT / "configs").exists():  # run from colab/
  ROOT = ROOT.parent
content_only = not (ROOT / "runs" / "ml100k" / "sasrec" /
                    "config.json").exists()
WORKDIR = ROOT / "runs" / ("colab_sids_content"
                           if content_only else "ml100k/sids")

# %%
config = config_lib.load_config_file(ROOT / "configs" / "ml100k_sids.py",
                                     "content_only" if content_only else None)
results = sids_stage.run(config, WORKDIR)  # prints the side-by-side report

# %% [markdown]
# ## Using the SIDs
# `SemanticIds.load` checks that the SIDs belong to this item catalogue; the
# maps go both ways and the trie says which tokens may follow a prefix.

# %%
dataset = artifacts.dataset(config)
sids = SemanticIds.load(WORKDIR, dataset.item_raw_ids)
item = 1
sid = sids.item_to_sid(item)
print(dataset.item_text(item), "->", sid, "->", sids.sid_to_item(sid))
same_l1 = np.flatnonzero(sids.codes[:, 0] == sid[0])
print(f"{len(same_l1)} items share the first code {sid[0]}, e.g.:")
for i in same_l1[:8]:
  print("  ", dataset.item_text(int(i)))

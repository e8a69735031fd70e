# %% [markdown]
# # Reasoning data and think-then-recommend on MovieLens-100k
#
# Reproduces the README's CoT ablation (no CoT / direct / RUPR / RUPR + ORFT)
# with library code only: the function behind
# `experiments/cot_ablation.py`. Needs the semantic IDs of `make run` in
# `runs/ml100k/sids`; with SMOKE = True it runs the smoke variant on the
# synthetic dataset instead (needs `make run CONFIG=configs/ml100k.py:smoke
# WORKDIR=runs/smoke` first, about a minute). A jupytext "percent" notebook:
# `pip install -e .` in a checkout, then run it.

# %%
import json
import pathlib

from taiji_jax import config_lib
from taiji_jax.cot import teachers
from taiji_jax.data import load_dataset
from taiji_jax.studies import cot_ablation

SMOKE = True
ROOT = pathlib.Path.cwd()
if not (ROOT / "configs").exists():  # run from colab/
  ROOT = ROOT.parent
WORKDIR = ROOT / "runs" / ("smoke_cot" if SMOKE else "ml100k_cot")

# %% [markdown]
# ## What the teachers write
# The RUPR teacher sees the item the user chose next; the direct one does
# not. Every sentence is computed from the data (`teachers.AttributeTeacher`
# `.candidates` returns the claims behind each sentence).

# %%
dataset = load_dataset("synthetic" if SMOKE else "ml-100k")
split = dataset.split_leave_one_out(30)
user = int(split["train"]["users"][0])
seq = split["train"]["sequences"][0]
history, target = seq[:-1], int(seq[-1])
print("target:", dataset.item_text(target))
for direct in (False, True):
  teacher = teachers.AttributeTeacher(dataset, direct=direct)
  print("direct" if direct else "RUPR")
  for text in teacher.rationales(user, history, target, 3, seed=0):
    print("  -", text)

# %% [markdown]
# ## The ablation
# Base SFT, then four fine-tunes from it, all decoded by thinking first;
# re-running resumes (finished sub-runs are reused).

# %%
config = config_lib.load_config_file(
    ROOT / "configs" / "ml100k_cot_ablation.py", "smoke" if SMOKE else None)
if SMOKE:
  config = config_lib.with_overrides(
      config, **{"sft.sids_workdir": str(ROOT / "runs" / "smoke" / "sids")})
results = cot_ablation.run(config, WORKDIR)  # prints the table

# %%
for seed, stats in results["orft"].items():
  print(f"seed {seed}: ORFT kept {stats['accepted']} of "
        f"{stats['candidates']} candidates (rate "
        f"{stats['acceptance_rate']:.3f}), R = {stats['threshold']:.3f}")
print(json.dumps(results["summary"]["rupr"]["ndcg@10"], indent=1))

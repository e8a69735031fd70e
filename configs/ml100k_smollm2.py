r"""SFT of a pretrained LLM (SmolLM2-135M-Instruct) as the SID-LLM on ml-100k.

  .venv/bin/python experiments/train_sft.py \
      --config configs/ml100k_smollm2.py --workdir runs/ml100k/sft_smollm2

The SFT stage of `configs/ml100k_sft.py` (same split, prompts, evaluation
and metric code; SIDs from `runs/ml100k/sids`), started from the
pretrained checkpoint: its own tokenizer writes the text (the prompts'
profile, the alignment rows' item text), the 8 markers and the SID tokens
are new ids after its 49,152 (their embedding rows start at the mean
embedding plus small noise, `hf_import.extend_vocab`, and train at
`train.new_rows_lr_scale` x lr), and every weight is fine-tuned (or, with
the overrides below, the lower blocks frozen, or LoRA).

The budget, sized for 2 CPU cores (one epoch of 329 steps of 8 rows;
2.3 s per step measured 2026-12-04, README "The SID-LLM"):
every user (943), each user's most recent window only (`rows_per_user=1`:
the last `max_items` = 20 training targets of each user, 18,693 targets in
all, against the 97,171 every training interaction gives), the item-text ->
SID rows of all 1,682 items once, one epoch, batch 8; validation once at the end (a valid
ranking costs a prompt forward of the 135M model per user). On an
accelerator the same config scales up unchanged, e.g.
`--config.rows_per_user=0 --config.max_items=30 --config.train.num_epochs=3
--config.train.batch_size=64 --config.eval.every_epochs=1`.

Variants: `:smoke` (the synthetic dataset and a tiny random Llama written
by the project in the same GGUF format, `gguf_import.TINY_RANDOM_LLAMA`;
seconds). LoRA instead of full fine-tuning:
`--config.model.overrides.lora_rank=8 --config.train.train_only='("lora_",
"^embed")'`; the lower 24 of 30 blocks frozen: `--config.train.freeze_layers=24`.
"""

import pathlib

import ml_collections

from taiji_jax import config_lib
from taiji_jax.models import gguf_import

_HERE = pathlib.Path(__file__).parent


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, seed=0)
  c = config_lib.load_config_file(
      _HERE / "ml100k_sft.py",
      f"smoke=True,seed={arg.seed}" if arg.smoke else f"seed={arg.seed}")
  c.model.pretrained = ("SmolLM2-135M-Instruct"
                        if not arg.smoke else gguf_import.TINY_RANDOM_LLAMA)
  # The checkpoint's config as it is (no dropout; its context length).
  c.model.unlock()
  c.model.overrides = ml_collections.ConfigDict()
  c.model.lock()

  c.max_items = 20
  c.max_prefix = 32
  c.rows_per_user = 1
  c.tasks.item_to_sid = 1

  c.train.batch_size = 8
  c.train.num_epochs = 1
  c.train.lr = 2e-4
  c.train.new_rows_lr_scale = 10.0  # the new rows at 2e-3
  c.train.warmup_steps = 20
  c.train.weight_decay = 0.0
  c.train.log_every_steps = 25
  c.train.checkpoint_every_steps = 100
  c.eval.batch_size = 32
  c.eval.every_epochs = 1

  if arg.smoke:
    c.max_items = 8
    c.max_prefix = 24
    c.train.batch_size = 16
    c.train.num_epochs = 2
    c.train.warmup_steps = 5
    c.train.log_every_steps = 3
    c.train.checkpoint_every_steps = 6
  return c.lock()

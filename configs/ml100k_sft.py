r"""SFT of a small SID decoder on MovieLens-100k next-item rows.

Launch (from the repository root, after `make install`; needs the semantic
IDs of the sids stage in `runs/ml100k/sids`, or `--config.sids_workdir`):

  .venv/bin/python experiments/train_sft.py \
      --config configs/ml100k_sft.py --workdir runs/ml100k/sft

Each row is "<bos>User: <profile>. History:" followed by the SIDs of up to
`max_items` + 1 training items, the loss on every item's SID after the
first; item-text -> SID alignment rows are mixed in. Rows are batched by
length (buckets of 32 tokens). Evaluation ranks the valid/test target by
constrained beam search (beams = max(ks)) that never returns a seen item,
as SASRec's masked full ranking.

Expected with the default fused RQ-VAE SIDs of `configs/ml100k_sids.py`
(seed 0; 449k parameters, vocab 1202, 87 steps per epoch): `make run`
measured on 2026-12-04 (2 CPU cores, nothing else running; 39-50 s per
epoch, 9-11 s per valid evaluation) test Recall@10 0.0997 / NDCG@10 0.0531
(valid NDCG@10 0.0614 at epoch 6), against SASRec's 0.2057 / 0.1089.
README, "The SID-LLM", has the runs behind these defaults (some on older
code) and the pretrained SmolLM2 run (`configs/ml100k_smollm2.py`).

Variants: `:smoke` (synthetic data, tiny decoder, seconds; SIDs from
`configs/ml100k_sids.py:smoke`). Any field can be overridden, e.g.
`--config.train.lr=3e-4 --config.model.overrides.num_layers=4`.
"""

import pathlib

import ml_collections

from taiji_jax import config_lib
from taiji_jax import sharding

_HERE = pathlib.Path(__file__).parent


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, seed=0)
  c = ml_collections.ConfigDict()
  # An upstream run that changed since this one was made from it:
  # "rerun" sets this run aside (<workdir>/stale/) and makes it again,
  # "error" refuses (taiji_jax.train.workdir.check_inputs).
  c.on_stale_inputs = "rerun"
  c.seed = arg.seed
  c.progress_bar = True
  # Same data as the SASRec stage (one source of truth for the dataset).
  c.dataset = config_lib.load_config_file(
      _HERE / "ml100k_sasrec.py", "smoke" if arg.smoke else None).dataset
  c.sids_workdir = ""  # empty: <workdir>/../sids
  # Another SFT workdir whose best parameters start a fresh run ("": init).
  c.init_from = ""

  c.vocab = ml_collections.ConfigDict({"size": 1000, "model_type": "bpe"})

  c.max_items = 30  # SIDs per row after the prefix (targets per row).
  c.max_prefix = 32  # <bos> + "User: <profile>." + " History:" tokens.
  # Title tokens after each history item's SID (context only); 0: SIDs only.
  c.history_titles = 0
  # Next-item rows kept per user, most recent first (0: every window, each
  # training interaction a target once); a budget for big models.
  c.rows_per_user = 0

  # Copies per epoch of each alignment task's rows (0: left out).
  c.tasks = ml_collections.ConfigDict({"item_to_sid": 1, "sid_to_title": 0})

  c.model = ml_collections.ConfigDict()
  c.model.preset = "small"  # a DecoderConfig preset, then the overrides.
  # Or a pretrained checkpoint (a .gguf file, "SmolLM2-135M-Instruct", a
  # Hugging Face directory): its tokenizer, config and weights; the preset
  # is then unused and the overrides apply on top of its config.
  c.model.pretrained = ""
  # False: the checkpoint's tokenizer and architecture but freshly drawn
  # weights (init_std), the control of what the pretrained weights add.
  c.model.pretrained_weights = True
  c.model.overrides = ml_collections.ConfigDict(
      dict(
          hidden_size=128,
          num_layers=2,
          num_heads=4,
          num_kv_heads=2,
          intermediate_size=256,
          max_seq_len=256,
          dropout_rate=0.2))

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64  # rows (~30 next-item targets each)
  # Rows are batched by real length rounded up to this (0: fixed length).
  c.train.length_bucket = 32
  c.train.num_epochs = 6
  c.train.lr = 2e-3
  c.train.schedule = "cosine"  # or "constant"
  c.train.warmup_steps = 20
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.weight_decay = 0.01
  c.train.grad_clip = 1.0
  c.train.patience = 2  # evaluations without valid improvement.
  c.train.checkpoint_every_epochs = 1
  # Within an epoch (0: once per epoch / every checkpoint_every_epochs):
  # metrics records and checkpoints every n steps (long epochs of big models).
  c.train.log_every_steps = 0
  c.train.checkpoint_every_steps = 0
  # Frozen parameters (train/optimizer.py): the lower n decoder blocks, and
  # regular expressions over parameter paths ("^embed", "blocks/0/attn/").
  c.train.freeze_layers = 0
  c.train.freeze = ()
  # Or train only what these match (LoRA: ("lora_", "^embed")).
  c.train.train_only = ()
  # With model.pretrained: the learning rate of the rows it lacks (markers,
  # SIDs) is lr x this (train/optimizer.py, scale_rows).
  c.train.new_rows_lr_scale = 1.0

  c.eval = ml_collections.ConfigDict()
  c.eval.ks = (5, 10, 20)
  c.eval.num_beams = 0  # beam width of the ranking (0: max(ks))
  # Item feature of the semantic label metrics (label_acc@1, ...); "": none.
  c.eval.label_field = "genres"
  c.eval.batch_size = 128
  # Users evaluated on valid and test: 0 = all, else a fixed sample of that
  # many (the same in every run and seed; sidlm/rows.fixed_users).
  c.eval.num_users = 0
  c.eval.every_epochs = 2
  c.eval.early_stop_metric = "ndcg@10"
  # Think-then-recommend (sidlm/evaluation.py): a rationale of at most
  # max_think tokens (greedy at temperature 0, else num_traces sampled
  # traces with their beams merged), then the SID beam after <answer>;
  # format_check adds the unconstrained format-compliance rate.
  c.eval.think = False
  c.eval.max_think = 64
  c.eval.think_temperature = 0.0
  c.eval.num_traces = 1
  c.eval.format_check = True

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]

  if arg.smoke:
    c.vocab.size = 400
    c.max_items = 8
    c.max_prefix = 24
    c.model.preset = "tiny"
    c.model.overrides = ml_collections.ConfigDict(
        dict(max_seq_len=64, dropout_rate=0.1))
    c.train.batch_size = 16
    c.train.num_epochs = 4
    c.train.warmup_steps = 5
    c.train.patience = 100
    c.train.checkpoint_every_epochs = 1
    c.eval.batch_size = 32
    c.eval.every_epochs = 1
    c.eval.label_field = "category"  # the synthetic dataset's labels
  return c.lock()

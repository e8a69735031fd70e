r"""The reasoning ablation on MovieLens-100k (issue 5): no CoT / direct / RUPR / RUPR + ORFT.

Launch (from the repository root, after `make run` has built the semantic
IDs in `runs/ml100k/sids`, or with `--config.sft.sids_workdir`):

  .venv/bin/python experiments/cot_ablation.py \
      --config configs/ml100k_cot_ablation.py --workdir runs/ml100k_cot

For each seed: SFT on the packed next-item rows (the base), then four
fine-tunes of it on each user's last `cot.per_user` training targets with k
candidate rationales each, in `[prompt] <think> z </think> <answer> SID
</answer>` form with the loss on both parts — z empty (no CoT), from the
direct teacher (target not shown), from the RUPR teacher (target shown),
and RUPR kept by ORFT (answer perplexity below its median) — all evaluated
by the same think-then-recommend decoding. Then RL from the RUPR + ORFT
model (`rl_runs`): fixed weights 0.5 / 0.5, POPO-light and POPO, with
reasoning rollouts and the held-out judges. `taiji_jax/studies/cot_ablation.py`
describes the workdir; the README has the measured table and its runtime.
Needs `make run`'s sids and sasrec stages (runs/ml100k/).

Variants: `:smoke` (synthetic data, tiny decoder, one seed, a few
minutes on 2 CPU cores); `:seeds=1` (the first seed only); `:llm` (Taiji's
recipe on a pretrained LLM: the student is `configs/ml100k_smollm2.py`'s
SmolLM2-135M-Instruct SID-LLM and the same instruct model writes the
rationales, `cot.teacher=chat`; with `:smoke,llm` both are the project's tiny
random Llama). Any field can be overridden,
e.g. `--config.cot.k=4 --config.cot.max_sentences=1`; rationales from an
instruct LLM (SmolLM2-135M-Instruct) instead of the data:
`--config.cot.teacher=chat`; ORFT scored by the RUPR-tuned model itself
(in sample, as the README's first table was):
`--config.cot.orft.scorer=rupr --config.cot.orft.allow_in_sample=True`.
"""

import pathlib

import ml_collections

from taiji_jax import config_lib

_HERE = pathlib.Path(__file__).parent


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, seeds=3, llm=False)
  smoke = "smoke" if arg.smoke else None
  root = "runs/smoke" if arg.smoke else "runs/ml100k"
  c = ml_collections.ConfigDict()
  c.seeds = tuple(range(arg.seeds))
  # The student: the from-scratch SID-LLM, or (`:llm`) the pretrained one.
  c.sft = config_lib.load_config_file(
      _HERE / ("ml100k_smollm2.py" if arg.llm else "ml100k_sft.py"), smoke)
  c.sft.unlock()
  c.sft.sids_workdir = f"{root}/sids"
  c.sft.progress_bar = False
  if not arg.llm:
    # The base: packed SFT, evaluated every other epoch.
    c.sft.train.num_epochs = 4
    c.sft.eval.every_epochs = 2
    c.sft.train.patience = 2

  c.cot = ml_collections.ConfigDict()
  c.cot.variants = ("no_cot", "direct", "rupr", "rupr_orft")
  c.cot.per_user = 3  # CoT examples: each user's last training targets
  # Users with CoT examples: 0 = all, else a fixed sample of that many.
  c.cot.num_users = 0
  c.cot.k = 2  # candidate rationales per example (Taiji: 3)
  # Statements per teacher rationale (at most; teachers.MAX_SENTENCES = 4).
  c.cot.max_sentences = 4
  c.cot.max_think = 64  # rationale budget in tokens (training and decoding)
  # Examples whose rationales join the vocabulary's corpus (0: none, so the
  # base is exactly configs/ml100k_sft.py's model and vocabulary).
  c.cot.vocab_examples = 0
  c.cot.epochs = 1  # fine-tune epochs over each variant's rows
  # Copies of the base's training rows mixed into every fine-tune (0: the
  # CoT rows alone, which forgets: README, "Reasoning").
  c.cot.replay = 1
  c.cot.lr = 5e-4
  c.cot.warmup_steps = 10
  # Who writes the candidates: "attribute" (teachers.AttributeTeacher, from
  # the data) or "chat" (an instruct LLM through its chat template,
  # cot/chat_teacher.py, with the settings below).
  c.cot.teacher = "chat" if arg.llm else "attribute"
  c.cot.chat = ml_collections.ConfigDict()
  c.cot.chat.model = "SmolLM2-135M-Instruct"  # or a .gguf / HF directory
  c.cot.chat.max_items = 20  # most recent history items in the prompt
  c.cot.chat.max_new_tokens = 64
  c.cot.chat.temperature = 0.7
  c.cot.chat.batch_size = 16
  c.cot.chat.noun = "movie"
  c.cot.orft = ml_collections.ConfigDict()
  # The model whose answer perplexity scores the candidates: "base" (never
  # trained on them) or "rupr" (fine-tuned on them: in sample, refused
  # unless allow_in_sample; the README's first table used it).
  c.cot.orft.scorer = "base"
  c.cot.orft.allow_in_sample = False
  c.cot.orft.quantile = 0.5  # R = this quantile of the PPLs (Taiji: median)
  c.cot.orft.batch_size = 64

  # RL from one fine-tuned variant (`rl_runs.start`): GRPO with the
  # semantic and preference rewards and reasoning rollouts (think, then the
  # trie-constrained answer), one run per fixed weight and adaptive rule
  # (`studies/rl_variants.py`; the rules' settings are the Pareto
  # experiment's, POPO's mu and floor chosen there on a tuning seed), the
  # final parameters evaluated with the held-out judges. No runs: set
  # `rl_runs.fixed_semantic_weights=() rl_runs.adaptive=()`.
  c.rl = config_lib.load_config_file(_HERE / "ml100k_rl.py",
                                     "think,smoke" if arg.smoke else "think")
  c.rl.unlock()
  c.rl.sasrec_workdir = f"{root}/sasrec"
  c.rl.progress_bar = False
  c.rl.eval.every_steps = 0  # the final parameters (no selection on valid)
  c.rl.rollout.max_think = c.cot.max_think
  c.rl.train.num_steps = 45  # the Pareto experiment's budget
  c.rl_runs = ml_collections.ConfigDict()
  c.rl_runs.start = "rupr_orft"
  c.rl_runs.fixed_semantic_weights = (0.5,)
  c.rl_runs.adaptive = ("popo_light", "popo")
  c.rl_runs.rules = ml_collections.ConfigDict(
      config_lib.load_config_file(_HERE / "ml100k_pareto.py").rules.to_dict())

  if arg.smoke:
    c.seeds = (0,)
    # sids, sasrec: make run CONFIG=configs/ml100k.py:smoke WORKDIR=runs/smoke
    c.sft.train.num_epochs = 2
    c.sft.eval.every_epochs = 1
    c.cot.k = 2
    c.cot.max_think = 24
    c.cot.max_sentences = 2
    c.cot.vocab_examples = 40
    c.cot.per_user = 2
    c.cot.orft.batch_size = 16
    c.cot.chat.model = "tiny-random-llama"
    c.cot.chat.max_items = 6
    c.cot.chat.max_new_tokens = 12
    c.cot.chat.batch_size = 8
    c.cot.chat.noun = "item"
    c.rl.rollout.max_think = c.cot.max_think
    c.rl.train.num_steps = 2
    c.rl_runs.adaptive = ("popo",)
  return c.lock()

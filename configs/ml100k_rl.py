r"""RL alignment of the SFT SID-LLM on MovieLens-100k (GRPO family).

Launch (from the repository root, after `make run` has trained the sasrec,
sids and sft stages into runs/ml100k/):

  .venv/bin/python experiments/train_rl.py \
      --config configs/ml100k_rl.py --workdir runs/ml100k/rl

The policy starts from the SFT run's best parameters (`sft_workdir`,
default `<workdir>/../sft`), which also stay frozen as the KL reference.
Each step draws `rollout.group_size` trie-constrained answers for each of
`train.batch_size` training prompts, scores them with the `rewards`
(semantic: MiniLM cosine of answer and target item; preference: SASRec's
min-max-normalised score of the answer for the user), combines them with
`weights` (`weighting="fixed"`; or the adaptive `popo`, `popo_light`,
`mgda` rules with `weighting_cfg`, README "Pareto front"), and takes `train.epochs` x
`train.num_minibatches` optimizer steps on `objective`.

Expected (README "RL alignment", `make rl-table`: 3 seeds, 2 CPU cores,
520-796 s per run beside other jobs): test semantic reward of the top-1
item 0.500 ± 0.020 after the last step vs the SFT model's 0.454 ± 0.010,
preference reward 0.874 vs 0.876, NDCG@10 0.0523 vs 0.0518 (within noise).

Variants (after the colon): `smoke` (synthetic data, tiny decoder, a few
steps; reads the smoke pipeline's runs), `objective=<name>` (grpo, dr_grpo,
dapo, ecpo, gbpo, dpo, rspo), `think` (reasoning rollouts), `seed=N`.
`loss.*` fields left unset (None) take the objective's paper defaults
(`taiji_jax.rl.objectives.defaults`). Any field can be overridden, e.g.
`--config.train.lr=1e-4 --config.weights.semantic=0.25`.
"""

import ml_collections
from ml_collections import config_dict

from taiji_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, smoke=False, seed=0, objective="grpo", think=False)
  c = ml_collections.ConfigDict()
  # An upstream run that changed since this one was made from it:
  # "rerun" sets this run aside (<workdir>/stale/) and makes it again,
  # "error" refuses (taiji_jax.train.workdir.check_inputs).
  c.on_stale_inputs = "rerun"
  c.seed = arg.seed
  c.progress_bar = True
  c.sft_workdir = ""  # "": <workdir>/../sft
  c.sasrec_workdir = ""  # "": <sft_workdir>/../sasrec
  c.prompts_per_user = 1  # each user's last training targets

  c.rewards = ("semantic", "preference")
  c.weighting = "fixed"  # or popo_light / popo / mgda
  # The starting weights (and the fixed ones).
  c.weights = ml_collections.ConfigDict({"semantic": 0.5, "preference": 0.5})
  # Settings of the gradient-based rules (taiji_jax.rl.weighting.make).
  c.weighting_cfg = ml_collections.ConfigDict(
      dict(
          gradients="params",  # or "hidden": MGDA-UB
          layers="all",  # or "last:N" or "re:<regex>"
          groups=0,  # rollout groups the gradients are taken on (0: all)
          eta=config_dict.placeholder(float),  # popo step (None: train.lr)
          # popo regulariser: the step is eta * I / mu. 1e-5 is Lu et al.'s;
          # configs/ml100k_pareto.py uses 5e-4, chosen by its `:tune`
          # variant on a tuning seed (README "Pareto front").
          mu=1e-5,
          normalization="",  # "": none for popo, l2 for mgda
          # Floor of the applied weights (a projection; the rule's state
          # evolves untouched).
          min_weight=0.0,
          # "auto": "objectives" (loss sum_k w_k L_k + KL) for popo/mgda,
          # "rewards" (the paper's r = sum_k w_k r_k, one group
          # normalisation) for fixed/popo_light.
          combine="auto",
          # "auto": per-reward gradients from the first minibatch's own
          # backward where possible (params, objectives, groups 0).
          fused="auto"))
  # Report the preference reward in evaluation even when not trained on.
  c.eval_preference = True
  c.text_encoder = ml_collections.ConfigDict({
      "name": "all-MiniLM-L6-v2",
      "path": "",
      "batch_size": 64
  })
  # Held-out judges in every evaluation (taiji_jax.rl.judges): models the
  # policy is not trained on. semantic: another text encoder (a causal LM,
  # PromptEOL last-token state, centred); preference: item-kNN on the
  # training split.
  c.judges = ml_collections.ConfigDict(
      dict(
          names=("semantic", "preference"),
          text_encoder=dict(
              name="SmolLM2-135M-Instruct", path="", batch_size=32),
          knn_neighbours=100,
          knn_shrink=0.0))

  c.rollout = ml_collections.ConfigDict(
      dict(
          group_size=8,
          temperature=1.0,
          think=arg.think,
          max_think=32,
          hit_beams=0,
          renormalise=True))

  c.objective = arg.objective
  c.advantage = "auto"  # or std / center / none / gdpo
  # Unset (None): the objective's default (objectives.defaults(objective));
  # set one with e.g. --config.loss.kl_coef=0.01.
  c.loss = ml_collections.ConfigDict({
      k: config_dict.placeholder(float)
      for k in ("eps_low", "eps_high", "kl_coef", "delta", "beta")
  })

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # prompts per step (x group_size rollouts)
  c.train.num_steps = 90  # ~3 passes over the 943 prompts
  c.train.epochs = 1  # passes over each rollout batch
  c.train.num_minibatches = 2  # optimizer steps per pass
  c.train.keep_groups = 0  # dynamic sampling: groups kept (0: off)
  c.train.lr = 1e-4
  c.train.schedule = "constant"
  c.train.warmup_steps = 5
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 15
  c.eval.batch_size = 128
  c.eval.early_stop_metric = "ndcg@10"  # picks the reported parameters
  # Also evaluate the SFT (reference) model on valid and test.
  c.eval.reference_model = True

  c.checkpoint_every_steps = 15
  c.max_nonfinite_frac = 0.25
  c.max_skipped_steps = 3

  if arg.smoke:
    # The LM judge costs a model download and a catalogue encoding; smoke
    # tests that check it pass judges.text_encoder.path (a tiny GGUF).
    c.judges.names = ("preference",)
    c.rollout.group_size = 4
    c.rollout.max_think = 8
    c.train.batch_size = 8
    c.train.num_steps = 6
    c.train.warmup_steps = 1
    c.train.lr = 1e-3
    c.eval.every_steps = 3
    c.eval.batch_size = 32
    c.checkpoint_every_steps = 3
  return c.lock()

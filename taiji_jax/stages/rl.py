"""The RL stage: align the SFT SID-LLM with rewards; resumable.

`train_and_evaluate(config, workdir)` is the whole stage (the absl entry
point `experiments/train_rl.py`, the pipeline's `rl` stage and notebooks
call it). It reads

  the SFT run     `config.sft_workdir` (default `<workdir>/../sft`): its
                  config, vocabulary, SIDs and best-valid parameters, which
                  start the policy and stay frozen as the reference;
  the SASRec run  `config.sasrec_workdir` (default `<sft>/../sasrec`): the
                  collaborative preference reward;
  item texts      encoded by `config.text_encoder` for the semantic reward
                  (the sids stage's cached embeddings are reused when they
                  were made by the same encoder from the same texts);

and writes into the workdir:

  config.json     the config (a resumed run must use the same one)
  embeddings/     the item text embeddings, if computed here
  checkpoints/    orbax: RL train state (params, optimizer, reward weights)
                  and the best-valid parameters, every
                  `checkpoint_every_steps` steps and at the end
  metrics.jsonl   one record per RL step: every reward's batch statistics,
                  the combined reward, loss, KL to the reference, clip
                  fraction, entropy, gradient norm, skipped updates, the
                  reward weights; valid metrics at evaluations (process 0)
  results.json    {"valid", "test"} of the best-valid parameters in the
                  format of the other stages, plus "test_last" (the final
                  parameters) and "sft" (the SFT model, same evaluation)

Training prompts are each user's last `prompts_per_user` training targets
(history = the items before), never the valid/test items. Step s uses the
prompts of a permutation seeded by (seed, epoch) (`rl_data.prompt_batches`,
a grain pipeline whose state is checkpointed) and the rollout key
fold_in(key(seed), s), so a resumed run repeats the uninterrupted one; the
loop is `train.fit`.
Evaluation is the SFT stage's (trie-constrained beam, history excluded) plus
the semantic and preference rewards of the top-1 item and the mean over the
top 10 (`reward/semantic@1`, ...).

Robustness: rollouts with a non-finite reward are masked out and counted;
a step where more than `max_nonfinite_frac` of the rollouts have one stops
the run with an error naming the reward. Updates with a non-finite loss or
gradient are skipped in-graph (no NaN reaches the parameters);
`max_skipped_steps` consecutive steps with every update skipped stop the
run. Groups whose rewards are all equal get zero advantage (logged as
`groups/zero_variance`).

Resume order: the latest checkpoint in `<workdir>/checkpoints`, else the
SFT parameters.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from taiji_jax import config_checks as checks
from taiji_jax import sharding
from taiji_jax.evaluate import full_ranking
from taiji_jax.generate import think as think_lib
from taiji_jax.rl import data as rl_data
from taiji_jax.rl import judges as judges_lib
from taiji_jax.rl import objectives as obj_lib
from taiji_jax.rl import rewards as rewards_lib
from taiji_jax.rl import rollout as rollout_lib
from taiji_jax.rl import train_step as step_lib
from taiji_jax.rl import weighting
from taiji_jax.sidlm import task
from taiji_jax.stages import artifacts
from taiji_jax.train import checkpointing
from taiji_jax.train import fit
from taiji_jax.train import metric_writer
from taiji_jax.train import optimizer
from taiji_jax.train import train_state
from taiji_jax.train import workdir as workdir_lib


def sft_dir(config, workdir) -> pathlib.Path:
  return artifacts.upstream_dir(config.sft_workdir, workdir, "sft")


def sasrec_dir(config, sft_workdir: pathlib.Path) -> pathlib.Path:
  return artifacts.upstream_dir(config.sasrec_workdir, sft_workdir, "sasrec")


def objective_config(config) -> obj_lib.ObjectiveConfig:
  """The objective's paper defaults, with the `config.loss` fields that are
  set (not None) over them."""
  base = obj_lib.defaults(config.objective)
  overrides = {k: float(v) for k, v in config.loss.items() if v is not None}
  unknown = set(overrides) - set(base.__dataclass_fields__)
  if unknown:
    raise ValueError(f"config.loss has unknown fields {sorted(unknown)}.")
  return obj_lib.ObjectiveConfig(**{**base.__dict__, **overrides})


def rollout_config(config, keep_hidden: bool = False
                  ) -> rollout_lib.RolloutConfig:
  return rollout_lib.RolloutConfig(
      **config.rollout.to_dict(), keep_hidden=keep_hidden)


def weight_rule(config) -> weighting.WeightRule:
  """`config.weighting` with `config.weighting_cfg` (eta None: the RL
  learning rate, as in Lu et al. 2025's reference code)."""
  wc = config.weighting_cfg
  eta = float(config.train.lr) if wc.eta is None else float(wc.eta)
  return weighting.make(
      config.weighting,
      gradients=wc.gradients,
      layers=wc.layers,
      groups=int(wc.groups),
      eta=eta,
      mu=float(wc.mu),
      normalization=wc.normalization,
      min_weight=float(wc.min_weight),
      combine=wc.combine,
      fused=wc.fused)


def _host_metrics(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def check_step(config, step: int, m: dict[str, float], names, meta) -> None:
  """The host's robustness checks after an RL step (module docstring).

  Raises:
    FloatingPointError: too many non-finite rewards, or too many steps in a
      row whose every update was skipped.
  """
  if m["reward/nonfinite_rows"] > config.max_nonfinite_frac:
    bad = {
        n: m[f"reward/{n}/nonfinite"]
        for n in names
        if m[f"reward/{n}/nonfinite"] > 0
    }
    raise FloatingPointError(
        f"RL step {step}: {m['reward/nonfinite_rows']:.0%} of the rollouts "
        f"have a non-finite reward (more than config.max_nonfinite_frac="
        f"{config.max_nonfinite_frac}); non-finite fraction per reward: "
        f"{bad}. Check those reward functions.")
  if m["reward/nonfinite_rows"] > 0:
    logging.warning("RL step %d: %.1f%% of rollouts had a non-finite reward "
                    "and were masked out.", step,
                    100 * m["reward/nonfinite_rows"])
  if m["skipped"] >= m["updates"]:
    meta["skipped_in_a_row"] += 1
    logging.warning("RL step %d: every update skipped (non-finite loss or "
                    "gradient).", step)
    if meta["skipped_in_a_row"] >= config.max_skipped_steps:
      raise FloatingPointError(
          f"RL step {step}: {meta['skipped_in_a_row']} steps in a row had a "
          "non-finite loss or gradient in every update; parameters were kept "
          "at their last finite values (checkpoints are intact). Lower "
          "config.train.lr or check the rewards.")
  else:
    meta["skipped_in_a_row"] = 0


ADVANTAGES = ("auto", "std", "center", "none", "gdpo")


def check_settings(config: ml_collections.ConfigDict, prefix: str = ""):
  """Every setting, before any work: (reward names, weight rule, rollout
  config, objective config, initial weights).

  Raises:
    ValueError (`config_checks.ConfigError` for the plain ones): naming
      the key, its value and what is allowed.
  """
  checks.one_of(config, "objective", obj_lib.OBJECTIVES.names(), prefix)
  checks.one_of(config, "advantage", ADVANTAGES, prefix)
  checks.one_of(config, "on_stale_inputs", workdir_lib.ON_STALE, prefix)
  checks.training(config, prefix)
  checks.positive(config, ("train.num_steps", "train.epochs",
                           "train.num_minibatches", "rollout.temperature",
                           "prompts_per_user"), prefix)
  checks.positive(config, ("train.keep_groups", "eval.every_steps",
                           "checkpoint_every_steps"), prefix,
                  allow_zero=("train.keep_groups", "eval.every_steps",
                              "checkpoint_every_steps"))
  if config.rollout.group_size < 2:
    raise checks.ConfigError(
        f"{prefix + '.' if prefix else ''}rollout.group_size="
        f"{config.rollout.group_size!r}: group-relative advantages need at "
        "least 2 rollouts per prompt.")
  checks.in_range(config, "max_nonfinite_frac", 0.0, 1.0, prefix)
  judge_metrics = [f"judge/{n}@{k}" for n in judges_lib.JUDGES for k in (1, 10)]
  reward_metrics = [
      f"reward/{n}@{k}" for n in rl_data.EVAL_REWARDS for k in (1, 10)
  ]
  checks.ranking_metric(config, "eval.early_stop_metric", (1, 5, 10, 20),
                        prefix, extra=reward_metrics + judge_metrics)
  try:
    names = rewards_lib.check_names(config.rewards)
    rule = weight_rule(config)
    rcfg = rollout_config(config, keep_hidden=rule.gradients == "hidden")
    ocfg = objective_config(config)
    w0 = weighting.initial_weights(names, dict(config.weights))
  except (ValueError, TypeError) as e:
    raise checks.ConfigError(f"{prefix + ': ' if prefix else ''}{e}") from e
  return names, rule, rcfg, ocfg, w0


@workdir_lib.one_run_at_a_time(check=check_settings)
def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: os.PathLike | str) -> dict[str, Any]:
  """Runs (or resumes) the RL stage; returns what results.json holds."""
  start = time.perf_counter()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  names, rule, rcfg, ocfg, w0 = check_settings(config)
  workdir_lib.write_or_check_config(workdir, config)
  src = sft_dir(config, workdir)
  needs_sasrec = "preference" in names or config.eval_preference
  inputs = {"sft": src}
  if needs_sasrec:
    inputs["sasrec"] = sasrec_dir(config, src)
  workdir_lib.check_inputs(workdir, inputs, config.on_stale_inputs)
  sft_config, data = artifacts.sft_run(src)
  vocab, sids, dataset = data.vocab, data.sids, data.dataset
  sasrec_graphdef, sasrec_params, pref_len = None, None, sft_config.max_items
  if needs_sasrec:
    model, sasrec_config = artifacts.checked_sasrec(
        sasrec_dir(config, src), dataset.name, dataset.num_items,
        "the preference reward")
    sasrec_graphdef, sasrec_params = nnx.split(model, nnx.Param)
    pref_len = int(sasrec_config.max_len)
  tables = {
      "item_embeddings":
          rl_data.item_embeddings(config, artifacts.sids_dir(sft_config, src),
                                  dataset, workdir)
  }
  if sasrec_params is not None:
    tables["sasrec_params"] = sasrec_params
  judge_names = tuple(config.judges.names)
  tables.update(
      rl_data.judge_tables(config, dataset, data.split,
                           artifacts.sids_dir(sft_config, src), workdir))

  # The SFT run's mesh and sharding rules (its config.json).
  decoder, setup = artifacts.sft_decoder(src, data)
  mesh = setup.mesh
  rules = tuple(tuple(r) for r in sft_config.sharding_rules)
  graphdef = setup.graphdef
  # The reward tables are small: replicated on every device of the mesh.
  tables = jax.device_put(
      tables,
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  ref_params = setup.copy_params(nnx.state(decoder, nnx.Param))

  prompts = rl_data.training_prompts(config, sft_config, data, pref_len)
  b = int(config.train.batch_size)
  num_steps = int(config.train.num_steps)
  prompt_batches = rl_data.prompt_batches(
      prompts, b, int(config.seed), num_steps,
      sharding.process_rows(mesh, b, rules))
  updates = num_steps * int(config.train.epochs) * int(
      config.train.num_minibatches)
  tx = optimizer.from_config(config, updates)
  init = lambda p: step_lib.init_state(p, tx, w0)
  state_shardings = sharding.tree_shardings(
      jax.eval_shape(init, ref_params), mesh, rules)
  with sharding.use_mesh(mesh, rules):
    state = jax.jit(init, out_shardings=state_shardings)(ref_params)

  allowed_v, markers = None, None
  if rcfg.think:
    allowed_v = jnp.asarray(
        think_lib.think_token_mask(vocab.text_mask(), vocab.think_end_id))
    markers = dict(
        think_id=vocab.think_id,
        think_end_id=vocab.think_end_id,
        answer_id=vocab.answer_id)
  reward_fn = rewards_lib.make_reward_fn(names, sasrec_graphdef)
  rollout_fn = jax.jit(
      rollout_lib.make_rollout_fn(
          graphdef,
          rcfg,
          sids.trie,
          sids.paths,
          vocab.level_offsets,
          reward_fn,
          pad_id=vocab.pad_id,
          markers=markers,
          allowed_v=allowed_v))
  keep_groups = int(config.train.keep_groups)
  train_step = jax.jit(
      step_lib.make_train_step(
          graphdef,
          tx,
          rcfg,
          vocab.level_offsets,
          names,
          objective=config.objective,
          objective_cfg=ocfg,
          weight_rule=rule,
          advantage=config.advantage,
          num_minibatches=int(config.train.num_minibatches),
          epochs=int(config.train.epochs),
          keep_groups=keep_groups,
          allowed_v=allowed_v,
          seed=int(config.seed)),
      in_shardings=(state_shardings, None, None),
      out_shardings=(state_shardings, None),
      donate_argnums=(0,))
  copy_params = train_state.params_copier(state_shardings)
  put = setup.put_batch
  eval_step = jax.jit(
      rl_data.make_eval_step(sft_config, graphdef, data, sasrec_graphdef,
                             judge_names))
  parts = rl_data.eval_parts(sft_config, data, pref_len)
  put_eval = task.eval_putter(setup, vocab.pad_id)

  def evaluate(params, part):
    with sharding.use_mesh(mesh, rules):
      return full_ranking.evaluate(eval_step, {
          "policy": params,
          "tables": tables
      }, parts[part], int(config.eval.batch_size), put_eval)

  ckpt = checkpointing.Checkpoints(workdir / "checkpoints")
  metric = config.eval.early_stop_metric
  every_eval = int(config.eval.every_steps)
  schedule = fit.Schedule(
      num_steps=num_steps,
      eval_every=every_eval,
      checkpoint_every=int(config.checkpoint_every_steps),
      metric=metric)
  state, best_params, meta, _ = fit.resume(
      ckpt, state, copy_params(state["params"]), state_shardings,
      fit.initial_meta(skipped_in_a_row=0, sft_valid=None))
  writer = metric_writer.MetricWriter(workdir, resume_step=meta["step"])
  if meta["sft_valid"] is None and every_eval:
    meta["sft_valid"] = evaluate(ref_params, "valid")
    meta["best"] = meta["sft_valid"][metric]
    writer.write(0, {f"valid/{k}": v for k, v in meta["sft_valid"].items()})
    logging.info("SFT valid %s: %.4f", metric, meta["best"])

  batches = iter(prompt_batches.to_iter_dataset())

  def rl_step(state, batch, step):
    key = jax.random.fold_in(jax.random.key(int(config.seed)), step)
    roll, rewards_nk = rollout_fn(state["params"], ref_params, tables,
                                  put(batch, b), key)
    return train_step(state, roll, rewards_nk)

  def record(window, step, meta):
    m = _host_metrics(window[-1])
    check_step(config, step, m, names, meta)
    return m

  with sharding.use_mesh(mesh, rules):
    out = fit.fit(
        state,
        best_params,
        meta,
        train_step=rl_step,
        batches=batches,
        schedule=schedule,
        checkpoints=ckpt,
        writer=writer,
        copy_params=copy_params,
        evaluate=lambda params: evaluate(params, "valid"),
        record=record,
        postfix=lambda r, m: dict(
            reward=f"{r['reward/combined/mean']:.3f}", kl=f"{r['kl']:.4f}"),
        progress=f"rl {config.objective}",
        progress_bar=config.progress_bar)
    state, best_params, meta = out.state, out.best_params, out.meta
  ckpt.close()
  if not every_eval:  # no selection: the final parameters (fit's result)
    meta["best_valid"] = evaluate(best_params, "valid")
    if config.eval.reference_model:
      meta["sft_valid"] = evaluate(ref_params, "valid")
  test = evaluate(best_params, "test")
  results = {
      "valid": meta.get("best_valid") or meta["sft_valid"],
      "test": test,
      # The same parameters without evaluation in between: not again.
      "test_last": test if not every_eval else evaluate(
          state["params"], "test"),
      # The SFT model's own evaluation (config.eval.reference_model; with
      # evaluation during training its valid metrics are always there).
      "sft": {
          "valid": meta["sft_valid"],
          "test": evaluate(ref_params, "test")
      } if config.eval.reference_model else None,
      "best_step": meta["best_step"],
      "steps": meta["step"],
      "objective": config.objective,
      "objective_config": dict(ocfg.__dict__),
      "rewards": names,
      "weighting": config.weighting,
      "final_weights": dict(
          zip(names, np.asarray(state["reward_weights"]).tolist())),
      "sft_workdir": workdir_lib.relative(src, workdir),
      "seconds": time.perf_counter() - start,
  }
  metric_writer.write_results(workdir, results)
  return results


def read_metrics(workdir: os.PathLike | str) -> list[dict[str, Any]]:
  """The records of `<workdir>/metrics.jsonl`."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]

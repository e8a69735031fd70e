r"""Benchmarks the cost of each reward-weighting rule in the RL step.

  .venv/bin/python experiments/bench/popo_cost.py --workdir runs/bench

One rollout batch is drawn once (`--batch_size` prompts x `--group_size`
trie-constrained samples from a decoder with random weights; the SFT
config's model, `--config configs/ml100k_sft.py`, or `--preset`), with two
synthetic rewards of the answer that conflict, and then the jitted train
step (`rl/train_step.py`, GRPO, `--minibatches` optimizer updates) is timed
on that same batch for every rule:

  grpo_1_reward     single-reward GRPO (the baseline: one reward column);
  fixed             two rewards, fixed weights (no extra work);
  popo_light        coefficient-of-variation weights (no gradients);
  mgda_ub           MGDA-UB: per-reward gradients w.r.t. the final hidden
                    states (the LM head's backward only);
  popo, mgda        full per-reward gradients over every parameter, fused
                    into the first minibatch's backward (one forward + a
                    K-cotangent vmapped VJP, + 1 with a KL term) and the
                    Gram matrix (`WeightRule.fused`);
  popo_separate     the same from a separate pass over the whole batch
                    before the updates;
  popo_last1        the same over the last block and the final norm only;
  popo_quarter      full per-reward gradients on a quarter of the groups
                    (`weighting_cfg.groups`).

Each rule is compiled ahead of time, then the rules are timed round-robin
(`--repeats` rounds, one call each, `jax.block_until_ready`), so a slower
or busier moment of the machine hits every rule alike; the result is the
median per rule and its ratio to the baseline's median, for the train step
alone and for the whole RL step (rollout + train step, the rollout timed
the same way). Writes `<workdir>/popo_cost.json` and prints markdown rows.
"""

import pathlib
import time
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from taiji_jax import benchmarking
from taiji_jax import launch
from taiji_jax import sharding
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.rl import objectives
from taiji_jax.rl import rollout as rollout_lib
from taiji_jax.rl import train_step as step_lib
from taiji_jax.rl import weighting
from taiji_jax.testing import sids as sid_testing

PAD_ID = 0
SFT_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / (
    "ml100k_sft.py")
# name -> (groups in the batch -> the rule).
RULES = {
    "grpo_1_reward": lambda b: weighting.make("fixed"),
    "fixed": lambda b: weighting.make("fixed"),
    "popo_light": lambda b: weighting.make("popo_light"),
    "mgda_ub": lambda b: weighting.make("mgda", gradients="hidden"),
    "popo": lambda b: weighting.make("popo", mu=1e-3),
    "mgda": lambda b: weighting.make("mgda"),
    "popo_separate": lambda b: weighting.make("popo", mu=1e-3, fused=False),
    "popo_last1": lambda b: weighting.make("popo", mu=1e-3, layers="last:1"),
    "popo_quarter": lambda b: weighting.make("popo", mu=1e-3,
                                             groups=max(b // 4, 1)),
}
BASELINE = "grpo_1_reward"


def _rewards(tables, inputs):
  """Two conflicting synthetic rewards of the answer (N, 2)."""
  del tables
  x = inputs.items.astype(jnp.float32)
  return jnp.stack([jnp.sin(0.37 * x), jnp.cos(0.11 * x)], 1)


def _timed_s(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def run(model_cfg: decoder_lib.DecoderConfig,
        codebooks: Sequence[int],
        num_items: int = 1682,
        batch_size: int = 32,
        group_size: int = 8,
        prompt_len: int = 152,
        minibatches: int = 2,
        repeats: int = 5,
        rules: Sequence[str] = tuple(RULES),
        mesh: jax.sharding.Mesh | None = None,
        seed: int = 0,
        compiler_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Times the train step of every rule on one rollout batch."""
  if BASELINE not in rules:
    rules = (BASELINE,) + tuple(rules)
  unknown = sorted(set(rules) - set(RULES))
  if unknown:
    raise ValueError(f"unknown rules {unknown}; known: {list(RULES)}.")
  rules_lib = sharding.DEFAULT_RULES
  mesh = mesh if mesh is not None else sharding.make_mesh()
  graphdef, params = nnx.split(
      decoder_lib.init_sharded(model_cfg, mesh, rules_lib, seed))
  sids = sid_testing.random_semantic_ids(num_items, codebooks, seed)
  offsets = benchmarking.level_offsets(codebooks)
  cfg = rollout_lib.RolloutConfig(group_size=group_size, keep_hidden=True)
  rollout = jax.jit(
      rollout_lib.make_rollout_fn(graphdef, cfg, sids.trie, sids.paths,
                                  offsets, _rewards, pad_id=PAD_ID))
  host = benchmarking.random_inputs(batch_size, prompt_len,
                                    model_cfg.vocab_size, num_items, 20,
                                    PAD_ID, seed)
  batch = {
      "prompts": host["prompts"],
      "seen": host["seen"],
      "targets": host["seen"][:, 0],
      "users": np.arange(batch_size, dtype=np.int32),
      "pref_histories": host["seen"],
  }
  put = lambda x: jax.device_put(
      x, sharding.data_sharding(mesh, x.ndim, rules_lib, x.shape))
  batch = jax.tree.map(put, batch)
  tx = optax.adamw(1e-4)
  compiled, compile_s = {}, {}
  with sharding.use_mesh(mesh, rules_lib):
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    roll_c = rollout.lower(params, params, {}, batch,
                           key).compile(compiler_options)
    compile_s["rollout"] = time.perf_counter() - t0
    roll, rewards = roll_c(params, params, {}, batch, key)
    for name in rules:
      names = ("a",) if name == BASELINE else ("a", "b")
      r = rewards[:, :1] if name == BASELINE else rewards
      step = step_lib.make_train_step(
          graphdef, tx, cfg, offsets, names, objective="grpo",
          objective_cfg=objectives.defaults("grpo"),
          weight_rule=RULES[name](batch_size), num_minibatches=minibatches)
      state = step_lib.init_state(params, tx,
                                  jnp.full((len(names),), 1 / len(names)))
      t0 = time.perf_counter()
      fn = jax.jit(step).lower(state, roll, r).compile(compiler_options)
      compile_s[name] = time.perf_counter() - t0
      _timed_s(fn, state, roll, r)  # warm-up
      compiled[name] = (fn, state, r)
    _timed_s(roll_c, params, params, {}, batch, key)
    times = {name: [] for name in ("rollout",) + tuple(rules)}
    for _ in range(repeats):
      times["rollout"].append(
          _timed_s(roll_c, params, params, {}, batch, key))
      for name in rules:
        fn, state, r = compiled[name]
        times[name].append(_timed_s(fn, state, roll, r))
  med = {k: float(np.median(v)) for k, v in times.items()}
  base, roll_s = med[BASELINE], med["rollout"]
  per_rule = {
      name: {
          "train_step_ms": round(1e3 * med[name], 2),
          "train_step_ratio": round(med[name] / base, 3),
          "rl_step_ratio": round((roll_s + med[name]) / (roll_s + base), 3),
          "times_ms": [round(1e3 * t, 2) for t in times[name]],
          "compile_s": round(compile_s[name], 2),
      } for name in rules
  }
  return {
      **benchmarking.environment_fields(mesh.size),
      "num_params": int(decoder_lib.count_params(model_cfg)),
      "num_layers": model_cfg.num_layers,
      "hidden_size": model_cfg.hidden_size,
      "vocab_size": model_cfg.vocab_size,
      "dtype": model_cfg.dtype,
      "rollouts": batch_size * group_size,
      "prompt_len": prompt_len,
      "minibatches": minibatches,
      "repeats": repeats,
      "rollout_ms": round(1e3 * roll_s, 2),
      "rollout_times_ms": [round(1e3 * t, 2) for t in times["rollout"]],
      "rules": per_rule,
      **benchmarking.memory_fields(),
  }


def markdown_rows(r: Mapping[str, Any]) -> str:
  """README rows: rule, train-step ms, ratio, RL-step ratio."""
  lines = []
  for name, x in r["rules"].items():
    lines.append(f"| {name} | {x['train_step_ms']} | "
                 f"{x['train_step_ratio']:.3f}x | {x['rl_step_ratio']:.3f}x |")
  return "\n".join(lines)


def define_flags():
  benchmarking.define_sft_flags(SFT_CONFIG)
  flags.DEFINE_integer("num_items", 1682, "Items in the catalogue.")
  flags.DEFINE_integer("group_size", 8, "Rollouts per prompt.")
  flags.DEFINE_integer("prompt_len", 152, "Prompt tokens (left-padded).")
  flags.DEFINE_integer("minibatches", 2, "Optimizer updates per step.")
  flags.DEFINE_integer("repeats", 5, "Timed rounds over the rules.")
  flags.DEFINE_list("rules", list(RULES), "Rules to time.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch.setup()
  f = flags.FLAGS
  bench = benchmarking.sft_from_flags()
  result = {"preset": bench.preset}
  result |= run(bench.model_cfg, bench.codebooks, f.num_items,
                f.batch_size or 32, f.group_size, f.prompt_len,
                f.minibatches, f.repeats, tuple(f.rules), bench.mesh)
  benchmarking.write_result(f.workdir, "popo_cost", result,
                            markdown_rows(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)

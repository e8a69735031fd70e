r"""Benchmarks the SFT train step: steps/s, tokens/s, TFLOP/s and MFU.

  .venv/bin/python experiments/bench/sft_train.py --workdir runs/bench \
      --steps 10

Defaults come from `--config` (`configs/ml100k_sft.py`): its decoder
(`task.model_config`: preset "small" with hidden 128, 2 layers, 4 heads / 2
kv heads, MLP 256) on the vocabulary of `--codebooks` 64/64/64/4 (8
specials + 196 SID codes + config.vocab.size 1,000 pieces: 1,204 ids), rows
of `task.row_length` = 32 prefix + 31 items x 4 SID tokens = 156 tokens, its
batch of 64 and its optimizer (`optimizer.from_config`: AdamW with
warmup, cosine decay and global norm clipping). Any preset and overrides
can be given, e.g. `--preset=llama_1b --overrides='{"remat": true}'
--dtype=bfloat16 --batch_size=8 --seq_len=1024` (the preset's own
vocabulary unless `--vocab_size`); `--config.train.lr=...` etc. as usual.

The step is the SFT trainer's own (`task.make_train_step` +
`task.jit_train_step`, state donated) on random, fixed token batches already
on the device (no padding; loss on every token, or with `--targets_per_row`
on each row's last N only, the LM head then run at those positions only),
so the figures exclude the
input pipeline. Compilation and the first step are timed separately from
the `--steps` timed steps (one `jax.block_until_ready` at the end).

FLOPs per token follow the PaLM / MaxText convention for training (forward
+ backward = 3 x forward, no rematerialisation counted):

  6 * N_matmul + 12 * num_layers * T * num_heads * head_dim

N_matmul is the parameters that are multiplied per token: every block
parameter, the final norm and the LM head's V x D matrix, but not the input
embedding table (a lookup, not a matmul). With tied embeddings that is all
parameters; with a separate head it is all but one V x D table. The
attention term counts QK^T and AV over the full T x T square (no causal
halving) with T the model's input length (`seq_len - 1`: input t predicts
token t + 1). Tokens/s counts those B x (T - 1) input positions.

MFU = achieved FLOP/s / peak, with the peak from `--peak_tflops` or the
device kind (H100/H200: 989 TFLOP/s, A100: 312 TFLOP/s, dense bf16); none on
CPU. It is relative to the bf16 peak even for a float32 model.
Writes `<workdir>/sft_train.json` and prints a markdown row.
"""

import math
import pathlib
import time
from typing import Any, Mapping

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from taiji_jax import benchmarking
from taiji_jax import launch
from taiji_jax import sharding
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.sidlm import task
from taiji_jax.train import optimizer

SFT_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / (
    "ml100k_sft.py")

# Dense bf16 peak TFLOP/s per chip, matched as substrings of device_kind.
PEAK_TFLOPS = (("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100",
                                                                    312.0))


def peak_tflops(device_kind: str) -> float | None:
  for name, peak in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def flops_per_token(cfg: decoder_lib.DecoderConfig, seq_len: int) -> dict:
  """Training FLOPs per token (module docstring), and the N used."""
  num_params = decoder_lib.count_params(cfg)
  table = cfg.vocab_size * cfg.hidden_size
  n_matmul = num_params if cfg.tie_embeddings else num_params - table
  attention = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
  return {
      "num_params": int(num_params),
      "n_matmul": int(n_matmul),
      "flops_per_token": int(6 * n_matmul + attention),
  }


def random_batches(num: int,
                   batch_size: int,
                   seq_len: int,
                   vocab_size: int,
                   seed: int = 0,
                   targets_per_row: int = 0) -> list[dict[str, np.ndarray]]:
  """Deterministic random rows: tokens in [1, V), loss on all but token 0;
  with `targets_per_row` > 0 on each row's last that many tokens only, the
  head run at those positions only (`task.loss_positions`), as in SFT."""
  rng = np.random.default_rng(seed)
  mask = np.ones((batch_size, seq_len), bool)
  mask[:, :seq_len - targets_per_row if targets_per_row else 1] = False
  extra = ({"loss_positions": task.loss_positions(mask, targets_per_row)}
           if targets_per_row else {})
  return [{
      "tokens":
          rng.integers(1, vocab_size, (batch_size, seq_len), dtype=np.int32),
      "loss_mask":
          mask,
      **extra,
  } for _ in range(num)]


def run(model_cfg: decoder_lib.DecoderConfig,
        config: ml_collections.ConfigDict,
        batch_size: int,
        seq_len: int,
        steps: int = 10,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding.Rules | None = None,
        peak: float | None = None,
        seed: int = 0,
        compiler_options: Mapping[str, Any] | None = None,
        targets_per_row: int = 0) -> dict[str, Any]:
  """Compiles and times the SFT train step; returns the measurements.

  Args:
    model_cfg: the decoder.
    config: the SFT config; its `train` fields make the optimizer.
    batch_size: global batch B.
    seq_len: tokens per row T.
    steps: timed steps after the compile + first step.
    mesh: the mesh (default: all devices on `data`).
    rules: logical-axis rules (default `sharding.DEFAULT_RULES`).
    peak: peak TFLOP/s per device for MFU (default: from the device kind).
    seed: parameter and data seed.
    compiler_options: XLA options for the compiles (tests lower the CPU
      backend's optimisation level with them).
    targets_per_row: > 0: the loss (and the LM head) on each row's last
      that many tokens only, the SFT rows' shape (their prompts carry no
      loss); 0: on every token.
  """
  rules = tuple(rules) if rules is not None else sharding.DEFAULT_RULES
  mesh = mesh if mesh is not None else sharding.make_mesh()
  tx = optimizer.from_config(config, steps + 1)
  graphdef, init_state = task.state_init_fn(model_cfg, tx, seed)
  state_shardings = sharding.tree_shardings(
      jax.eval_shape(init_state), mesh, rules)
  step_fn = task.jit_train_step(
      task.make_train_step(graphdef, tx, pad_id=0), state_shardings, mesh)
  batch_sharding = sharding.data_sharding(mesh, 2, rules, (batch_size, seq_len))
  batches = [
      jax.device_put(b, batch_sharding) for b in random_batches(
          2, batch_size, seq_len, model_cfg.vocab_size, seed, targets_per_row)
  ]
  with sharding.use_mesh(mesh, rules):
    state = jax.jit(
        init_state,
        out_shardings=state_shardings).lower().compile(compiler_options)()
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batches[0]).compile(compiler_options)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = compiled(state, batches[0])
    jax.block_until_ready((state, metrics))
    first_step_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
      state, metrics = compiled(state, batches[(i + 1) % len(batches)])
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - t0
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss} in the benchmark.")

  flops = flops_per_token(model_cfg, seq_len - 1)
  tokens_per_step = batch_size * (seq_len - 1)
  # The head's 6 V D per token is not spent where it does not run.
  headless = (tokens_per_step - batch_size * targets_per_row
              if targets_per_row else 0)
  flops_per_step = (tokens_per_step * flops["flops_per_token"] -
                    headless * 6 * model_cfg.vocab_size * model_cfg.hidden_size)
  steps_per_s = steps / elapsed
  tokens_per_s = steps_per_s * tokens_per_step
  tflops_per_device = steps_per_s * flops_per_step / mesh.size / 1e12
  env = benchmarking.environment_fields(mesh.size)
  if peak is None and env["platform"] != "cpu":
    peak = peak_tflops(jax.devices()[0].device_kind)
  model = ("vocab_size", "hidden_size", "num_layers", "num_heads",
           "num_kv_heads", "head_dim", "intermediate_size", "tie_embeddings",
           "dtype", "param_dtype", "remat")
  return {
      **env,
      "mesh": {
          k: int(v) for k, v in mesh.shape.items()
      },
      "model": {
          k: getattr(model_cfg, k) for k in model
      },
      **flops,
      "batch_size": batch_size,
      "seq_len": seq_len,
      "tokens_per_step": tokens_per_step,
      "targets_per_row": targets_per_row,
      "flops_per_step": int(flops_per_step),
      "steps": steps,
      "compile_s": round(compile_s, 2),
      "first_step_s": round(first_step_s, 3),
      "step_ms": round(1e3 * elapsed / steps, 2),
      "steps_per_s": round(steps_per_s, 2),
      "tokens_per_s": round(tokens_per_s, 1),
      "tflops_per_device": round(tflops_per_device, 4),
      "peak_tflops": peak,
      "mfu": round(tflops_per_device / peak, 4) if peak else None,
      "final_loss": round(loss, 4),
      **benchmarking.memory_fields(),
  }


def markdown_row(r: Mapping[str, Any]) -> str:
  """The README row: device, params, B x T, step ms, tokens/s, TFLOP/s per
  device, MFU, compile s, peak RSS MiB."""
  mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
  return (f"| {r['device']} | {r['num_params']:,} | {r['batch_size']} x "
          f"{r['seq_len']} | {r['step_ms']} | {r['tokens_per_s']:,.0f} | "
          f"{r['tflops_per_device']} | {mfu} | {r['compile_s']} | "
          f"{r['peak_rss_mib']} |")


def define_flags():
  """The entry point's flags (not defined on import, so tests can import)."""
  benchmarking.define_sft_flags(SFT_CONFIG)
  flags.DEFINE_integer(
      "seq_len", None,
      "Tokens per row (default: task.row_length of the config and codebooks).")
  flags.DEFINE_bool("remat", None, "Rematerialise blocks (default: model's).")
  flags.DEFINE_integer("steps", 10, "Timed steps.")
  flags.DEFINE_integer(
      "targets_per_row", 0,
      "Loss (and LM head) on each row's last N tokens only; 0: every token.")
  flags.DEFINE_float("peak_tflops", None,
                     "Peak TFLOP/s per device for MFU (default: by kind).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch.setup()
  f = flags.FLAGS
  remat = {} if f.remat is None else {"remat": f.remat}
  bench = benchmarking.sft_from_flags(**remat)
  config = bench.config
  seq_len = f.seq_len or task.row_length(config, len(bench.codebooks))
  result = {"preset": bench.preset}
  result |= run(
      bench.model_cfg,
      config,
      f.batch_size or config.train.batch_size,
      seq_len,
      f.steps,
      bench.mesh,
      peak=f.peak_tflops,
      targets_per_row=f.targets_per_row)
  benchmarking.write_result(f.workdir, "sft_train", result,
                            markdown_row(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)

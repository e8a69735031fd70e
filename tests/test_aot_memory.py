"""The ahead-of-time memory check and the SFT / beam-search benchmarks."""

import importlib.util
import math
import pathlib

import jax
import numpy as np
import pytest

from taiji_jax import benchmarking
from taiji_jax import config_lib
from taiji_jax import sharding
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.train import aot

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "experiments" / "bench"
# Faster CPU compiles (LLVM effort only; the buffer assignment is the same).
FAST = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True
}


def _cfg(**overrides):
  """One tiny block whose sharded dims (embed 32) divide 4 fsdp devices.

  No attention bias: then every parameter has an `embed` dim.
  """
  kwargs = dict(hidden_size=32, num_layers=1, attention_bias=False)
  return decoder_lib.DecoderConfig.tiny(**{**kwargs, **overrides})


def _load(name):
  spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                BENCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _one_device():
  return sharding.make_mesh({"data": 1}, jax.devices()[:1])


@pytest.fixture(scope="module")
def one_device():
  return aot.train_step_memory(
      _cfg(),
      _one_device(),
      None,
      batch_size=4,
      seq_len=16,
      compiler_options=FAST)


def test_one_device_memory_is_positive_and_counts_params(one_device):
  r = one_device
  assert r["num_params"] == decoder_lib.count_params(_cfg())
  assert r["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  assert r["state_bytes"] == r["state_bytes_total"]
  # f32 params + two AdamW moments (+ counters and the step).
  assert r["params_bytes"] == 4 * r["num_params"]
  assert r["state_bytes"] >= 3 * r["params_bytes"]
  assert r["memory_analysis"] == "ok"
  assert r["argument_bytes"] >= r["state_bytes"]
  assert r["peak_bytes"] == (
      r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] -
      r["alias_bytes"])
  assert r["alias_bytes"] > 0  # the donated state


def test_fsdp_divides_the_state_per_device(one_device):
  assert len(jax.devices()) >= 4, "conftest provides 8 CPU devices"
  mesh = sharding.make_mesh({"fsdp": 4}, jax.devices()[:4])
  r = aot.train_step_memory(
      _cfg(), mesh, None, batch_size=4, seq_len=16, compiler_options=FAST)
  assert r["num_devices"] == 4
  assert r["state_bytes_total"] == one_device["state_bytes"]
  # Everything but the step counters has an `embed` dim of 32 = 4 x 8.
  ratio = one_device["state_bytes"] / r["state_bytes"]
  assert 3.9 < ratio <= 4.0
  assert r["params_bytes"] == one_device["params_bytes"] // 4
  assert r["argument_bytes"] < one_device["argument_bytes"] / 3


def test_memory_analysis_none_is_reported_not_raised():

  class NoAnalysis:

    def memory_analysis(self):
      return None

    def cost_analysis(self):
      return None

  out = aot._memory(NoAnalysis())  # pylint: disable=protected-access
  assert out["memory_analysis"].startswith("unavailable")
  assert "peak_bytes" not in out
  assert aot._flops(NoAnalysis()) is None  # pylint: disable=protected-access


def test_sft_bench_runs_two_steps():
  bench = _load("sft_train")
  cfg = _cfg()
  config = config_lib.load_config_file(ROOT / "configs" / "ml100k_sft.py")
  r = bench.run(
      cfg,
      config,
      batch_size=4,
      seq_len=16,
      steps=2,
      mesh=_one_device(),
      compiler_options=FAST)
  assert r["steps"] == 2 and r["steps_per_s"] > 0 and r["tokens_per_s"] > 0
  assert math.isfinite(r["final_loss"])
  assert r["mfu"] is None  # CPU: no known peak
  # Tied embeddings: every parameter is in a matmul (the LM head).
  assert r["n_matmul"] == r["num_params"] == decoder_lib.count_params(cfg)
  attention = 12 * cfg.num_layers * 15 * cfg.num_heads * cfg.head_dim
  assert r["flops_per_token"] == 6 * r["num_params"] + attention
  untied = bench.flops_per_token(_cfg(tie_embeddings=False), 15)
  assert untied["n_matmul"] == untied["num_params"] - cfg.vocab_size * 32
  assert bench.markdown_row(r).startswith("| cpu")
  assert r["flops_per_step"] == 4 * 15 * r["flops_per_token"]
  # The loss on the last 5 tokens: the head runs at 5 of 15 positions.
  five = bench.run(cfg, config, batch_size=4, seq_len=16, steps=1,
                   mesh=_one_device(), compiler_options=FAST,
                   targets_per_row=5)
  assert math.isfinite(five["final_loss"])
  head = 6 * cfg.vocab_size * cfg.hidden_size
  assert five["flops_per_step"] == r["flops_per_step"] - 4 * 10 * head


def test_beam_search_bench_runs_and_excludes_history():
  bench = _load("beam_search")
  codebooks = (8, 3)
  sids = bench.random_semantic_ids(20, codebooks)
  assert sids.num_items == 20
  assert np.all(sids.codes[1:, -1] < 3)
  offsets = benchmarking.level_offsets(codebooks)
  assert offsets == (8, 16)
  cfg = _cfg(vocab_size=8 + sum(codebooks) + 10)
  r = bench.run(
      cfg,
      sids,
      offsets,
      batch_size=4,
      prompt_len=12,
      num_beams=5,
      history=6,
      batches=2,
      mesh=_one_device(),
      compiler_options=FAST)
  assert r["users_per_s"] > 0 and r["batch_ms"] > 0
  assert bench.markdown_row(r).startswith("| cpu")


def test_popo_cost_bench_times_every_rule_against_single_reward_grpo():
  bench = _load("popo_cost")
  codebooks = (5, 4, 3)
  cfg = _cfg(vocab_size=8 + sum(codebooks) + 10)
  r = bench.run(
      cfg,
      codebooks,
      num_items=30,
      batch_size=4,
      group_size=2,
      prompt_len=6,
      repeats=2,
      # One rule of each kind (the others differ only in settings).
      rules=("popo_light", "mgda_ub", "popo_quarter"),
      mesh=_one_device(),
      compiler_options=FAST)
  # The baseline is always timed, first.
  assert list(r["rules"]) == [bench.BASELINE, "popo_light", "mgda_ub",
                              "popo_quarter"]
  base = r["rules"][bench.BASELINE]
  assert base["train_step_ratio"] == 1.0 and base["rl_step_ratio"] == 1.0
  for x in r["rules"].values():
    assert x["train_step_ms"] > 0 and len(x["times_ms"]) == 2
  assert r["rollouts"] == 8 and r["rollout_ms"] > 0
  assert bench.markdown_rows(r).splitlines()[0].startswith("| grpo_1_reward")
  with pytest.raises(ValueError, match="unknown rules"):
    bench.run(cfg, codebooks, rules=("gapo",), mesh=_one_device())

r"""Per-device memory of the SFT train step, compiled ahead of time.

  .venv/bin/python experiments/aot_memory.py --preset=llama_1b \
      --mesh=data:1,fsdp:8,tensor:1 --batch_size=8 --seq_len=1024 \
      --dtype=bfloat16 --fake_cpu_devices=8 --out=runs/aot/llama_1b.json

Builds the train state abstractly (no parameter is allocated), shards it by
the default logical-axis rules over `--mesh`, compiles the SFT train step
and prints XLA's per-device memory analysis (`taiji_jax.train.aot`).
`--fake_cpu_devices=N` compiles for N fake CPU devices, so a pod-sized mesh
can be checked on a laptop (the CPU compiler's temp bytes are an estimate
of the accelerator's; the state bytes are exact). The optimizer is
`optax.adamw` (moments in the parameters' dtype).
"""

import json
import pathlib
import time

from absl import app
from absl import flags
import jax

from taiji_jax import benchmarking
from taiji_jax import launch
from taiji_jax import sharding
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.train import aot

PRESETS = ("tiny", "small", "qwen2_0_5b", "llama_1b")

_PRESET = flags.DEFINE_enum("preset", "llama_1b", PRESETS, "Decoder preset.")
_MESH = flags.DEFINE_string("mesh", "data:1,fsdp:8,tensor:1",
                            "Mesh axis sizes, 'axis:size,...'.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size.")
_SEQ = flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", None,
                                   "Parameter dtype (default: the preset's).")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise each block.")
_VOCAB = flags.DEFINE_integer("vocab_size", None,
                              "Vocabulary size (default: the preset's).")
_FAKE = flags.DEFINE_integer("fake_cpu_devices", 0,
                             "If > 0, compile for this many fake CPU devices.")
_OUT = flags.DEFINE_string("out", None, "Write the report as JSON here.")


def _gib(n):
  return "n/a" if n is None else f"{n / 2**30:8.3f} GiB"


def report_lines(r: dict) -> list[str]:
  """A readable per-device report of a `train_step_memory` result."""
  lines = [
      f"{r['num_params']:,} parameters ({r['param_dtype']}), compute "
      f"{r['dtype']}, remat={r['remat']}",
      f"mesh {r['mesh']} = {r['num_devices']} {r['platform']} devices; batch "
      f"{r['batch_size']} x {r['seq_len']} tokens",
      "per device:",
      f"  state (params + adamw + step) {_gib(r['state_bytes'])}"
      f"   (unsharded {_gib(r['state_bytes_total'])})",
      f"    params                      {_gib(r['params_bytes'])}",
      f"    optimizer state             {_gib(r['opt_state_bytes'])}",
  ]
  if r["memory_analysis"] != "ok":
    lines.append(f"  XLA memory analysis: {r['memory_analysis']}")
  else:
    lines += [
        f"  arguments                     {_gib(r['argument_bytes'])}",
        f"  outputs                       {_gib(r['output_bytes'])}",
        f"  temporaries                   {_gib(r['temp_bytes'])}",
        f"  aliased (donated state)       {_gib(r['alias_bytes'])}",
        f"  generated code                {_gib(r['generated_code_bytes'])}",
        f"  peak = args + out + temp - alias {_gib(r['peak_bytes'])}",
    ]
  if r.get("flops_per_device"):
    lines.append(f"  XLA flops per step            "
                 f"{r['flops_per_device'] / 1e12:8.3f} TFLOP")
  lines.append(f"compile {r['compile_s']:.1f} s")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _FAKE.value > 0:  # before any backend starts (imports start none)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _FAKE.value)
  launch.setup()
  overrides = {"dtype": _DTYPE.value, "remat": _REMAT.value}
  if _PARAM_DTYPE.value:
    overrides["param_dtype"] = _PARAM_DTYPE.value
  if _VOCAB.value:
    overrides["vocab_size"] = _VOCAB.value
  model_cfg = getattr(decoder_lib.DecoderConfig, _PRESET.value)(**overrides)
  mesh = sharding.make_mesh(benchmarking.parse_mesh(_MESH.value))
  t0 = time.perf_counter()
  result = aot.train_step_memory(model_cfg, mesh, sharding.DEFAULT_RULES,
                                 _BATCH.value, _SEQ.value)
  result["compile_s"] = round(time.perf_counter() - t0, 2)
  result["preset"] = _PRESET.value
  result.update(benchmarking.environment_fields(mesh.size))
  print("\n".join(report_lines(result)))
  if _OUT.value:
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)

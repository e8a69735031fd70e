r"""Benchmarks trie-constrained beam search: users/s of `recommend`.

  .venv/bin/python experiments/bench/beam_search.py --workdir runs/bench

What the SFT stage's evaluation runs: prefill a batch of left-padded
prompts, then beam search over the SID trie with `--num_beams` beams (20 =
the largest K of Recall/NDCG@K) never returning one of each user's
`--history` seen items. Defaults are ml-100k's: 1,682 items with random
unique SIDs of `--codebooks` 64/64/64 plus a fourth level of 4 that
separates items sharing the first three (as collision handling does), and
from `--config` (`configs/ml100k_sft.py`): the vocabulary layout of
`text.vocab` (8 specials, the SID codes, config.vocab.size 1,000 text pieces:
1,204 ids), prompts of max_prefix + max_items x 4 = 32 + 30 x 4 = 152
tokens, its decoder (`sft.model_config`, or `--preset`), its eval batch of
128 users and max(eval.ks) = 20 beams; 8 batches (943 users, one
valid-split evaluation).

The jitted function is compiled ahead of time and run once (timed as the
warm-up), then `--batches` batches are timed (two fixed batches on the
device, alternating; one `jax.block_until_ready` at the end). Writes
`<workdir>/beam_search.json` and prints a markdown row.
"""

import pathlib
import time
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from flax import nnx
import jax
import numpy as np

from taiji_jax import benchmarking
from taiji_jax import launch
from taiji_jax import sharding
from taiji_jax.generate import recommend as recommend_lib
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.quantize import semantic_ids as sid_lib

PAD_ID = 0
SFT_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / (
    "ml100k_sft.py")


def random_semantic_ids(num_items: int,
                        codebooks: Sequence[int],
                        seed: int = 0) -> sid_lib.SemanticIds:
  """Unique random SIDs; the last level numbers items sharing a prefix.

  Levels but the last are uniform random codes; an item whose prefix is
  already held by `codebooks[-1]` items is drawn again.
  """
  rng = np.random.default_rng(seed)
  *head, last = (int(k) for k in codebooks)
  counts: dict[tuple[int, ...], int] = {}
  codes = []
  capacity = int(np.prod(head)) * last
  if num_items > capacity:
    raise ValueError(f"{num_items} items do not fit codebooks {codebooks}.")
  while len(codes) < num_items:
    prefix = tuple(int(c) for c in rng.integers(0, head))
    n = counts.get(prefix, 0)
    if n < last:
      counts[prefix] = n + 1
      codes.append(prefix + (n,))
  codes = np.concatenate([np.full((1, len(codebooks)), -1), np.array(codes)])
  return sid_lib.SemanticIds(codes, tuple(codebooks))


def run(model_cfg: decoder_lib.DecoderConfig,
        sids: sid_lib.SemanticIds,
        offsets: Sequence[int],
        batch_size: int = 128,
        prompt_len: int = 152,
        num_beams: int = 20,
        history: int = 50,
        batches: int = 8,
        mesh: jax.sharding.Mesh | None = None,
        seed: int = 0,
        compiler_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Compiles and times `recommend` on random prompts; the measurements.

  `compiler_options` are XLA options for the compiles (tests lower the CPU
  backend's optimisation level with them).
  """
  rules = sharding.DEFAULT_RULES
  mesh = mesh if mesh is not None else sharding.make_mesh()
  graphdef, abstract = nnx.split(decoder_lib.abstract_decoder(model_cfg))

  def init():
    return nnx.state(decoder_lib.Decoder(model_cfg, rngs=nnx.Rngs(params=seed)))

  jit_init = jax.jit(
      init, out_shardings=sharding.tree_shardings(abstract, mesh, rules))
  with sharding.use_mesh(mesh, rules):
    params = jit_init.lower().compile(compiler_options)()
  trie, paths = sids.trie, sids.paths
  offsets = tuple(int(o) for o in offsets)

  def top_items(params, prompts_bt, seen_bh):
    return recommend_lib.recommend(
        nnx.merge(graphdef, params),
        prompts_bt,
        trie,
        offsets,
        num_beams,
        pad_id=PAD_ID,
        exclude_bh=seen_bh,
        paths=paths).items

  def put(x):
    return jax.device_put(x, sharding.data_sharding(mesh, x.ndim, rules,
                                                    x.shape))

  inputs = [
      jax.tree.map(
          put,
          benchmarking.random_inputs(batch_size, prompt_len,
                                     model_cfg.vocab_size, sids.num_items,
                                     history, PAD_ID, seed + i))
      for i in range(2)
  ]
  with sharding.use_mesh(mesh, rules):
    t0 = time.perf_counter()
    compiled = jax.jit(top_items).lower(
        params, inputs[0]["prompts"],
        inputs[0]["seen"]).compile(compiler_options)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    items = jax.block_until_ready(
        compiled(params, inputs[0]["prompts"], inputs[0]["seen"]))
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(batches):
      x = inputs[(i + 1) % 2]
      items = compiled(params, x["prompts"], x["seen"])
    items = np.asarray(jax.block_until_ready(items))
    elapsed = time.perf_counter() - t0
  seen = np.asarray(inputs[batches % 2]["seen"])
  if np.any(items[:, :, None] == seen[:, None, :]) or np.any(items <= 0):
    raise AssertionError("beam search returned a seen or invalid item.")

  return {
      **benchmarking.environment_fields(mesh.size),
      "num_items": sids.num_items,
      "codebooks": list(sids.codebook_sizes),
      "vocab_size": model_cfg.vocab_size,
      "num_params": int(decoder_lib.count_params(model_cfg)),
      "dtype": model_cfg.dtype,
      "batch_size": batch_size,
      "prompt_len": prompt_len,
      "num_beams": num_beams,
      "history": history,
      "batches": batches,
      "compile_s": round(compile_s, 2),
      "first_batch_s": round(first_s, 3),
      "batch_ms": round(1e3 * elapsed / batches, 2),
      "users_per_s": round(batches * batch_size / elapsed, 1),
      **benchmarking.memory_fields(),
  }


def markdown_row(r: Mapping[str, Any]) -> str:
  """The README row: device, items, B, beams, ms per batch, users/s,
  compile s, peak RSS MiB."""
  return (f"| {r['device']} | {r['num_items']:,} | {r['batch_size']} | "
          f"{r['num_beams']} | {r['batch_ms']} | {r['users_per_s']} | "
          f"{r['compile_s']} | {r['peak_rss_mib']} |")


def define_flags():
  """The entry point's flags (not defined on import, so tests can import)."""
  benchmarking.define_sft_flags(SFT_CONFIG)
  flags.DEFINE_integer("num_items", 1682, "Items in the catalogue.")
  flags.DEFINE_integer(
      "prompt_len", None, "Prompt tokens, left-padded (default: "
      "config.max_prefix + config.max_items x SID levels).")
  flags.DEFINE_integer("num_beams", None,
                       "Beams = items returned (default: max(eval.ks)).")
  flags.DEFINE_integer("history", 50, "Seen items excluded per user.")
  flags.DEFINE_integer("batches", 8, "Timed batches.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch.setup()
  f = flags.FLAGS
  bench = benchmarking.sft_from_flags()
  config, codebooks = bench.config, bench.codebooks
  prompt_len = f.prompt_len or (config.max_prefix +
                                config.max_items * len(codebooks))
  sids = random_semantic_ids(f.num_items, codebooks)
  batch_size = f.batch_size or config.eval.batch_size
  num_beams = f.num_beams or max(config.eval.ks)
  result = {"preset": bench.preset}
  result |= run(bench.model_cfg, sids, benchmarking.level_offsets(codebooks),
                batch_size, prompt_len, num_beams, f.history, f.batches,
                bench.mesh)
  benchmarking.write_result(f.workdir, "beam_search", result,
                            markdown_row(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)

r"""Tiny random Hugging Face decoders and their logits, for import parity.

Builds two tiny causal LMs with `transformers` from fixed seeds, saves them
with `save_pretrained(safe_serialization=True)` and records their logits on
fixed token batches; `tests/test_hf_import.py` loads the directories with
`taiji_jax.models.hf_import.load_hf_checkpoint` and compares.

  qwen2  `Qwen2ForCausalLM`: tied embeddings, q/k/v biases, 4 query heads
         on 2 key/value heads, hidden 32, 2 layers, vocab 101,
         rope_theta 1e6.
  llama  `LlamaForCausalLM`: untied LM head, no biases, 4 query heads on 1
         key/value head, head_dim 16 (not hidden / heads), llama3 RoPE
         scaling with a 32-token original context, so of its 8
         frequencies one is kept, one interpolated and six stretched.

HF's initialiser (std 0.02) gives near-uniform logits that would hide
layout mistakes, so every parameter is redrawn from a seeded generator:
matrices N(0, 0.2^2), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2).
Logits then spread over several units and a transposed or mis-split
weight changes them by O(1).

It runs in a separate virtualenv with PyTorch and transformers (neither is
a dependency of taiji_jax):

  python -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install torch==2.13.0   # CPU build; install it first
  /tmp/refvenv/bin/pip install transformers safetensors
  /tmp/refvenv/bin/python experiments/reference/make_hf_decoder_reference.py

Outputs (float32, about 100 KB per model), under `tests/data/`:
  hf_tiny_<name>/             config.json, generation_config.json,
                              model.safetensors
  hf_tiny_<name>_logits.npz   tokens (B, T) int32 and logits (B, T, V) of
                              an unpadded batch; padded_tokens,
                              padded_mask, padded_positions and
                              padded_logits of a left-padded batch (pad id
                              0, RoPE positions counting real tokens only,
                              as `taiji_jax.models.decoder` does; logits at
                              padding are set to 0); `versions`, a JSON
                              string with the library versions and the
                              SHA-256 of model.safetensors.
Re-running writes byte-identical checkpoints and logits with the same
library versions (single-threaded float32 on CPU, eager attention).
"""

import argparse
import hashlib
import json
import pathlib
import platform

import numpy as np

DATA = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data"
VOCAB = 101
BATCH, LENGTH = 3, 11
PAD_ID = 0
LEFT_PADS = (0, 3, 7)  # Per row of the padded batch.

MODELS = {
    "qwen2":
        dict(
            cls="Qwen2ForCausalLM",
            config_cls="Qwen2Config",
            seed=0,
            config=dict(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
                rope_theta=1_000_000.0,
                rms_norm_eps=1e-6,
                max_position_embeddings=128,
                tie_word_embeddings=True)),
    "llama":
        dict(
            cls="LlamaForCausalLM",
            config_cls="LlamaConfig",
            seed=1,
            config=dict(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=16,
                intermediate_size=48,
                rope_theta=10_000.0,
                rope_scaling=dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=32),
                rms_norm_eps=1e-5,
                max_position_embeddings=128,
                tie_word_embeddings=False,
                attention_bias=False)),
}


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _inputs(seed: int) -> dict[str, np.ndarray]:
  """An unpadded and a left-padded batch of tokens (pad id 0)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, (BATCH, LENGTH)).astype(np.int32)
  padded = rng.integers(1, VOCAB, (BATCH, LENGTH)).astype(np.int32)
  mask = (np.arange(LENGTH)[None] >= np.array(LEFT_PADS)[:, None])
  padded = np.where(mask, padded, PAD_ID).astype(np.int32)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return dict(
      tokens=tokens,
      padded_tokens=padded,
      padded_mask=mask.astype(np.int32),
      padded_positions=positions)


def _randomise(model, seed: int) -> None:
  """Redraws every parameter so logits are far from uniform (see above)."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif name.endswith(".bias"):
        p.copy_(0.1 * noise)
      else:
        p.copy_(0.2 * noise)


def build(name: str, data_dir: pathlib.Path) -> dict[str, str]:
  """Saves one model and its logits; returns the recorded versions."""
  # pylint: disable=g-import-not-at-top
  import safetensors
  import torch
  import transformers

  spec = MODELS[name]
  torch.manual_seed(spec["seed"])
  config = getattr(transformers, spec["config_cls"])(**spec["config"])
  model = transformers.AutoModelForCausalLM.from_config(
      config, attn_implementation="eager", dtype=torch.float32)
  assert type(model).__name__ == spec["cls"], type(model)
  _randomise(model, spec["seed"])
  model.eval()
  if config.tie_word_embeddings:
    assert model.lm_head.weight is model.model.embed_tokens.weight

  out_dir = data_dir / f"hf_tiny_{name}"
  out_dir.mkdir(parents=True, exist_ok=True)
  model.save_pretrained(out_dir, safe_serialization=True)

  inputs = _inputs(spec["seed"])
  with torch.no_grad():
    logits = model(
        input_ids=torch.from_numpy(inputs["tokens"]).long()).logits.numpy()
    padded = model(
        input_ids=torch.from_numpy(inputs["padded_tokens"]).long(),
        attention_mask=torch.from_numpy(inputs["padded_mask"]).long(),
        position_ids=torch.from_numpy(
            inputs["padded_positions"]).long()).logits.numpy()
  padded = np.where(inputs["padded_mask"][..., None] > 0, padded, 0.0)
  versions = {
      "transformers": transformers.__version__,
      "torch": torch.__version__,
      "safetensors": safetensors.__version__,
      "numpy": np.__version__,
      "python": platform.python_version(),
      "model_class": spec["cls"],
      "model_safetensors_sha256": _sha256(out_dir / "model.safetensors"),
  }
  np.savez_compressed(
      data_dir / f"hf_tiny_{name}_logits.npz",
      logits=logits.astype(np.float32),
      padded_logits=padded.astype(np.float32),
      versions=np.array(json.dumps(versions, sort_keys=True)),
      **inputs)
  scale = float(np.abs(logits).max())
  print(f"{name}: wrote {out_dir} and logits {logits.shape}, max |logit| "
        f"{scale:.3f}")
  return versions


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", type=pathlib.Path, default=DATA)
  parser.add_argument(
      "--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  for name in args.models:
    print(json.dumps(build(name, args.data_dir), indent=1, sort_keys=True))


if __name__ == "__main__":
  main()

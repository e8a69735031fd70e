"""`DecoderConfig`: the decoder's hyper-parameters, presets, HF configs.

Presets from a test-sized `tiny` to published sizes (`qwen2_0_5b`,
`llama_1b`), and `from_hf_config` for a Llama / Qwen2 `config.json` of
either transformers format (`rope_parameters` of v5, or top-level
`rope_theta` / `rope_scaling` before). Re-exported by
`taiji_jax.models.decoder`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Frequency scaling of RoPE for long contexts (Hugging Face semantics).

  Attributes:
    rope_type: "linear" (every frequency divided by `factor`) or "llama3"
      (Llama 3.1+: low frequencies divided by `factor`, high ones kept,
      a smooth interpolation in between).
    factor: context-extension factor.
    low_freq_factor: llama3 only.
    high_freq_factor: llama3 only.
    original_max_position_embeddings: llama3 only; the pre-training context.
  """
  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ("linear", "llama3"):
      raise NotImplementedError(
          f"rope_scaling type {self.rope_type!r} is not supported "
          "(supported: none, 'linear', 'llama3').")
    if self.factor <= 0:
      raise ValueError(f"rope scaling factor must be > 0, got {self.factor}.")
    if (self.rope_type == "llama3" and
        self.high_freq_factor <= self.low_freq_factor):
      raise ValueError("llama3 rope scaling needs high_freq_factor > "
                       "low_freq_factor.")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Hyper-parameters of the decoder.

  Attributes:
    vocab_size: rows V of the token embedding.
    hidden_size: model width D.
    num_layers: Transformer blocks.
    num_heads: query heads N.
    num_kv_heads: key/value heads K (grouped-query attention; N % K == 0).
    intermediate_size: SwiGLU hidden width F.
    head_dim: per-head width H; None means hidden_size // num_heads (it is
      resolved in `__post_init__`, so it is always an int afterwards).
    rope_theta: RoPE base.
    rope_scaling: optional long-context frequency scaling.
    rms_norm_eps: RMSNorm epsilon.
    max_seq_len: longest context the model is meant for (documentation and
      the default cache length; RoPE itself has no limit).
    tie_embeddings: LM head = embedding transposed (else a separate matrix).
    attention_bias: biases on the q/k/v projections (Qwen2: True).
    dtype: activation / compute dtype ("float32" or "bfloat16"); logits,
      softmax, norms and RoPE are computed in float32 regardless.
    param_dtype: storage dtype of the parameters.
    init_std: std of the truncated-normal weight initialisers.
    remat: rematerialise each block in the backward pass (saves activation
      memory for long sequences at the cost of one more forward).
    dropout_rate: dropout on the embeddings and on the attention and MLP
      outputs before each residual add, applied only in calls that pass a
      `dropout_rng` (training); decoding and evaluation never drop. 0 for
      imported pretrained models (as their configs say).
    lora_rank: r > 0 adds a low-rank update x A B (`nnx.LoRA`: A drawn,
      B zero, so the model starts as it was) to each projection named in
      `lora_targets`, scaled by lora_alpha / r (Hu et al., 2021). Training
      then usually freezes everything else (`train.train_only`).
    lora_targets: among "q", "k", "v", "o" (attention) and "gate", "up",
      "down" (MLP).
    lora_alpha: the scale's numerator.
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  head_dim: int | None = None
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  max_seq_len: int = 2048
  tie_embeddings: bool = True
  attention_bias: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02
  remat: bool = False
  dropout_rate: float = 0.0
  lora_rank: int = 0
  lora_targets: tuple[str, ...] = ("q", "v")
  lora_alpha: float = 16.0

  def __post_init__(self):
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"hidden_size {self.hidden_size} is not divisible "
                         f"by num_heads {self.num_heads}; set head_dim.")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not divisible by "
                       f"num_kv_heads {self.num_kv_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(
          f"dropout_rate must be in [0, 1), got {self.dropout_rate}.")
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    unknown = set(self.lora_targets) - set(LORA_TARGETS)
    if self.lora_rank < 0 or unknown:
      raise ValueError(f"lora_rank must be >= 0 and lora_targets among "
                       f"{LORA_TARGETS}; got {self.lora_rank}, "
                       f"{self.lora_targets}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got "
                         f"{getattr(self, name)!r}.")

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

  def lora(self, target: str) -> bool:
    """Whether projection `target` carries a LoRA update."""
    return self.lora_rank > 0 and target in self.lora_targets

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  @classmethod
  def tiny(cls, vocab_size: int = 67, **overrides) -> DecoderConfig:
    """Small, mostly prime dims for fast shape-tracing tests.

    head_dim 6 differs from hidden / heads (28 / 4), as in models that set
    head_dim explicitly, so both code paths are exercised.
    """
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=28,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=6,
        intermediate_size=44,
        max_seq_len=64,
        attention_bias=True)
    return cls(**{**kwargs, **overrides})

  @classmethod
  def small(cls, vocab_size: int = 8192, **overrides) -> DecoderConfig:
    """About 12.6M parameters (vocab 8192): trains on ml-100k on a CPU."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=384,
        num_layers=6,
        num_heads=6,
        num_kv_heads=2,
        intermediate_size=1024,
        max_seq_len=1024)
    return cls(**{**kwargs, **overrides})

  @classmethod
  def smollm2_135m(cls, **overrides) -> DecoderConfig:
    """SmolLM2-135M (134,515,008 parameters, tied embeddings): the shape of
    the pretrained model `gguf_import.PRETRAINED` ships, for benchmarks
    with random weights."""
    kwargs = dict(
        vocab_size=49_152,
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        intermediate_size=1536,
        rope_theta=100_000.0,
        rms_norm_eps=1e-5,
        max_seq_len=8192,
        tie_embeddings=True,
        attention_bias=False)
    return cls(**{**kwargs, **overrides})

  @classmethod
  def qwen2_0_5b(cls, **overrides) -> DecoderConfig:
    """Qwen2-0.5B (494,032,768 parameters, tied embeddings)."""
    kwargs = dict(
        vocab_size=151_936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        max_seq_len=131_072,
        tie_embeddings=True,
        attention_bias=True)
    return cls(**{**kwargs, **overrides})

  @classmethod
  def llama_1b(cls, **overrides) -> DecoderConfig:
    """Llama-3.2-1B (1,235,814,400 parameters, tied embeddings)."""
    kwargs = dict(
        vocab_size=128_256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
        rope_theta=500_000.0,
        rope_scaling=RopeScaling(
            "llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192),
        rms_norm_eps=1e-5,
        max_seq_len=131_072,
        tie_embeddings=True,
        attention_bias=False)
    return cls(**{**kwargs, **overrides})

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> DecoderConfig:
    """Reads a Llama / Qwen2 Hugging Face `config.json` dict.

    Args:
      hf: the parsed config.json.
      **overrides: fields to set on top (e.g. dtype="bfloat16").

    Raises:
      NotImplementedError: another architecture, an activation other than
        SiLU, MLP biases, sliding-window attention, or a rope_scaling type
        other than none / linear / llama3.
    """
    model_type = hf.get("model_type")
    if model_type not in ("llama", "qwen2"):
      raise NotImplementedError(f"model_type {model_type!r} is not supported "
                                "(supported: 'llama', 'qwen2').")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise NotImplementedError(f"hidden_act {act!r} is not supported.")
    if hf.get("mlp_bias", False):
      raise NotImplementedError("mlp_bias=True is not supported.")
    if hf.get("use_sliding_window", False):
      raise NotImplementedError("sliding-window attention is not supported.")
    num_heads = hf["num_attention_heads"]
    rope = _rope_parameters(hf)
    kwargs = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        intermediate_size=hf["intermediate_size"],
        head_dim=hf.get("head_dim"),
        rope_theta=float(rope.get("rope_theta", 10_000.0)),
        rope_scaling=_rope_scaling_from_hf(rope),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=(model_type == "qwen2" or
                        bool(hf.get("attention_bias", False))))
    return cls(**{**kwargs, **overrides})


def _rope_parameters(hf: Mapping[str, Any]) -> Mapping[str, Any]:
  """RoPE base and scaling in one dict, from either config.json format.

  transformers >= 5 writes `rope_parameters` ({"rope_type", "rope_theta",
  scaling fields}); older versions write top-level `rope_theta` and
  `rope_scaling`. Reading only the old keys would silently give a v5
  Qwen2 (theta 1e6) the default theta 1e4.
  """
  if hf.get("rope_parameters"):
    return hf["rope_parameters"]
  params = dict(hf.get("rope_scaling") or {})
  params["rope_theta"] = hf.get("rope_theta", 10_000.0)
  return params


def _rope_scaling_from_hf(spec: Mapping[str, Any] | None) -> RopeScaling | None:
  if not spec:
    return None
  rope_type = spec.get("rope_type", spec.get("type"))
  if rope_type in (None, "default"):
    return None
  if rope_type not in ("linear", "llama3"):
    raise NotImplementedError(
        f"rope_scaling type {rope_type!r} is not supported "
        "(supported: none, 'linear', 'llama3').")
  kwargs = {
      k: spec[k] for k in ("low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings") if k in spec
  }
  return RopeScaling(rope_type, float(spec["factor"]), **kwargs)

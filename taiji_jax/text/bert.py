"""BERT-family Transformer encoder in Flax NNX, loadable from HF safetensors.

The architecture of Hugging Face `BertModel` (Devlin et al., 2019) for
inference: word + absolute position + token-type embeddings and a
LayerNorm, then N post-LN layers `x = LN(x + Attn(x))`, `x = LN(x + FFN(x))`
with bidirectional self-attention over the non-padding tokens. The pooler
head is not built (sentence encoders pool the hidden states themselves) and
there is no dropout: this module exists to embed item text, not to be
fine-tuned.

The module is tree-shaped and every parameter carries logical axis names
(`vocab`, `length`, `embed`, `heads`, `kv`, `mlp`) that
`taiji_jax.sharding.tree_shardings` maps to mesh axes. Attention projections
are stored per head, `w_dnh` / `w_nhd`, rather than as HF's flat (out, in)
matrices; `load_safetensors` does the transposes and reshapes, and refuses a
checkpoint with missing, unexpected or mis-shaped tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Callable, Mapping

from flax import nnx
import jax
import jax.numpy as jnp

from taiji_jax import sharding
from taiji_jax.models import checkpoint_io
from taiji_jax.models import layers

# hidden_act name in config.json -> activation. HF's "gelu" is the exact
# erf form; "gelu_new"/"gelu_pytorch_tanh" are the tanh approximation.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
# Checkpoint tensors that are known and deliberately not loaded: the pooler
# and pre-training heads, and the `position_ids` buffer (always arange).
_IGNORED_PREFIXES = ("pooler.", "cls.")
_IGNORED_KEYS = ("embeddings.position_ids",)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder (the fields of HF `config.json`).

  Attributes:
    vocab_size: word-piece vocabulary size V.
    hidden_size: model width D.
    num_hidden_layers: Transformer layers.
    num_attention_heads: attention heads N (hidden_size = N * head_dim).
    intermediate_size: feed-forward hidden width M.
    max_position_embeddings: rows of the position table (longest input).
    type_vocab_size: rows of the token-type (segment) table.
    layer_norm_eps: LayerNorm epsilon.
    hidden_act: feed-forward activation; "gelu" is the exact erf GELU.
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_hidden_layers",
                 "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}.")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; "
                       f"known: {sorted(_ACTIVATIONS)}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def tiny(cls, vocab_size: int = 37) -> BertConfig:
    """Prime-number dims for fast shape-tracing tests."""
    return cls(
        vocab_size=vocab_size,
        hidden_size=14,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=22,
        max_position_embeddings=29,
        type_vocab_size=2)

  @classmethod
  def minilm_l6(cls) -> BertConfig:
    """sentence-transformers/all-MiniLM-L6-v2 (D=384, 6 layers, 12 heads)."""
    return cls(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536)

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> BertConfig:
    """Reads the fields of a HF config dict; other keys are ignored.

    Raises:
      ValueError: a model type or position embedding this module does not
        implement.
    """
    model_type = config.get("model_type", "bert")
    if model_type != "bert":
      raise ValueError(f"model_type {model_type!r} is not a BERT model.")
    position = config.get("position_embedding_type", "absolute")
    if position != "absolute":
      raise ValueError(f"position_embedding_type {position!r} is not "
                       "supported (only 'absolute').")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})

  @classmethod
  def from_json(cls, path: os.PathLike | str) -> BertConfig:
    """Reads a HF `config.json`."""
    try:
      return cls.from_dict(json.loads(pathlib.Path(path).read_text()))
    except (ValueError, TypeError) as e:
      raise ValueError(f"{path}: {e}") from e


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.word = layers.param(rngs, (cfg.vocab_size, d), ("vocab", "embed"))
    self.position = layers.param(rngs, (cfg.max_position_embeddings, d),
                                 ("length", "embed"))
    self.token_type = layers.param(rngs, (cfg.type_vocab_size, d),
                                   (None, "embed"))
    self.ln = layers.LayerNorm(d, cfg.layer_norm_eps)

  def __call__(self, ids_bt: jax.Array, types_bt: jax.Array) -> jax.Array:
    t = ids_bt.shape[1]
    x_btd = jnp.take(self.word[...], ids_bt, axis=0)
    x_btd = x_btd + self.position[...][:t][None]
    x_btd = x_btd + jnp.take(self.token_type[...], types_bt, axis=0)
    return self.ln(x_btd)


class SelfAttention(nnx.Module):
  """Bidirectional multi-head self-attention with a key padding mask."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    d, n, h = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    w_axes, b_axes = ("embed", "heads", "kv"), ("heads", "kv")
    self.w_query = layers.param(rngs, (d, n, h), w_axes)
    self.b_query = nnx.Param(jnp.zeros((n, h)), logical_axes=b_axes)
    self.w_key = layers.param(rngs, (d, n, h), w_axes)
    self.b_key = nnx.Param(jnp.zeros((n, h)), logical_axes=b_axes)
    self.w_value = layers.param(rngs, (d, n, h), w_axes)
    self.b_value = nnx.Param(jnp.zeros((n, h)), logical_axes=b_axes)
    self.w_out = layers.param(rngs, (n, h, d), ("heads", "kv", "embed"))
    self.b_out = nnx.Param(jnp.zeros((d,)), logical_axes=("embed",))

  def __call__(self, x_btd: jax.Array, mask_bt: jax.Array,
               precision) -> jax.Array:

    def project(w, b):
      return jnp.einsum(
          "btd,dnh->btnh", x_btd, w[...], precision=precision) + b[...]

    q_btnh = project(self.w_query, self.b_query)
    k_btnh = project(self.w_key, self.b_key)
    v_btnh = project(self.w_value, self.b_value)
    logits_bnts = jnp.einsum(
        "btnh,bsnh->bnts", q_btnh, k_btnh, precision=precision)
    logits_bnts = logits_bnts / math.sqrt(q_btnh.shape[-1])
    # HF adds finfo.min to masked keys; a `where` with the same value keeps
    # an all-padding row (batch filler) finite: its softmax is uniform.
    neg = jnp.finfo(logits_bnts.dtype).min
    logits_bnts = jnp.where(mask_bt[:, None, None, :], logits_bnts, neg)
    probs_bnts = jax.nn.softmax(logits_bnts, axis=-1)
    out_btnh = jnp.einsum(
        "bnts,bsnh->btnh", probs_bnts, v_btnh, precision=precision)
    return jnp.einsum(
        "btnh,nhd->btd", out_btnh, self.w_out[...],
        precision=precision) + self.b_out[...]


class FeedForward(nnx.Module):
  """Position-wise two-layer MLP (HF `intermediate` and `output`)."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    d, m = cfg.hidden_size, cfg.intermediate_size
    self.w_in = layers.param(rngs, (d, m), ("embed", "mlp"))
    self.b_in = nnx.Param(jnp.zeros((m,)), logical_axes=("mlp",))
    self.w_out = layers.param(rngs, (m, d), ("mlp", "embed"))
    self.b_out = nnx.Param(jnp.zeros((d,)), logical_axes=("embed",))
    self.act = cfg.hidden_act

  def __call__(self, x_btd: jax.Array, precision) -> jax.Array:
    h_btm = jnp.einsum(
        "btd,dm->btm", x_btd, self.w_in[...],
        precision=precision) + self.b_in[...]
    h_btm = _ACTIVATIONS[self.act](h_btm)
    h_btm = sharding.constrain(h_btm, ("batch", "length", "mlp"))
    return jnp.einsum(
        "btm,md->btd", h_btm, self.w_out[...],
        precision=precision) + self.b_out[...]


class Layer(nnx.Module):
  """Post-LN layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.attention = SelfAttention(cfg, rngs)
    self.ln_attention = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
    self.ffn = FeedForward(cfg, rngs)
    self.ln_ffn = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

  def __call__(self, x_btd, mask_bt, precision):
    x_btd = self.ln_attention(x_btd + self.attention(x_btd, mask_bt, precision))
    x_btd = self.ln_ffn(x_btd + self.ffn(x_btd, precision))
    return sharding.constrain(x_btd, ("batch", "length", "embed"))


class BertEncoder(nnx.Module):
  """BERT encoder: token ids (B, T) -> hidden states (B, T, D)."""

  def __init__(self,
               cfg: BertConfig,
               *,
               rngs: nnx.Rngs,
               precision: str | None = "highest"):
    """Builds a randomly initialised encoder (see `load_safetensors`).

    Args:
      cfg: hyper-parameters.
      rngs: initialiser keys.
      precision: matmul precision (`jax.lax.Precision` name). "highest"
        keeps float32 matmuls exact on GPU/TPU too, which parity with the
        PyTorch reference needs; None uses the backend default (faster,
        TF32/bf16 passes on accelerators).
    """
    self.cfg = cfg
    self.precision = precision
    self.embeddings = Embeddings(cfg, rngs)
    self.layers = nnx.List(
        [Layer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])

  def __call__(self,
               ids_bt: jax.Array,
               mask_bt: jax.Array,
               types_bt: jax.Array | None = None) -> jax.Array:
    """Last hidden states (B, T, D).

    Args:
      ids_bt: (B, T) int word-piece ids.
      mask_bt: (B, T) attention mask, nonzero for real tokens (keys at
        padding positions are ignored; outputs there are still computed).
      types_bt: (B, T) token-type ids; None means all 0 (one segment).
    """
    t = ids_bt.shape[1]
    if t > self.cfg.max_position_embeddings:
      raise ValueError(f"sequence length {t} exceeds max_position_embeddings "
                       f"{self.cfg.max_position_embeddings}.")
    if types_bt is None:
      types_bt = jnp.zeros_like(ids_bt)
    mask_bt = mask_bt.astype(bool)
    x_btd = self.embeddings(ids_bt, types_bt)
    x_btd = sharding.constrain(x_btd, ("batch", "length", "embed"))
    for layer in self.layers:
      x_btd = layer(x_btd, mask_bt, self.precision)
    return x_btd


# ---------------------------------------------------------------------------
# Hugging Face checkpoints.

# The checkpoint helpers (TensorSpec, SafetensorsFile, check_tensors,
# param_at, CheckpointError) live in `taiji_jax.models.checkpoint_io`,
# shared with the decoder loaders; the names stay importable from here.
CheckpointError = checkpoint_io.CheckpointError
TensorSpec = checkpoint_io.TensorSpec
SafetensorsFile = checkpoint_io.SafetensorsFile
check_tensors = checkpoint_io.check_tensors
param_at = checkpoint_io.param_at


def hf_layout(cfg: BertConfig) -> dict[str, TensorSpec]:
  """HF tensor name (without a "bert." prefix) -> where it is loaded.

  HF Linear weights are (out, in); ours are (in, out), with the attention
  width split into (heads, head_dim).
  """
  d, n, h, m = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim,
                cfg.intermediate_size)
  same = lambda x: x
  layout = {
      "embeddings.word_embeddings.weight":
          TensorSpec(("embeddings", "word"), (cfg.vocab_size, d), same),
      "embeddings.position_embeddings.weight":
          TensorSpec(("embeddings", "position"),
                     (cfg.max_position_embeddings, d), same),
      "embeddings.token_type_embeddings.weight":
          TensorSpec(("embeddings", "token_type"), (cfg.type_vocab_size, d),
                     same),
      "embeddings.LayerNorm.weight":
          TensorSpec(("embeddings", "ln", "scale"), (d,), same),
      "embeddings.LayerNorm.bias":
          TensorSpec(("embeddings", "ln", "bias"), (d,), same),
  }
  for i in range(cfg.num_hidden_layers):
    hf, ours = f"encoder.layer.{i}.", ("layers", i)
    for name in ("query", "key", "value"):
      layout[f"{hf}attention.self.{name}.weight"] = TensorSpec(
          ours + ("attention", f"w_{name}"), (n * h, d),
          lambda w: w.T.reshape(d, n, h))
      layout[f"{hf}attention.self.{name}.bias"] = TensorSpec(
          ours + ("attention", f"b_{name}"), (n * h,),
          lambda b: b.reshape(n, h))
    layout.update({
        f"{hf}attention.output.dense.weight":
            TensorSpec(ours + ("attention", "w_out"), (d, n * h),
                       lambda w: w.T.reshape(n, h, d)),
        f"{hf}attention.output.dense.bias":
            TensorSpec(ours + ("attention", "b_out"), (d,), same),
        f"{hf}attention.output.LayerNorm.weight":
            TensorSpec(ours + ("ln_attention", "scale"), (d,), same),
        f"{hf}attention.output.LayerNorm.bias":
            TensorSpec(ours + ("ln_attention", "bias"), (d,), same),
        f"{hf}intermediate.dense.weight":
            TensorSpec(ours + ("ffn", "w_in"), (m, d), lambda w: w.T),
        f"{hf}intermediate.dense.bias":
            TensorSpec(ours + ("ffn", "b_in"), (m,), same),
        f"{hf}output.dense.weight":
            TensorSpec(ours + ("ffn", "w_out"), (d, m), lambda w: w.T),
        f"{hf}output.dense.bias":
            TensorSpec(ours + ("ffn", "b_out"), (d,), same),
        f"{hf}output.LayerNorm.weight":
            TensorSpec(ours + ("ln_ffn", "scale"), (d,), same),
        f"{hf}output.LayerNorm.bias":
            TensorSpec(ours + ("ln_ffn", "bias"), (d,), same),
    })
  return layout


def _canonical_name(key: str) -> str:
  """Strips the "bert." prefix of BertFor* checkpoints; old gamma/beta."""
  if key.startswith("bert."):
    key = key[len("bert."):]
  if key.endswith(".gamma"):
    key = key[:-len(".gamma")] + ".weight"
  elif key.endswith(".beta"):
    key = key[:-len(".beta")] + ".bias"
  return key


def _ignored(name: str) -> bool:
  return name.startswith(_IGNORED_PREFIXES) or name in _IGNORED_KEYS


def load_safetensors(model: BertEncoder, path: os.PathLike | str) -> None:
  """Loads a HF BERT safetensors file into `model`, in place.

  Tensor names may carry the "bert." prefix (BertFor* checkpoints) or not
  (BertModel / sentence-transformers checkpoints). Pooler and pre-training
  head tensors are ignored. `model` may be abstract (`nnx.eval_shape`):
  every parameter is replaced by the checkpoint's value, cast to the
  parameter's dtype.

  Raises:
    CheckpointError: the file lacks a tensor the model needs, holds a tensor
      the model does not know, or a tensor's shape differs from the config's;
      the message names the file and every offending tensor.
  """
  with SafetensorsFile(path) as f:
    shapes, originals = {}, {}
    for key, shape in f.shapes.items():
      name = _canonical_name(key)
      if name in shapes:
        raise CheckpointError(f"{f.path}: tensors {originals[name]!r} and "
                              f"{key!r} both map to {name!r}.")
      shapes[name], originals[name] = shape, key
    layout = hf_layout(model.cfg)
    check_tensors(
        f.path,
        shapes,
        layout,
        model_name="BERT",
        originals=originals,
        ignored=_ignored)
    for name, spec in layout.items():
      param = param_at(model, spec.path)
      value = spec.convert(f.read(originals[name]))
      param.set_value(jnp.asarray(value, dtype=param.get_value().dtype))


def load_pretrained(directory: os.PathLike | str,
                    precision: str | None = "highest") -> BertEncoder:
  """Builds a BertEncoder from `config.json` + `model.safetensors`.

  The module is built abstractly (no random initialisation of the
  full-size weights), then filled from the checkpoint.
  """
  directory = pathlib.Path(directory)
  cfg = BertConfig.from_json(directory / "config.json")
  model = nnx.eval_shape(
      lambda: BertEncoder(cfg, rngs=nnx.Rngs(0), precision=precision))
  load_safetensors(model, directory / "model.safetensors")
  return model

"""The Hugging Face tensor layout of `decoder.Decoder`, and filling a
decoder from it: what both checkpoint readers share (`hf_import` reads
safetensors directories, `gguf_import` GGUF files mapped to the same names).

HF Linear weights are (out, in) with the heads flattened into `out`; ours
are (in, out) with the heads split, e.g. q_proj (N*H, D) -> w_q (D, N, H)
and o_proj (D, N*H) -> w_o (N, H, D).
"""

from __future__ import annotations

from flax import nnx
import jax
import numpy as np

from taiji_jax import sharding
from taiji_jax.models import checkpoint_io
from taiji_jax.models import decoder as decoder_lib


def hf_layout(cfg: decoder_lib.DecoderConfig) -> dict[str, checkpoint_io.TensorSpec]:
  """HF tensor name -> where (and in which layout) the decoder holds it.

  `lm_head.weight` is only listed for untied models; tied checkpoints
  reuse `model.embed_tokens.weight`.
  """
  d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  f, v = cfg.intermediate_size, cfg.vocab_size
  spec = checkpoint_io.TensorSpec
  same = lambda x: x
  transpose = lambda w: w.T

  def split_heads(heads):  # (heads * H, D) -> (D, heads, H)
    return lambda w: w.T.reshape(d, heads, h)

  def split_bias(heads):  # (heads * H,) -> (heads, H)
    return lambda b: b.reshape(heads, h)

  layout = {
      "model.embed_tokens.weight": spec(("embed",), (v, d), same),
      "model.norm.weight": spec(("final_norm", "scale"), (d,), same),
  }
  if not cfg.tie_embeddings:
    layout["lm_head.weight"] = spec(("lm_head",), (v, d), transpose)
  for i in range(cfg.num_layers):
    hf, ours = f"model.layers.{i}.", ("blocks", i)
    attn, mlp = ours + ("attn",), ours + ("mlp",)
    layout.update({
        f"{hf}input_layernorm.weight":
            spec(ours + ("attn_norm", "scale"), (d,), same),
        f"{hf}post_attention_layernorm.weight":
            spec(ours + ("mlp_norm", "scale"), (d,), same),
        f"{hf}self_attn.q_proj.weight":
            spec(attn + ("w_q",), (n * h, d), split_heads(n)),
        f"{hf}self_attn.k_proj.weight":
            spec(attn + ("w_k",), (k * h, d), split_heads(k)),
        f"{hf}self_attn.v_proj.weight":
            spec(attn + ("w_v",), (k * h, d), split_heads(k)),
        f"{hf}self_attn.o_proj.weight":
            spec(attn + ("w_o",), (d, n * h), lambda w: w.T.reshape(n, h, d)),
        f"{hf}mlp.gate_proj.weight":
            spec(mlp + ("w_gate",), (f, d), transpose),
        f"{hf}mlp.up_proj.weight":
            spec(mlp + ("w_up",), (f, d), transpose),
        f"{hf}mlp.down_proj.weight":
            spec(mlp + ("w_down",), (d, f), transpose),
    })
    if cfg.attention_bias:
      layout.update({
          f"{hf}self_attn.q_proj.bias":
              spec(attn + ("b_q",), (n * h,), split_bias(n)),
          f"{hf}self_attn.k_proj.bias":
              spec(attn + ("b_k",), (k * h,), split_bias(k)),
          f"{hf}self_attn.v_proj.bias":
              spec(attn + ("b_v",), (k * h,), split_bias(k)),
      })
  return layout


def fill_decoder(
    cfg: decoder_lib.DecoderConfig,
    layout: dict[str, checkpoint_io.TensorSpec],
    file_of: dict[str, checkpoint_io.SafetensorsFile],
    mesh: jax.sharding.Mesh | None,
    rules: sharding.Rules | None,
) -> decoder_lib.Decoder:
  """Builds the decoder abstractly, then sets each parameter from its file."""
  model = decoder_lib.abstract_decoder(cfg)
  params = nnx.state(model, nnx.Param)
  wanted = {p for p, _ in nnx.to_flat_state(params)}
  mapped = {s.path for s in layout.values()}
  if wanted != mapped:  # The decoder gained or renamed a parameter.
    raise RuntimeError(
        "hf_layout does not match the Decoder's parameters: unmapped "
        f"{sorted(map(str, wanted - mapped))}, unknown "
        f"{sorted(map(str, mapped - wanted))}")
  shardings = {}
  if mesh is not None:
    shardings = dict(
        nnx.to_flat_state(sharding.tree_shardings(params, mesh, rules)))
  for key, spec in layout.items():
    param = checkpoint_io.param_at(model, spec.path)
    target = param.get_value()  # A ShapeDtypeStruct.
    value = np.asarray(spec.convert(file_of[key].read(key)), target.dtype)
    if mesh is None:
      param.set_value(jax.device_put(value))
    else:
      param.set_value(
          jax.make_array_from_callback(
              value.shape,
              shardings[spec.path].get_value(),
              lambda index, value=value: value[index]))
  return model

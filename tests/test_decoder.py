"""Decoder LM: NumPy reference, RoPE, GQA, padding, KV cache, sharding."""

import functools
import math

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from taiji_jax import sharding
from taiji_jax.models import decoder

CFG = decoder.DecoderConfig.tiny()  # vocab 67, D 28, N 4, K 2, H 6, F 44
V = CFG.vocab_size


def _model(cfg=CFG, seed=0, std=0.15):
  """A decoder with NumPy-random parameters (norm scales 1 + noise, biases
  noise), so no term of the block math hides behind ones, zeros or tiny
  inits; and no eager JAX init, which compiles op by op and is slow."""
  model = decoder.abstract_decoder(cfg)
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      nnx.state(model, nnx.Param))
  values = []
  for path, x in flat:
    base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
    values.append(jnp.asarray(base + rng.normal(0, std, x.shape), x.dtype))
  nnx.update(model, jax.tree.unflatten(treedef, values))
  return model


def _tokens(seed, b, t, low=0):
  return jnp.asarray(
      np.random.default_rng(seed).integers(low, V, (b, t)), jnp.int32)


@nnx.jit
def _forward(model, tokens, mask=None, positions=None):
  return model(tokens, positions, mask)


@nnx.jit
def _hidden_and_head(model, tokens):
  h = model.hidden(tokens)
  return h, model.logits_from_hidden(h)


# ------------------------------------------------------ NumPy reference ---


def _np_rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _np_forward(model, tokens_t):
  """Float64 NumPy forward of one unpadded sequence (positions 0..T-1)."""
  cfg = model.cfg
  p = lambda v: np.asarray(v[...], np.float64)  # pylint: disable=g-long-lambda
  t, hd = len(tokens_t), cfg.head_dim
  groups = cfg.num_heads // cfg.num_kv_heads
  inv = 1.0 / cfg.rope_theta**(np.arange(0, hd, 2) / hd)
  if cfg.rope_scaling is not None:
    assert cfg.rope_scaling.rope_type == "linear"
    inv = inv / cfg.rope_scaling.factor
  ang = np.arange(t)[:, None] * inv[None]
  cos = np.cos(np.concatenate([ang, ang], -1))[:, None]
  sin = np.sin(np.concatenate([ang, ang], -1))[:, None]

  def rope(x_tnh):
    x1, x2 = x_tnh[..., :hd // 2], x_tnh[..., hd // 2:]
    return x_tnh * cos + np.concatenate([-x2, x1], -1) * sin

  x = p(model.embed)[np.asarray(tokens_t)]
  for blk in model.blocks:
    att = blk.attn
    h = _np_rms(x, p(blk.attn_norm.scale), cfg.rms_norm_eps)
    q = np.einsum("td,dnh->tnh", h, p(att.w_q))
    k = np.einsum("td,dnh->tnh", h, p(att.w_k))
    v = np.einsum("td,dnh->tnh", h, p(att.w_v))
    if cfg.attention_bias:
      q, k, v = q + p(att.b_q), k + p(att.b_k), v + p(att.b_v)
    q, k = rope(q), rope(k)
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    s = np.einsum("tnh,snh->nts", q, k) / math.sqrt(hd)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("nts,snh->tnh", w, v)
    x = x + np.einsum("tnh,nhd->td", o, p(att.w_o))
    h = _np_rms(x, p(blk.mlp_norm.scale), cfg.rms_norm_eps)
    g, u = h @ p(blk.mlp.w_gate), h @ p(blk.mlp.w_up)
    x = x + (g / (1 + np.exp(-g)) * u) @ p(blk.mlp.w_down)
  x = _np_rms(x, p(model.final_norm.scale), cfg.rms_norm_eps)
  if cfg.tie_embeddings:
    return x @ p(model.embed).T
  return x @ p(model.lm_head)


@pytest.mark.parametrize(
    "cfg",
    [
        CFG,  # Qwen2-style: q/k/v biases, tied head, K < N
        decoder.DecoderConfig.tiny(
            attention_bias=False,
            tie_embeddings=False,
            num_kv_heads=1,
            rope_theta=500.0,
            rope_scaling=decoder.RopeScaling("linear", 2.0)),
    ],
    ids=["qwen2_style", "llama_style"])
def test_forward_matches_numpy_reference(cfg):
  model = _model(cfg)
  tokens = _tokens(0, 2, 11)
  logits = _forward(model, tokens)
  for row in range(2):
    np.testing.assert_allclose(
        logits[row], _np_forward(model, tokens[row]), atol=2e-5, rtol=1e-5)


# --------------------------------------------------- shapes, causality ---


def test_shapes_dtypes_and_causality():
  model = _model()
  x = _tokens(1, 3, 11)
  logits = _forward(model, x)
  chex.assert_shape(logits, (3, 11, V))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  h, head = _hidden_and_head(model, x)
  chex.assert_shape(h, (3, 11, CFG.hidden_size))
  np.testing.assert_allclose(head, logits, atol=1e-5)
  y = x.at[:, 6:].set((x[:, 6:] + 1) % V)
  other = _forward(model, y)
  np.testing.assert_allclose(logits[:, :6], other[:, :6], atol=1e-6)
  assert not np.allclose(logits[:, 6:], other[:, 6:], atol=1e-3)


def test_bfloat16_activations_keep_float32_logits_and_stay_close():
  model = _model()
  bf16 = _model(decoder.DecoderConfig.tiny(dtype="bfloat16"))
  x = _tokens(2, 2, 7)
  h, out = _hidden_and_head(bf16, x)
  assert h.dtype == jnp.bfloat16
  assert out.dtype == jnp.float32
  ref = _forward(model, x)
  err = float(jnp.abs(out - ref).max())
  assert err < 0.05 * float(jnp.abs(ref).max()), err


def test_config_validation_and_head_dim_default():
  assert decoder.DecoderConfig(11, 24, 1, 4, 2, 40).head_dim == 6
  with pytest.raises(ValueError, match="divisible by num_kv_heads"):
    decoder.DecoderConfig(11, 24, 1, 4, 3, 40)
  with pytest.raises(ValueError, match="even head_dim"):
    decoder.DecoderConfig(11, 28, 1, 4, 2, 40)
  with pytest.raises(ValueError, match="dtype"):
    decoder.DecoderConfig.tiny(dtype="float64")


# ------------------------------------------------------- RoPE and GQA ---


def test_rope_matches_pairwise_rotation_in_numpy():
  rng = np.random.default_rng(3)
  b, t, n, h, theta = 2, 5, 3, 8, 10_000.0
  x = rng.normal(size=(b, t, n, h)).astype(np.float32)
  pos = rng.integers(0, 50, (b, t))
  cos, sin = decoder.rope_tables(
      jnp.asarray(pos), decoder.rope_inv_freq(h, theta))
  got = np.asarray(decoder.apply_rope(jnp.asarray(x), cos, sin))
  want = np.empty_like(x)
  # Dimension i is paired with i + h/2 and rotated by pos * theta^(-2i/h).
  for i in range(h // 2):
    angle = pos[..., None] * theta**(-2 * i / h)
    a, c = x[..., i], x[..., i + h // 2]
    want[..., i] = a * np.cos(angle) - c * np.sin(angle)
    want[..., i + h // 2] = c * np.cos(angle) + a * np.sin(angle)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Rotations keep norms, and q.k depends only on the position offset.
  np.testing.assert_allclose(
      np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)

  def dot(p_q, p_k):
    pos2 = jnp.asarray([[p_q, p_k]])
    c, s = decoder.rope_tables(pos2, decoder.rope_inv_freq(h, theta))
    r = decoder.apply_rope(jnp.asarray(x[:1, :2, :1]), c, s)
    return float(jnp.sum(r[0, 0, 0] * r[0, 1, 0]))

  np.testing.assert_allclose(dot(7, 3), dot(24, 20), rtol=1e-4)


def test_llama3_rope_scaling_keeps_high_and_stretches_low_frequencies():
  scaling = decoder.DecoderConfig.llama_1b().rope_scaling
  base = np.asarray(decoder.rope_inv_freq(64, 500_000.0))
  scaled = np.asarray(decoder.rope_inv_freq(64, 500_000.0, scaling))
  wavelen = 2 * np.pi / base
  high = wavelen < 8192 / 4
  low = wavelen > 8192 / 1
  assert high.any() and low.any() and (~high & ~low).any()
  np.testing.assert_allclose(scaled[high], base[high], rtol=1e-6)
  np.testing.assert_allclose(scaled[low], base[low] / 32, rtol=1e-6)
  mid = ~high & ~low
  assert np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] /
                                                    32)
  linear = decoder.rope_inv_freq(64, 500_000.0,
                                 decoder.RopeScaling("linear", 4.0))
  np.testing.assert_allclose(linear, base / 4, rtol=1e-6)


def test_gqa_equals_mha_with_repeated_kv_weights():
  gqa = _model()
  mha_cfg = decoder.DecoderConfig.tiny(num_kv_heads=CFG.num_heads)
  mha = _model(mha_cfg, seed=1)
  groups = CFG.num_heads // CFG.num_kv_heads

  def copy(expand):
    state = nnx.state(gqa, nnx.Param)
    for i in range(CFG.num_layers):
      attn = state["blocks"][i]["attn"]
      for name, axis in (("w_k", 1), ("w_v", 1), ("b_k", 0), ("b_v", 0)):
        attn[name] = attn[name].replace(expand(attn[name][...], axis))
    nnx.update(mha, state)

  x = _tokens(4, 2, 9)
  copy(lambda w, axis: jnp.repeat(w, groups, axis=axis))
  np.testing.assert_allclose(_forward(mha, x), _forward(gqa, x), atol=1e-5)
  # The head order matters: query head n reads kv head n // groups.
  copy(lambda w, axis: jnp.concatenate([w] * groups, axis=axis))
  assert not np.allclose(_forward(mha, x), _forward(gqa, x), atol=1e-3)


# ------------------------------------------------- padding and KV cache ---


def test_left_padding_gives_the_same_logits_at_real_positions():
  model = _model()
  real = _tokens(5, 1, 6)
  pad = 3
  padded = jnp.concatenate([jnp.full((1, pad), 5, jnp.int32), real], 1)
  mask = jnp.arange(pad + 6)[None] >= pad
  a = _forward(model, real)
  b = _forward(model, padded, mask)
  np.testing.assert_allclose(b[:, pad:], a, atol=1e-5)
  # Without the mask the padding leaks in, so the check above can fail.
  c = _forward(model, padded)
  assert not np.allclose(c[:, pad:], a, atol=1e-3)


def _decode_fn(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tokens, cache, mask):
    return nnx.merge(graphdef, state).decode_step(tokens, cache, mask)

  return step, state


def test_kv_cache_decode_matches_full_forward_with_left_padding():
  model = _model()
  lengths = np.array([5, 3, 1])
  prompt = _tokens(6, 3, 5)
  prompt_mask = jnp.asarray(np.arange(5)[None] >= 5 - lengths[:, None])
  prompt = jnp.where(prompt_mask, prompt, 0)
  new = _tokens(7, 3, 4)
  full = _forward(model, jnp.concatenate([prompt, new], 1),
                  jnp.concatenate(
                      [prompt_mask, jnp.ones((3, 4), bool)], 1))
  step, state = _decode_fn(model)
  cache = model.init_cache(3, 12)
  logits, cache = step(state, prompt, cache, prompt_mask)  # prefill
  got = [logits]
  logits, cache = step(state, new[:, :2], cache, jnp.ones((3, 2), bool))
  got.append(logits)
  for i in (2, 3):
    logits, cache = step(state, new[:, i:i + 1], cache, jnp.ones((3, 1), bool))
    got.append(logits)
  got = jnp.concatenate(got, 1)
  real = np.asarray(jnp.concatenate([prompt_mask, jnp.ones((3, 4), bool)], 1))
  np.testing.assert_allclose(
      np.asarray(got)[real], np.asarray(full)[real], atol=1e-5)
  np.testing.assert_array_equal(cache.index, [9, 9, 9])
  np.testing.assert_array_equal(cache.next_position, lengths + 4)
  assert step._cache_size() == 3  # pylint: disable=protected-access
  # Each row also equals its unpadded sequence run on its own.
  for row, n in enumerate(lengths):
    alone = _forward(
        model,
        jnp.concatenate([prompt[row:row + 1, 5 - n:], new[row:row + 1]], 1))
    np.testing.assert_allclose(got[row, -4:], alone[0, -4:], atol=1e-5)


def test_cache_rows_can_be_gathered_for_beam_search():
  model = _model()
  prompt = _tokens(8, 3, 4)
  mask = jnp.asarray([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]], bool)
  step, state = _decode_fn(model)
  _, cache = step(state, prompt, model.init_cache(3, 6), mask)
  idx = jnp.asarray([2, 0, 2, 1])
  cache = jax.tree.map(lambda x: x[idx], cache)
  nxt = _tokens(9, 4, 1)
  graphdef = nnx.graphdef(model)
  next_fn = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode_next(t, c))
  logits, cache = next_fn(state, nxt[:, 0], cache)
  chex.assert_shape(logits, (4, V))
  full = _forward(model, jnp.concatenate([prompt[idx], nxt], 1),
                  jnp.concatenate([mask[idx], jnp.ones((4, 1), bool)], 1))
  np.testing.assert_allclose(logits, full[:, -1], atol=1e-5)
  np.testing.assert_array_equal(cache.next_position, [3, 5, 3, 4])


# ------------------------------------------------- loss, counts, config ---


def test_next_token_loss_matches_manual_cross_entropy():
  rng = np.random.default_rng(10)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = np.array([[1, 4, 0], [2, 2, 3]])
  mask = np.array([[1, 0, 1], [0, 1, 1]], bool)
  loss, count = decoder.next_token_loss(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  gold = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  assert int(count) == 4
  np.testing.assert_allclose(loss, -gold[mask].mean(), rtol=1e-6)
  all_loss, all_count = decoder.next_token_loss(
      jnp.asarray(logits), jnp.asarray(targets))
  assert int(all_count) == 6
  np.testing.assert_allclose(all_loss, -gold.mean(), rtol=1e-6)


QWEN2_0_5B_HF = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_position_embeddings": 131072,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

LLAMA_3_2_1B_HF = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3"
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "vocab_size": 128256,
}


def test_published_parameter_counts_and_hf_configs():
  qwen = decoder.DecoderConfig.qwen2_0_5b()
  llama = decoder.DecoderConfig.llama_1b()
  assert decoder.count_params(qwen) == 494_032_768
  assert decoder.count_params(llama) == 1_235_814_400
  assert decoder.DecoderConfig.from_hf_config(QWEN2_0_5B_HF) == qwen
  assert decoder.DecoderConfig.from_hf_config(LLAMA_3_2_1B_HF) == llama
  untied = decoder.DecoderConfig.from_hf_config({
      **QWEN2_0_5B_HF, "tie_word_embeddings": False
  })
  assert decoder.count_params(untied) == 494_032_768 + 151_936 * 896


def test_unsupported_hf_configs_are_clear_errors():
  yarn = {**QWEN2_0_5B_HF, "rope_scaling": {"type": "yarn", "factor": 4.0}}
  with pytest.raises(NotImplementedError, match="yarn"):
    decoder.DecoderConfig.from_hf_config(yarn)
  with pytest.raises(NotImplementedError, match="gemma"):
    decoder.DecoderConfig.from_hf_config({
        **QWEN2_0_5B_HF, "model_type": "gemma"
    })
  with pytest.raises(NotImplementedError, match="sliding"):
    decoder.DecoderConfig.from_hf_config({
        **QWEN2_0_5B_HF, "use_sliding_window": True
    })
  default = {**LLAMA_3_2_1B_HF, "rope_scaling": {"rope_type": "default"}}
  assert decoder.DecoderConfig.from_hf_config(default).rope_scaling is None


# ---------------------------------------------------- sharding, training ---


@functools.lru_cache
def _loss_and_grads(graphdef):
  """Jitted (loss, logits), grads; cached so equal graphdefs share it."""

  def loss_fn(params, tokens, mask):
    model = nnx.merge(graphdef, params)
    logits = model(tokens[:, :-1], attention_mask_bt=mask[:, :-1])
    loss, _ = decoder.next_token_loss(logits, tokens[:, 1:], mask[:, 1:])
    return loss, logits

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def test_sharded_forward_and_grads_match_single_device():
  assert len(jax.devices()) == 8, "conftest must provide 8 fake devices"
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = decoder.init_sharded(CFG, mesh, seed=0)
  single = jax.jit(
      lambda: nnx.state(decoder.Decoder(CFG, rngs=nnx.Rngs(params=0))))()
  chex.assert_trees_all_close(
      jax.device_get(nnx.state(sharded)), jax.device_get(single))
  w_q = sharded.blocks[0].attn.w_q[...]
  assert w_q.sharding.spec == jax.sharding.PartitionSpec(
      "fsdp", "tensor", None), w_q.sharding.spec
  assert sharded.blocks[0].attn.w_k[...].sharding.spec[1] == "tensor"
  assert sharded.blocks[0].mlp.w_down[...].sharding.spec == (
      jax.sharding.PartitionSpec("tensor", "fsdp"))

  graphdef, params = nnx.split(_model(), nnx.Param)
  shardings = sharding.tree_shardings(params, mesh)
  rng = np.random.default_rng(11)
  tokens = rng.integers(0, V, (8, 10)).astype(np.int32)
  mask = np.arange(10)[None] >= rng.integers(0, 4, (8, 1))
  step = _loss_and_grads(graphdef)
  (loss_1, logits_1), grads_1 = step(params, tokens, mask)
  with sharding.use_mesh(mesh):
    put = lambda x: jax.device_put(  # pylint: disable=g-long-lambda
        x, sharding.data_sharding(mesh, x.ndim, shape=x.shape))
    (loss_8, logits_8), grads_8 = step(
        jax.device_put(params, shardings), put(tokens), put(mask))
  assert len(logits_8.sharding.device_set) == 8
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
  np.testing.assert_allclose(logits_8, logits_1, atol=1e-5)
  chex.assert_trees_all_close(
      jax.device_get(grads_8), jax.device_get(grads_1), atol=1e-5)


def test_remat_gives_the_same_gradients():
  model = _model()
  graphdef, params = nnx.split(model, nnx.Param)
  remat_graphdef, _ = nnx.split(
      decoder.abstract_decoder(decoder.DecoderConfig.tiny(remat=True)),
      nnx.Param)
  tokens = _tokens(12, 8, 10)  # the shapes of the sharded test: one compile
  mask = jnp.ones((8, 10), bool)
  (loss_a, _), grads_a = _loss_and_grads(graphdef)(params, tokens, mask)
  (loss_b, _), grads_b = _loss_and_grads(remat_graphdef)(params, tokens, mask)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  chex.assert_trees_all_close(grads_a, grads_b, atol=1e-6)


def _copy_batch(rng, b=16, n=5):
  """[x_1..x_n, SEP, x_1..x_n]: the second half is predictable."""
  seq = rng.integers(3, 19, (b, n))
  tokens = np.concatenate([seq, np.full((b, 1), 1), seq], 1).astype(np.int32)
  loss_mask = np.zeros((b, 2 * n), bool)
  loss_mask[:, n:] = True  # targets after SEP (tokens[:, n + 1:])
  return tokens, loss_mask


def test_jitted_train_step_learns_copy_task_and_compiles_once():
  graphdef, params = nnx.split(_model(std=0.02), nnx.Param)
  tx = optax.adamw(1e-2, weight_decay=0.0)

  def loss_fn(params, tokens, loss_mask):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return decoder.next_token_loss(logits, tokens[:, 1:], loss_mask)[0]

  @jax.jit
  def train_step(params, opt_state, tokens, loss_mask):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, loss_mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  rng = np.random.default_rng(13)
  losses = []
  for _ in range(40):
    params, opt_state, loss = train_step(params, opt_state, *_copy_batch(rng))
    losses.append(float(loss))
  assert train_step._cache_size() == 1  # pylint: disable=protected-access
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < 0.6 * losses[0], losses


def test_dropout_only_in_calls_with_a_key_and_keeps_the_mean():
  x = jnp.ones((4000,), jnp.float32)
  key = jax.random.key(3)
  dropped = np.asarray(decoder.dropout(x, 0.25, key))
  kept = dropped != 0
  np.testing.assert_allclose(dropped[kept], 1 / 0.75, rtol=1e-6)
  assert abs(kept.mean() - 0.75) < 0.03
  np.testing.assert_array_equal(decoder.dropout(x, 0.25, None), x)
  np.testing.assert_array_equal(decoder.dropout(x, 0.0, key), x)

  cfg = decoder.DecoderConfig.tiny(dropout_rate=0.3)
  model, plain = _model(cfg), _model(CFG)
  tokens = _tokens(4, 2, 9)
  # Without a key the dropout model is the same function as without dropout.
  np.testing.assert_allclose(
      _forward(model, tokens), _forward(plain, tokens), rtol=1e-6)
  run = nnx.jit(lambda m, t, k: m(t, dropout_rng=k))
  a, b = run(model, tokens, key), run(model, tokens, key)
  c = run(model, tokens, jax.random.key(4))
  np.testing.assert_array_equal(a, b)  # deterministic given the key
  assert not np.allclose(a, c)  # and a different key drops differently
  assert not np.allclose(a, _forward(model, tokens))
  with pytest.raises(ValueError, match="dropout_rate"):
    decoder.DecoderConfig.tiny(dropout_rate=1.0)

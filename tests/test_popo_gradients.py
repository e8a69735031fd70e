"""Per-objective gradients in one pass, and their Gram matrix, sharded too."""

import jax
import jax.numpy as jnp
import numpy as np

from taiji_jax import sharding
from taiji_jax.rl import popo


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "w1": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
      "b1": jnp.asarray(rng.normal(size=(16,)), jnp.float32),
      "w2": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  targets = jnp.asarray(rng.normal(size=(3, 32, 4)), jnp.float32)

  def forward(p):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]  # (32, 4)

  def heads(out):  # three objectives of the same output
    return jnp.stack([
        jnp.mean((out - targets[0])**2),
        jnp.mean(jnp.abs(out - targets[1])),
        -jnp.mean(out * targets[2]),
    ])

  return params, forward, heads


def test_one_pass_gradients_equal_separate_backward_passes():
  params, forward, heads = _problem()
  losses, grads, _ = jax.jit(
      lambda p: popo.objective_gradients(forward, heads, p))(params)
  for k in range(3):
    want = jax.grad(lambda p: heads(forward(p))[k])(params)
    for name in params:
      np.testing.assert_allclose(grads[name][k], want[name], rtol=1e-5,
                                 atol=1e-6)
    np.testing.assert_allclose(losses[k], heads(forward(params))[k], rtol=1e-6)
  flat = np.concatenate(
      [np.asarray(grads[n]).reshape(3, -1) for n in sorted(params)], 1)
  np.testing.assert_allclose(popo.gram_matrix(grads), flat @ flat.T,
                             rtol=1e-5)


def test_mgda_ub_gradients_with_respect_to_the_outputs():
  """MGDA-UB: the primal is the representation, not the parameters."""
  params, forward, heads = _problem(1)
  hidden = forward(params)
  _, grads, _ = popo.objective_gradients(lambda h: h, heads, hidden)
  for k in range(3):
    np.testing.assert_allclose(
        grads[k], jax.grad(lambda h: heads(h)[k])(hidden), rtol=1e-6)


def test_sharded_gram_and_weights_equal_unsharded():
  params, forward, heads = _problem(2)

  def weights(p):
    _, grads, _ = popo.objective_gradients(forward, heads, p)
    gram = popo.gram_matrix(grads)
    return gram, popo.min_norm_weights(gram)

  want_gram, want_w = jax.jit(weights)(params)
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  assert mesh.shape["fsdp"] == 8
  spec = jax.sharding.PartitionSpec
  shard = {
      "w1": jax.sharding.NamedSharding(mesh, spec(None, "fsdp")),
      "b1": jax.sharding.NamedSharding(mesh, spec("fsdp")),
      "w2": jax.sharding.NamedSharding(mesh, spec("fsdp", None)),
  }
  placed = jax.device_put(params, shard)
  assert len(placed["w1"].sharding.device_set) == 8
  got_gram, got_w = jax.jit(weights, in_shardings=(shard,))(placed)
  np.testing.assert_allclose(got_gram, want_gram, rtol=1e-5)
  np.testing.assert_allclose(got_w, want_w, atol=1e-5)

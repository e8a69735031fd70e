"""Pareto reward weighting: the min-norm point of K objective gradients.

MGDA (Désidéri 2012; Sener & Koltun 2018, arXiv 1810.04650): given the
gradients g_1..g_K of K objectives, the weights

  w* = argmin_{w in simplex} || sum_k w_k g_k ||^2 = argmin w^T G w

(G the (K, K) Gram matrix G_ij = <g_i, g_j>) give the common direction d =
sum_k w*_k g_k. Either d = 0 (the point is Pareto-stationary) or d is a
descent direction of every objective: <g_i, d> >= ||d||^2 > 0 for all i (the
KKT conditions of the QP).

Everything works on the Gram matrix alone, so the same solver serves
parameter gradients of any size or sharding (the Gram matrix is reduced in
the jitted step) and MGDA-UB's gradients with respect to the last hidden
states. `min_norm_weights(gram)` is jit- and vmap-able:

- K = 1: [1];
- K = 2: the closed form w_1 = clip(<g_2 - g_1, g_2> / ||g_1 - g_2||^2, 0,
  1);
- K > 2: Frank-Wolfe with exact line search under `jax.lax.while_loop`,
  with away steps (Lacoste-Julien & Jaggi 2015: moving weight off the worst
  vertex of the support, which converges linearly on the simplex where
  plain Frank-Wolfe zig-zags), started from the best of the closed-form
  pair solutions, stopped when the duality gap w^T G w - min_i (G w)_i
  falls below `tol` (relative to the Gram's scale) or after `max_iters`
  steps.

`normalize_gram` implements Sener & Koltun's gradient normalisations (none,
l2, loss, loss+); `scale_weights` maps weights found on normalised
gradients back to weights on the raw ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def _pair_weight(g11, g12, g22):
  """Weight on g_1 of the min-norm point of {g_1, g_2} (closed form)."""
  denom = g11 + g22 - 2.0 * g12
  safe = jnp.where(denom > 0, denom, 1.0)
  return jnp.where(denom > 0, jnp.clip((g22 - g12) / safe, 0.0, 1.0), 0.5)


def _best_pair_start(gram):
  """The best two-objective solution (one-hot vertices included), (K,)."""
  k = gram.shape[0]
  diag = jnp.diagonal(gram)
  i, j = jnp.triu_indices(k, 1)
  a = _pair_weight(gram[i, i], gram[i, j], gram[j, j])
  value = a * a * gram[i, i] + 2 * a * (1 - a) * gram[i, j] + (1 - a)**2 * (
      gram[j, j])
  best = jnp.argmin(value)
  w = jnp.zeros((k,), gram.dtype)
  w = w.at[i[best]].add(a[best]).at[j[best]].add(1.0 - a[best])
  vertex = jax.nn.one_hot(jnp.argmin(diag), k, dtype=gram.dtype)
  return jnp.where(jnp.min(diag) < value[best], vertex, w)


def min_norm_weights(gram: jax.Array,
                     max_iters: int = 1000,
                     tol: float = 1e-9) -> jax.Array:
  """(K,) simplex weights of the min-norm point of the gradients' hull.

  Args:
    gram: (K, K) symmetric PSD Gram matrix of the K gradients.
    max_iters: Frank-Wolfe steps (K > 2).
    tol: stop when the duality gap is below tol * max(diag(gram)).

  Returns:
    w with w >= 0, sum(w) = 1, minimising w^T gram w (module docstring).
  """
  gram = jnp.asarray(gram, jnp.float32)
  gram = 0.5 * (gram + gram.T)
  k = gram.shape[0]
  if gram.shape != (k, k):
    raise ValueError(f"gram must be (K, K), got {gram.shape}.")
  if k == 1:
    return jnp.ones((1,), jnp.float32)
  if k == 2:
    a = _pair_weight(gram[0, 0], gram[0, 1], gram[1, 1])
    return jnp.stack([a, 1.0 - a])
  scale = jnp.maximum(jnp.max(jnp.diagonal(gram)), 1e-30)

  def gap(w):
    gw = gram @ w
    return w @ gw - jnp.min(gw), gw

  def cond(carry):
    it, w = carry
    g, _ = gap(w)
    return (it < max_iters) & (g > tol * scale)

  def body(carry):
    it, w = carry
    _, gw = gap(w)
    vv = w @ gw
    # Frank-Wolfe vertex t, and the away vertex a (worst in the support).
    t = jnp.argmin(gw)
    a = jnp.argmax(jnp.where(w > 0, gw, -jnp.inf))
    fw_gain, away_gain = vv - gw[t], gw[a] - vv
    use_fw = fw_gain >= away_gain
    e_t = jax.nn.one_hot(t, k, dtype=w.dtype)
    e_a = jax.nn.one_hot(a, k, dtype=w.dtype)
    d = jnp.where(use_fw, e_t - w, w - e_a)
    w_a = w[a]
    gamma_max = jnp.where(use_fw, 1.0,
                          w_a / jnp.maximum(1.0 - w_a, 1e-30))
    # Exact line search of f(w + gamma d) = f + 2 gamma w'Gd + gamma^2 d'Gd.
    gd = gram @ d
    curv = d @ gd
    slope = w @ gd
    gamma = jnp.where(curv > 0, -slope / jnp.where(curv > 0, curv, 1.0),
                      jnp.where(slope < 0, gamma_max, 0.0))
    gamma = jnp.clip(gamma, 0.0, gamma_max)
    w = jnp.maximum(w + gamma * d, 0.0)
    return it + 1, w / jnp.sum(w)

  _, w = jax.lax.while_loop(cond, body, (0, _best_pair_start(gram)))
  return w


def normalize_gram(gram: jax.Array,
                   mode: str = "none",
                   losses: jax.Array | None = None,
                   eps: float = 1e-12) -> tuple[jax.Array, jax.Array]:
  """Sener & Koltun's gradient normalisations on the Gram matrix.

  g_k is divided by n_k: 1 ("none"), ||g_k|| ("l2"), the loss L_k ("loss")
  or L_k ||g_k|| ("loss+").

  Returns:
    (gram of the normalised gradients, n (K,)).
  """
  if mode not in NORMALIZATIONS:
    raise ValueError(f"unknown gradient normalisation {mode!r}; use one of "
                     f"{NORMALIZATIONS}.")
  k = gram.shape[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  if mode in ("loss", "loss+"):
    if losses is None:
      raise ValueError(f"normalisation {mode!r} needs the losses.")
    losses = jnp.abs(jnp.asarray(losses, gram.dtype))
  n = {
      "none": lambda: jnp.ones((k,), gram.dtype),
      "l2": lambda: norms,
      "loss": lambda: losses,
      "loss+": lambda: losses * norms,
  }[mode]()
  n = jnp.maximum(n, eps)
  return gram / (n[:, None] * n[None, :]), n


def scale_weights(weights: jax.Array, n: jax.Array) -> jax.Array:
  """Weights on the raw gradients of weights on g_k / n_k, normalised to
  sum 1 (the direction is the same up to a positive factor)."""
  raw = weights / n
  return raw / jnp.maximum(jnp.sum(raw), 1e-30)


def objective_gradients(forward, heads, primal):
  """Gradients of K objectives in one forward and one vmapped VJP.

  Args:
    forward: primal -> out (any pytree), e.g. parameters -> the rollouts'
      token log-probs, or (MGDA-UB) final hidden states -> log-probs.
    heads: out -> (K,) the K objectives' losses as functions of `out`
      (cheap: the expensive part is `forward`).
    primal: the pytree differentiated (parameters or hidden states).

  Returns:
    (losses (K,), grads: the primal's pytree with a leading K axis, out).
    `forward` runs once; its VJP is applied to the K cotangents
    d loss_k / d out with `jax.vmap`, not K backward passes.
  """
  out, vjp = jax.vjp(forward, primal)
  losses, head_vjp = jax.vjp(heads, out)
  k = losses.shape[0]
  cotangents = jax.vmap(head_vjp)(jnp.eye(k, dtype=losses.dtype))[0]
  grads = jax.vmap(vjp)(cotangents)[0]
  return losses, grads, out


def gram_matrix(grads) -> jax.Array:
  """(K, K) Gram matrix <g_i, g_j> of stacked gradients (leading K axis).

  To restrict it to some layers, differentiate only those
  (`reward_gradients.select_leaves`). Under jit with sharded gradients each
  leaf's contraction is a local product plus a reduction that XLA inserts,
  so the result is the same as unsharded.
  """
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ValueError("no gradient leaf.")
  k = leaves[0].shape[0]
  total = jnp.zeros((k, k), jnp.float32)
  for g in leaves:
    flat = g.reshape(k, -1).astype(jnp.float32)
    total = total + flat @ flat.T
  return total

"""TIGER's RQ-VAE (Rajput et al., NeurIPS 2023) in Flax NNX.

An MLP encoder maps an item embedding x to a latent z; L residual codebooks
quantise z greedily (r_0 = z, c_l = argmin_k ||r_l - e_k^l||,
r_{l+1} = r_l - e_{c_l}^l); an MLP decoder reconstructs x from the quantised
latent z_q = sum_l e_{c_l}^l. The codes (c_1..c_L) are the item's semantic
ID. Training minimises

  L = ||x - x_hat||^2
      + sum_l ( ||sg[r_l] - e_{c_l}||^2 + beta ||r_l - sg[e_{c_l}]||^2 )

with the straight-through estimator x_hat = D(z + sg[z_q - z]): the decoder
gradient reaches the encoder unchanged, the codebooks learn only from their
codebook term, and the commitment term (beta = 0.25) keeps the encoder close
to its codewords. Squared norms are summed over dims, averaged over the
batch. The residual chain uses sg[e] so that a level's codebook is moved
only by its own term.

Two guards against codebook collapse, both from TIGER and VQ practice:
* k-means initialisation: the codebooks start as k-means centroids
  (`kmeans.fit`) of the encoder outputs of the first batch, level by level
  on the successive residuals;
* dead-code restarts, inside the jitted train step: the step counts code
  usage; every `dead_code_window` steps (default one epoch) codes used fewer
  than `dead_code_threshold` times since the last check are reset to
  randomly drawn current residuals of the batch at their level, and the
  counts restart. Optimizer moments of a reset code are left as they are.

The train step is one jitted, donated `train_step(state, x_bd, key) ->
(state, metrics)` over minibatches; the host loop shuffles, tracks
per-epoch metrics (losses, code utilisation and perplexity) and stops with
an error on a non-finite loss.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from taiji_jax.quantize import kmeans
from taiji_jax.quantize import residual

OPTIMIZERS = ("adamw", "adam", "adagrad", "sgd")


@dataclasses.dataclass(frozen=True)
class RQVAEConfig:
  """Hyper-parameters of the RQ-VAE and its training.

  Attributes:
    input_dim: D of the item embeddings.
    hidden_dims: encoder widths (the decoder mirrors them).
    latent_dim: dim of z and of every codeword.
    codebook_sizes: K_l per level.
    beta: commitment weight.
    optimizer: one of OPTIMIZERS; TIGER used "adagrad" with lr 0.4.
    lr: learning rate.
    weight_decay: AdamW decay of the dense kernels (not of biases or
      codebooks); ignored by the other optimizers.
    batch_size: minibatch size; the last incomplete batch of an epoch is
      dropped (static shapes).
    epochs: passes over the data.
    dead_code_threshold: codes used fewer times than this within a window are
      restarted; 0 disables restarts.
    dead_code_window: steps per restart check; 0 means one epoch.
    kmeans_init_iters: Lloyd steps of the codebook initialisation.
    seed: seeds parameters, k-means, shuffling and restarts.
  """
  input_dim: int
  hidden_dims: tuple[int, ...] = (512, 256, 128)
  latent_dim: int = 32
  codebook_sizes: tuple[int, ...] = (256, 256, 256)
  beta: float = 0.25
  optimizer: str = "adamw"
  lr: float = 1e-3
  weight_decay: float = 1e-4
  batch_size: int = 1024
  epochs: int = 100
  dead_code_threshold: float = 1.0
  dead_code_window: int = 0
  kmeans_init_iters: int = 20
  seed: int = 0

  def __post_init__(self):
    if self.input_dim < 1 or self.latent_dim < 1:
      raise ValueError(f"input_dim and latent_dim must be >= 1, got "
                       f"{self.input_dim} and {self.latent_dim}.")
    if not self.codebook_sizes or min(self.codebook_sizes) < 1:
      raise ValueError(f"codebook_sizes must be non-empty positive ints, got "
                       f"{self.codebook_sizes}.")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got "
                       f"{self.optimizer!r}.")
    if self.batch_size < 1 or self.epochs < 0:
      raise ValueError(f"batch_size must be >= 1 and epochs >= 0, got "
                       f"{self.batch_size} and {self.epochs}.")
    if self.dead_code_threshold < 0 or self.dead_code_window < 0:
      raise ValueError("dead_code_threshold and dead_code_window must be "
                       ">= 0.")

  @classmethod
  def tiger(cls, input_dim: int = 768, **overrides) -> RQVAEConfig:
    """TIGER's setting: 768 -> 512 -> 256 -> 128 -> 32, 3 x 256 codes,
    Adagrad lr 0.4, batch 1024 (the paper trains ~20k epochs)."""
    kwargs = dict(
        input_dim=input_dim,
        optimizer="adagrad",
        lr=0.4,
        batch_size=1024,
        epochs=20_000)
    kwargs.update(overrides)
    return cls(**kwargs)


class Dense(nnx.Module):
  """y = x W + b with logical axis names on the parameters."""

  def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.lecun_normal()
    self.kernel = nnx.Param(
        init(rngs.params(), (in_dim, out_dim)), logical_axes=("embed", "mlp"))
    self.bias = nnx.Param(jnp.zeros((out_dim,)), logical_axes=("mlp",))

  def __call__(self, x_bi: jax.Array) -> jax.Array:
    return x_bi @ self.kernel[...] + self.bias[...]


class MLP(nnx.Module):
  """Dense layers of the given widths with ReLU between them (not after the
  last)."""

  def __init__(self, dims: Sequence[int], *, rngs: nnx.Rngs):
    self.layers = nnx.List(
        [Dense(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x_bi: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x_bi = layer(x_bi)
      if i < len(self.layers) - 1:
        x_bi = jax.nn.relu(x_bi)
    return x_bi


class RQVAE(nnx.Module):
  """Encoder, residual codebooks (one nnx.Param per level) and decoder."""

  def __init__(self, config: RQVAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    dims = (config.input_dim, *config.hidden_dims, config.latent_dim)
    self.encoder = MLP(dims, rngs=rngs)
    self.decoder = MLP(dims[::-1], rngs=rngs)
    self.codebooks = nnx.List([
        nnx.Param(
            jax.random.normal(rngs.params(), (k, config.latent_dim)),
            logical_axes=(None, None)) for k in config.codebook_sizes
    ])

  def codebook_arrays(self) -> tuple[jax.Array, ...]:
    """The L codebooks as arrays, level l of shape (K_l, latent_dim)."""
    return tuple(cb[...] for cb in self.codebooks)

  def quantize(self, x_bi: jax.Array):
    """(codes_bl, z_bz, z_q_bz): codes, latent and its quantisation."""
    z_bz = self.encoder(x_bi)
    codes_bl, zq_bz, _ = residual.residual_encode(self.codebook_arrays(), z_bz)
    return codes_bl, z_bz, zq_bz


class TrainState(NamedTuple):
  """What the jitted step carries (and donates) from step to step.

  Attributes:
    params: nnx.State of the model's Params.
    opt_state: optax state.
    usage: per level, (K_l,) code counts since the last restart check.
    step: () int32 steps taken.
  """
  params: Any
  opt_state: Any
  usage: tuple[jax.Array, ...]
  step: jax.Array


def make_optimizer(config: RQVAEConfig) -> optax.GradientTransformation:
  """The optax optimizer named by `config.optimizer`."""
  if config.optimizer == "adamw":

    def decay_mask(params):
      # Decay only 2-D dense kernels; codebooks live under "codebooks".
      def is_kernel(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
        return leaf.ndim == 2 and "codebooks" not in names

      return jax.tree.map_with_path(is_kernel, params)

    return optax.adamw(
        config.lr, weight_decay=config.weight_decay, mask=decay_mask)
  if config.optimizer == "adam":
    return optax.adam(config.lr)
  if config.optimizer == "adagrad":
    return optax.adagrad(config.lr)
  return optax.sgd(config.lr)


def check_input(x_nd, config: RQVAEConfig | None = None) -> np.ndarray:
  """Validates item embeddings; returns them as a float32 numpy array.

  Raises:
    ValueError: wrong rank or dim, NaN/inf rows (how many, first index), or
      fewer items than the largest codebook.
  """
  x_nd = np.asarray(x_nd)
  if x_nd.ndim != 2:
    raise ValueError(f"x_nd must be 2-D (N, D), got shape {x_nd.shape}.")
  x_nd = x_nd.astype(np.float32)
  if config is not None:
    if x_nd.shape[1] != config.input_dim:
      raise ValueError(f"x_nd has dim {x_nd.shape[1]} but the config's "
                       f"input_dim is {config.input_dim}.")
    k = max(config.codebook_sizes)
    if x_nd.shape[0] < k:
      raise ValueError(f"a codebook of size {k} needs at least {k} items, "
                       f"got N={x_nd.shape[0]}.")
  finite_n = np.isfinite(x_nd).all(axis=1)
  if not finite_n.all():
    bad = np.flatnonzero(~finite_n)
    raise ValueError(f"x_nd has {bad.size} of {x_nd.shape[0]} rows with NaN "
                     f"or inf values; the first is row {bad[0]}.")
  return x_nd


@functools.partial(nnx.jit, static_argnums=0)
def create(config: RQVAEConfig) -> RQVAE:
  """A randomly initialised model, seeded by `config.seed`; `init` adds the
  k-means codebooks. Jitted: one compilation instead of dozens of eager
  initialiser ops."""
  return RQVAE(config, rngs=nnx.Rngs(params=config.seed))


def init(x_nd, config: RQVAEConfig) -> RQVAE:
  """A model whose codebooks are k-means centroids of the first batch.

  The first batch is the first max(batch_size, max K_l) items of the
  seeded shuffle (so that every codebook sees at least K_l points); level l
  clusters the residuals left by levels < l.
  """
  x_nd = check_input(x_nd, config)
  model = create(config)
  order_n = np.random.default_rng(config.seed).permutation(x_nd.shape[0])
  first = max(config.batch_size, max(config.codebook_sizes))
  z_bz = model.encoder(jnp.asarray(x_nd[order_n[:first]]))
  key = jax.random.key(config.seed)
  for level, k in enumerate(config.codebook_sizes):
    result = kmeans.fit(
        jax.random.fold_in(key, level),
        z_bz,
        k,
        iters=config.kmeans_init_iters,
        check_inputs=False)
    model.codebooks[level][...] = result.centroids
    z_bz = z_bz - result.centroids[result.codes]
  return model


def restart_dead_codes(codebook_kz: jax.Array, usage_k: jax.Array,
                       residuals_bz: jax.Array, key: jax.Array,
                       threshold: float) -> tuple[jax.Array, jax.Array]:
  """Resets codes used fewer than `threshold` times to random residuals.

  Args:
    codebook_kz: (K, Z) codebook of one level.
    usage_k: (K,) uses of each code over the last window.
    residuals_bz: (B, Z) current residuals of the batch at this level.
    key: PRNG key choosing the residuals.
    threshold: usage below which a code counts as dead.

  Returns:
    The new codebook and the () number of codes reset.
  """
  dead_k = usage_k < threshold
  pick_k = jax.random.randint(key, dead_k.shape, 0, residuals_bz.shape[0])
  new_kz = jnp.where(dead_k[:, None], residuals_bz[pick_k], codebook_kz)
  return new_kz, jnp.sum(dead_k)


def _loss(params, graphdef, x_bi, beta):
  """Total loss and aux (recon, quant, codes, per-level batch residuals)."""
  sg = jax.lax.stop_gradient
  model = nnx.merge(graphdef, params)
  z_bz = model.encoder(x_bi)
  codebooks = model.codebook_arrays()
  # Codes come from the shared greedy residual search; the losses below
  # re-gather the codewords so that gradients reach the codebooks.
  codes_bl, _, _ = residual.residual_encode(sg(codebooks), sg(z_bz))
  r_bz, zq_bz = z_bz, jnp.zeros_like(z_bz)
  codebook_loss, commit_loss, residuals = 0.0, 0.0, []
  for level, cb_kz in enumerate(codebooks):
    e_bz = cb_kz[codes_bl[:, level]]
    residuals.append(sg(r_bz))
    codebook_loss += jnp.mean(jnp.sum(jnp.square(sg(r_bz) - e_bz), axis=1))
    commit_loss += jnp.mean(jnp.sum(jnp.square(r_bz - sg(e_bz)), axis=1))
    zq_bz = zq_bz + e_bz
    r_bz = r_bz - sg(e_bz)
  zq_st_bz = z_bz + sg(zq_bz - z_bz)  # Straight-through estimator.
  x_hat_bi = model.decoder(zq_st_bz)
  recon = jnp.mean(jnp.sum(jnp.square(x_bi - x_hat_bi), axis=1))
  quant = codebook_loss + beta * commit_loss
  aux = {
      "recon": recon,
      "quant": quant,
      "codes": codes_bl,
      "residuals": tuple(residuals)
  }
  return recon + quant, aux


def make_train_step(graphdef, config: RQVAEConfig):
  """The jitted, donated train step.

  `train_step(state, x_bi, key, dead_code_threshold, dead_code_window) ->
  (state, metrics)`; the restart settings are traced scalars so that runs
  differing only in them (or in epochs/seed) share one compilation.
  Metrics: loss, recon, quant, per-level code counts of the batch and
  per-level numbers of codes restarted by this step.
  """
  return _cached_train_step(
      graphdef,
      dataclasses.replace(
          config,
          epochs=0,
          seed=0,
          dead_code_threshold=0.0,
          dead_code_window=0,
          kmeans_init_iters=0))


@functools.lru_cache(maxsize=8)
def _cached_train_step(graphdef, config: RQVAEConfig):
  sizes = config.codebook_sizes
  optimizer = make_optimizer(config)

  def train_step(state: TrainState, x_bi, key, dead_code_threshold,
                 dead_code_window):
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    (loss, aux), grads = grad_fn(state.params, graphdef, x_bi, config.beta)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    counts = tuple(
        jnp.bincount(aux["codes"][:, l], length=k) for l, k in enumerate(sizes))
    usage = tuple(u + c for u, c in zip(state.usage, counts))
    step = state.step + 1
    check = (dead_code_threshold > 0) & (step % dead_code_window == 0)
    model = nnx.merge(graphdef, params)
    restarted = []
    for level in range(len(sizes)):
      new_kz, num_dead = restart_dead_codes(model.codebooks[level][...],
                                            usage[level],
                                            aux["residuals"][level],
                                            jax.random.fold_in(key, level),
                                            dead_code_threshold)
      model.codebooks[level][...] = jnp.where(check, new_kz,
                                              model.codebooks[level][...])
      restarted.append(jnp.where(check, num_dead, 0))
    params = nnx.state(model, nnx.Param)
    usage = tuple(jnp.where(check, jnp.zeros_like(u), u) for u in usage)
    metrics = {
        "loss": loss,
        "recon": aux["recon"],
        "quant": aux["quant"],
        "counts": counts,
        "restarted": tuple(restarted),
    }
    return TrainState(params, opt_state, usage, step), metrics

  return jax.jit(train_step, donate_argnums=(0,))


def _usage_stats(counts_k: np.ndarray) -> tuple[float, float]:
  """(utilisation, perplexity) of code counts: fraction of codes used and
  exp of the entropy of the usage distribution."""
  total = counts_k.sum()
  if total == 0:
    return 0.0, 0.0
  p_k = counts_k / total
  nz = p_k[p_k > 0]
  return float((counts_k > 0).mean()), float(np.exp(-np.sum(nz * np.log(nz))))


def train(x_nd,
          config: RQVAEConfig,
          model: RQVAE | None = None,
          verbose: bool = False) -> tuple[RQVAE, list[dict[str, Any]]]:
  """Trains an RQ-VAE on item embeddings.

  Args:
    x_nd: (N, input_dim) item embeddings.
    config: hyper-parameters.
    model: start from this model instead of `init(x_nd, config)` (which
      k-means-initialises the codebooks); it is not modified.
    verbose: print one line per epoch.

  Returns:
    The trained model and the history, one dict per epoch: epoch, loss,
    recon_loss, quant_loss (means over the epoch's steps), utilisation and
    perplexity (lists over levels, of the codes the epoch's batches hit),
    restarted (codes reset per level) and seconds.

  Raises:
    ValueError: bad input (see `check_input`).
    FloatingPointError: a non-finite loss.
  """
  x_nd = check_input(x_nd, config)
  if model is None:
    model = init(x_nd, config)
  n = x_nd.shape[0]
  batch_size = min(config.batch_size, n)
  steps_per_epoch = n // batch_size
  window = config.dead_code_window or steps_per_epoch
  optimizer = make_optimizer(config)
  graphdef, params = nnx.split(model, nnx.Param)
  # The step donates its state: copy so the caller's arrays stay alive.
  params = jax.tree.map(jnp.copy, params)
  state = TrainState(
      params=params,
      opt_state=optimizer.init(params),
      usage=tuple(jnp.zeros((k,), jnp.int32) for k in config.codebook_sizes),
      step=jnp.array(0, jnp.int32))
  train_step = make_train_step(graphdef, config)
  threshold = jnp.asarray(config.dead_code_threshold, jnp.float32)
  window = jnp.asarray(window, jnp.int32)
  x_dev = jnp.asarray(x_nd)
  rng = np.random.default_rng(config.seed + 1)
  key = jax.random.key(config.seed + 1)
  history = []
  for epoch in range(config.epochs):
    start = time.perf_counter()
    order = rng.permutation(n)[:steps_per_epoch * batch_size]
    order = jnp.asarray(order.reshape(steps_per_epoch, batch_size))
    step_metrics = []
    for s in range(steps_per_epoch):
      step_key = jax.random.fold_in(key, epoch * steps_per_epoch + s)
      state, metrics = train_step(state, x_dev[order[s]], step_key, threshold,
                                  window)
      step_metrics.append(metrics)
    host = jax.device_get(step_metrics)
    loss = float(np.mean([m["loss"] for m in host]))
    if not np.isfinite(loss):
      raise FloatingPointError(
          f"RQ-VAE loss became non-finite ({loss}) in epoch {epoch}; lower "
          f"the learning rate ({config.lr}) or check the inputs.")
    usage = [
        _usage_stats(np.sum([m["counts"][l]
                             for m in host], axis=0))
        for l in range(len(config.codebook_sizes))
    ]
    row = {
        "epoch": epoch,
        "loss": loss,
        "recon_loss": float(np.mean([m["recon"] for m in host])),
        "quant_loss": float(np.mean([m["quant"] for m in host])),
        "utilisation": [u for u, _ in usage],
        "perplexity": [p for _, p in usage],
        "restarted": [
            int(np.sum([m["restarted"][l]
                        for m in host]))
            for l in range(len(config.codebook_sizes))
        ],
        "seconds": time.perf_counter() - start,
    }
    history.append(row)
    if verbose:
      print(f"rq_vae epoch {epoch}: " +
            ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in row.items()))
  return nnx.merge(graphdef, state.params), history


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_batch(graphdef, params, x_bi):
  codes_bl, _, zq_bz = nnx.merge(graphdef, params).quantize(x_bi)
  return codes_bl, zq_bz


@functools.partial(jax.jit, static_argnums=(0,))
def _reconstruct_batch(graphdef, params, x_bi):
  model = nnx.merge(graphdef, params)
  _, _, zq_bz = model.quantize(x_bi)
  return model.decoder(zq_bz)


def _batched(fn, model: RQVAE, x_nd, batch_size: int) -> list:
  x_nd = check_input(x_nd)
  if x_nd.shape[1] != model.config.input_dim:
    raise ValueError(f"x_nd has dim {x_nd.shape[1]} but the model's "
                     f"input_dim is {model.config.input_dim}.")
  graphdef, params = nnx.split(model, nnx.Param)
  return [
      fn(graphdef, params, jnp.asarray(x_nd[i:i + batch_size]))
      for i in range(0, x_nd.shape[0], batch_size)
  ]


def encode(model: RQVAE, x_nd, batch_size: int = 16384) -> jax.Array:
  """(N, L) int32 semantic-ID codes of the items."""
  outs = _batched(_encode_batch, model, x_nd, batch_size)
  return jnp.concatenate([codes for codes, _ in outs], axis=0)


def reconstruct(model: RQVAE, x_nd, batch_size: int = 16384) -> jax.Array:
  """(N, input_dim) decoder output from the quantised latents."""
  return jnp.concatenate(
      _batched(_reconstruct_batch, model, x_nd, batch_size), axis=0)

"""The optimizer of every trainer (SASRec, SFT, RL), built from its config.

AdamW with warmup and decay, gradient clipping, and optionally frozen
parameters (a pretrained model fine-tuned with its lower layers fixed):
`config.train.freeze_layers` = n freezes decoder blocks 0..n-1, and
`config.train.freeze` holds regular expressions matched against each
parameter's path ("blocks/3/attn/w_q", "embed", "final_norm/scale"), and
`config.train.train_only` the opposite: only the parameters it matches
train (LoRA: `("lora_", "^embed")`, the low-rank updates and the grown
embedding with its SID rows). Frozen
parameters get a zero update and keep no optimizer moments
(`optax.multi_transform`), so they cost no optimizer memory, and XLA drops
the products that would form their weight gradients (`set_to_zero` discards
them); the backward pass still runs through a frozen layer when a trained
parameter lies below it (the embedding, the LoRA updates).

The vocabulary rows a pretrained model did not have (the markers and SID
tokens of a `PretrainedVocab`) can train at their own learning rate:
`config.train.new_rows_lr_scale` multiplies the update of embedding rows
(and untied head columns) from `new_rows_from` on (`scale_rows`), after
AdamW, so it is exactly lr x scale for those rows (weight decay included).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

FROZEN, TRAINED = "frozen", "trained"


def param_path(path: Sequence[Any]) -> str:
  """"blocks/3/attn/w_q" for a pytree key path."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  if len(parts) > 1 and parts[-1] == "value":  # an nnx.Variable's array
    parts.pop()
  return "/".join(parts)


def _regexes(config: ml_collections.ConfigDict, field: str) -> tuple[str, ...]:
  """`config.train.<field>`, each checked to be a regular expression."""
  own = tuple(config.train.get(field, ()) or ())
  for p in own:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"train.{field}: {p!r} is not a regular "
                       f"expression ({e}).") from None
  return own


def frozen_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The regular expressions of the frozen parameters' paths."""
  layers = int(config.train.get("freeze_layers", 0) or 0)
  if layers < 0:
    raise ValueError(f"train.freeze_layers must be >= 0, got {layers}.")
  return _regexes(config, "freeze") + tuple(
      rf"blocks/{i}/" for i in range(layers))


def trained_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`config.train.train_only`: when set, the only parameters that train."""
  return _regexes(config, "train_only")


def labels(params: Any, patterns: Sequence[str],
           train_only: Sequence[str] = ()) -> Any:
  """FROZEN or TRAINED for every leaf of `params` (by `param_path`): frozen
  if a `patterns` entry matches, or `train_only` is set and none of it
  does.

  Raises:
    ValueError: a pattern that matches no parameter (a typo, or more frozen
      layers than the model has), naming it and some of the paths.
  """
  compiled = [re.compile(p) for p in patterns]
  kept = [re.compile(p) for p in train_only]
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [param_path(path) + "/" for path, _ in leaves]
  unused = [p for p, c in zip(list(patterns) + list(train_only),
                              compiled + kept)
            if not any(c.search(x) for x in names)]
  if unused:
    raise ValueError(f"train.freeze / freeze_layers / train_only: {unused} "
                     f"match no parameter; paths look like {names[:3]}.")

  def label(name):
    frozen = any(c.search(name) for c in compiled) or (
        kept and not any(c.search(name) for c in kept))
    return FROZEN if frozen else TRAINED

  return jax.tree_util.tree_unflatten(treedef, [label(n) for n in names])


# The vocabulary-sized parameters and the axis of their vocabulary rows.
VOCAB_AXES = {"embed": 0, "lm_head": 1}


def scale_rows(start: int, scale: float) -> optax.GradientTransformation:
  """Multiplies the updates of vocabulary ids >= `start` by `scale`: rows of
  `embed` (V, H) and columns of an untied `lm_head` (H, V); every other
  update passes unchanged. Stateless."""

  def update_fn(updates, state, params=None):
    del params

    def one(path, u):
      axis = VOCAB_AXES.get(param_path(path))
      if axis is None:
        return u
      ids = jax.lax.broadcasted_iota(jnp.int32, u.shape, axis)
      return jnp.where(ids >= start, u * scale, u)

    return jax.tree_util.tree_map_with_path(one, updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def new_rows_scale(config: ml_collections.ConfigDict) -> float:
  """`config.train.new_rows_lr_scale` (1.0 when absent), checked > 0."""
  scale = float(config.train.get("new_rows_lr_scale", 1.0))
  if not scale > 0:
    raise ValueError(f"train.new_rows_lr_scale must be > 0, got {scale}.")
  return scale


def from_config(config: ml_collections.ConfigDict,
                total_steps: int,
                new_rows_from: int | None = None
               ) -> optax.GradientTransformation:
  """AdamW with linear warmup and constant or cosine decay, grad clipping.

  Reads config.train: lr, warmup_steps, schedule ("cosine" | "constant"),
  grad_clip (0: none), b1, b2, weight_decay, and optionally freeze_layers,
  freeze, train_only and new_rows_lr_scale (module docstring; the scale
  applies from vocabulary id `new_rows_from`, and is an error without
  one). `total_steps` is the number of updates the schedule spans.
  """
  t = config.train
  warmup = min(t.warmup_steps, max(total_steps - 1, 0))
  if t.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, t.lr, max(warmup, 1),
                                            max(total_steps, warmup + 1))
  elif t.schedule == "constant":
    lr = optax.join_schedules([
        optax.linear_schedule(0.0, t.lr, max(warmup, 1)),
        optax.constant_schedule(t.lr)
    ], [max(warmup, 1)])
  else:
    raise ValueError(f"config.train.schedule must be 'cosine' or 'constant', "
                     f"got {t.schedule!r}.")
  chain = []
  if t.grad_clip:
    chain.append(optax.clip_by_global_norm(t.grad_clip))
  chain.append(optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay))
  scale = new_rows_scale(config)
  if scale != 1.0:
    if new_rows_from is None:
      raise ValueError(f"train.new_rows_lr_scale={scale} needs a pretrained "
                       "vocabulary (model.pretrained): every row is new "
                       "otherwise.")
    chain.append(scale_rows(new_rows_from, scale))
  tx = optax.chain(*chain)
  patterns, train_only = frozen_patterns(config), trained_patterns(config)
  if not patterns and not train_only:
    return tx
  # Clipping sees the trained parameters' gradients only.
  return optax.multi_transform({
      TRAINED: tx,
      FROZEN: optax.set_to_zero()
  }, lambda params: labels(params, patterns, train_only))

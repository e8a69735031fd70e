"""The optimizer of every trainer (SASRec, SFT, RL), built from its config."""

from __future__ import annotations

import ml_collections
import optax


def from_config(config: ml_collections.ConfigDict,
                total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup and constant or cosine decay, grad clipping.

  Reads config.train: lr, warmup_steps, schedule ("cosine" | "constant"),
  grad_clip (0: none), b1, b2, weight_decay. `total_steps` is the number of
  updates the schedule spans.
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
  return optax.chain(*chain)

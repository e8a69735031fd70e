"""Settings checked before any work: the key, the value, what is allowed.

Every stage has a `check_settings(config)` that runs before it writes
config.json or loads anything, and the pipeline runs all of them before its
first stage (`taiji_jax.pipeline.check_settings`), so a typo in the last
stage costs nothing. A failed check is a `ConfigError` (a ValueError); the
absl entry points print it as one line (`--debug` shows the traceback).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

RANKING_METRICS = ("recall", "ndcg", "mrr")


class ConfigError(ValueError):
  """A setting is not allowed; the message names the key and the value."""


def get(config, key: str) -> Any:
  """The value at a dotted key."""
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _name(prefix: str, key: str) -> str:
  return f"{prefix}.{key}" if prefix else key


def positive(config, keys: Iterable[str], prefix: str = "",
             allow_zero: Sequence[str] = ()) -> None:
  """Each key holds a number > 0 (>= 0 for those in `allow_zero`)."""
  for key in keys:
    value = get(config, key)
    ok_zero = key in allow_zero
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or
        value < 0 or (value == 0 and not ok_zero)):
      want = ">= 0" if ok_zero else "> 0"
      raise ConfigError(f"{_name(prefix, key)}={value!r}: must be a number "
                        f"{want}.")


def in_range(config, key: str, lo: float, hi: float, prefix: str = "") -> None:
  """lo <= value <= hi."""
  value = get(config, key)
  if not isinstance(value, (int, float)) or not lo <= value <= hi:
    raise ConfigError(f"{_name(prefix, key)}={value!r}: must be in "
                      f"[{lo}, {hi}].")


def one_of(config, key: str, allowed: Iterable[Any], prefix: str = "") -> None:
  value = get(config, key)
  allowed = list(allowed)
  if value not in allowed:
    raise ConfigError(f"{_name(prefix, key)}={value!r}: must be one of "
                      f"{allowed}.")


def ranking_metric(config, key: str, ks: Sequence[int], prefix: str = "",
                   extra: Iterable[str] = ()) -> None:
  """`<recall|ndcg|mrr>@k` with k in `ks` (or one of `extra`)."""
  value = get(config, key)
  allowed = [f"{m}@{k}" for m in RANKING_METRICS for k in ks] + list(extra)
  if value not in allowed:
    raise ConfigError(f"{_name(prefix, key)}={value!r}: not a metric the "
                      f"evaluation reports; one of {allowed}.")


def training(config, prefix: str = "") -> None:
  """The fields every trainer shares: train.batch_size, lr, warm-up,
  clipping, Adam betas and the evaluation batch."""
  positive(config, ("train.batch_size", "train.lr", "eval.batch_size"),
           prefix)
  positive(config, ("train.warmup_steps", "train.weight_decay",
                    "train.grad_clip"), prefix,
           allow_zero=("train.warmup_steps", "train.weight_decay",
                       "train.grad_clip"))
  for b in ("train.b1", "train.b2"):
    in_range(config, b, 0.0, 0.999999, prefix)
  one_of(config, "train.schedule", ("constant", "cosine"), prefix)


def epoch_trainer(config, prefix: str = "",
                  sizes: Sequence[str] = ()) -> None:
  """`training` plus the epoch loop's fields (`taiji_jax.train.loop`),
  positive `sizes`, and an early-stopping metric the evaluation reports."""
  training(config, prefix)
  positive(config, ("train.num_epochs", "train.patience",
                    "train.checkpoint_every_epochs", "eval.every_epochs") +
           tuple(sizes), prefix)
  ranking_metric(config, "eval.early_stop_metric", tuple(config.eval.ks),
                 prefix)

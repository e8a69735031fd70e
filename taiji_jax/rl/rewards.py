"""Rewards of the RL stage: pure batched functions, registered by name.

A reward maps a batch of answers (`RewardInputs`: the recommended item of
each rollout, the user's ground-truth next item, history and format flags)
to one float per rollout. Each is built by a factory from the shared,
array-valued `tables` (passed to the jitted rollout as an argument, not
baked into the graph):

  semantic    cosine of the text-encoder embeddings of the answer item and
              the ground-truth item (Taiji's Qwen3-Emb cosine; here the
              all-MiniLM-L6-v2 item embeddings of the sids stage);
  preference  the SASRec score of the answer for that user, min-max
              normalised over the items the user has not seen (1 = SASRec's
              favourite, 0 = its least liked; Taiji's normalised CTCVR
              lookup, with our collaborative model as the simulator);
  hit         the target is among the rollout's beam after its reasoning
              (OneRec-Think's Rollout-Beam reward), or is the sampled item
              when the rollout has no beam;
  format      the answer kept the format by itself: a rationale closed by
              the model within its budget (reasoning rollouts) and a real
              item.

A rollout without an answer (item 0) gets 0 from every reward. Rewards are
never trusted to be finite: the trainer masks rows with a non-finite reward
(`finite_rows`) and logs `reward_stats`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from taiji_jax import registry
from taiji_jax.models import sasrec as sasrec_lib


class RewardInputs(NamedTuple):
  """What a reward sees of N rollouts.

  Attributes:
    items: (N,) int32 the answer item, 0 = no answer.
    targets: (N,) int32 the user's ground-truth next item.
    seen: (N, H) int32 items the user interacted with before, 0-padded.
    pref_histories: (N, L) int32 right-aligned history of the preference
      model (SASRec's input).
    format_ok: (N,) bool the rationale was closed by the model itself (all
      True for rollouts without reasoning).
    beam_items: (N, W) int32 items of the beam after the reasoning, W = 0
      when the rollout has no beam.
  """
  items: jax.Array
  targets: jax.Array
  seen: jax.Array
  pref_histories: jax.Array
  format_ok: jax.Array
  beam_items: jax.Array


RewardFn = Callable[[Any, RewardInputs], jax.Array]  # (tables, inputs) -> (N,)
# name -> factory(sasrec_graphdef=...) -> RewardFn.
REWARDS = registry.Registry("reward")
register = REWARDS.register


def _answered(inputs: RewardInputs, value: jax.Array) -> jax.Array:
  return jnp.where(inputs.items > 0, value, 0.0).astype(jnp.float32)


@register("semantic")
def semantic(sasrec_graphdef=None):
  """cos(e[item], e[target]) of L2-normalised item embeddings."""
  del sasrec_graphdef

  def fn(tables, inputs):
    emb_vd = tables["item_embeddings"]
    cos = jnp.sum(emb_vd[inputs.items] * emb_vd[inputs.targets], axis=-1)
    return _answered(inputs, cos)

  return fn


def candidate_mask(num_rows: int, num_items: int,
                   seen_nh: jax.Array) -> jax.Array:
  """(N, I + 1) bool: real items (column 0 is padding) not in `seen_nh`."""
  mask = jnp.ones((num_rows, num_items + 1), bool).at[:, 0].set(False)
  rows = jnp.broadcast_to(jnp.arange(num_rows)[:, None], seen_nh.shape)
  return mask.at[rows, seen_nh].set(False)


def minmax_scores(scores_nv: jax.Array, mask_nv: jax.Array,
                  items_n: jax.Array) -> jax.Array:
  """(N,) score of `items_n` min-max normalised over the masked-in items."""
  lo = jnp.min(jnp.where(mask_nv, scores_nv, jnp.inf), axis=-1)
  hi = jnp.max(jnp.where(mask_nv, scores_nv, -jnp.inf), axis=-1)
  s = jnp.take_along_axis(scores_nv, items_n[:, None], axis=1)[:, 0]
  return jnp.clip((s - lo) / jnp.maximum(hi - lo, 1e-6), 0.0, 1.0)


@register("preference")
def preference(sasrec_graphdef=None):
  """SASRec's score of the answer, min-max over the user's unseen items."""
  if sasrec_graphdef is None:
    raise ValueError("the preference reward needs a SASRec model (set "
                     "config.sasrec_workdir).")

  def fn(tables, inputs):
    model = nnx.merge(sasrec_graphdef, tables["sasrec_params"])
    scores_nv = sasrec_lib.score(model, inputs.pref_histories)
    mask_nv = candidate_mask(scores_nv.shape[0], scores_nv.shape[1] - 1,
                             inputs.seen)
    return _answered(inputs, minmax_scores(scores_nv, mask_nv, inputs.items))

  return fn


@register("hit")
def hit(sasrec_graphdef=None):
  """1 if the target is in the rollout's beam (or is its sampled item)."""
  del sasrec_graphdef

  def fn(tables, inputs):
    del tables
    if inputs.beam_items.shape[1]:
      found = jnp.any(inputs.beam_items == inputs.targets[:, None], axis=1)
    else:
      found = inputs.items == inputs.targets
    return _answered(inputs, found.astype(jnp.float32))

  return fn


@register("format")
def format_reward(sasrec_graphdef=None):
  """1 if the model closed its rationale itself and answered an item."""
  del sasrec_graphdef

  def fn(tables, inputs):
    del tables
    return _answered(inputs, inputs.format_ok.astype(jnp.float32))

  return fn


def check_names(names: Sequence[str]) -> list[str]:
  """The names as a list, if they are known, distinct and not empty.

  Raises:
    ValueError: naming the unknown or repeated ones.
  """
  names = list(names)
  unknown = [n for n in names if n not in REWARDS]
  if unknown or len(set(names)) != len(names) or not names:
    raise ValueError(f"rewards {names}: unknown {unknown} or repeated or "
                     f"empty; known: {REWARDS.names()}.")
  return names


def make_reward_fn(names: Sequence[str], sasrec_graphdef=None):
  """`fn(tables, inputs) -> (N, K)` of the named rewards, in that order.

  Raises:
    ValueError: an unknown or repeated name.
  """
  names = check_names(names)
  fns = [REWARDS.get(n)(sasrec_graphdef=sasrec_graphdef) for n in names]

  def fn(tables, inputs):
    return jnp.stack([f(tables, inputs) for f in fns], axis=-1)

  return fn


def finite_rows(rewards_nk: jax.Array) -> jax.Array:
  """(N,) bool: every reward of the rollout is finite."""
  return jnp.all(jnp.isfinite(rewards_nk), axis=-1)


def reward_stats(rewards_nk: jax.Array,
                 names: Sequence[str],
                 prefix: str = "reward") -> dict[str, jax.Array]:
  """Mean / std / min / max over the finite values, and the non-finite
  fraction, of each reward: `{prefix}/{name}/{stat}`."""
  out = {}
  for k, name in enumerate(names):
    r = rewards_nk[:, k]
    ok = jnp.isfinite(r)
    n = jnp.maximum(ok.sum(), 1)
    safe = jnp.where(ok, r, 0.0)
    mean = safe.sum() / n
    var = jnp.where(ok, (safe - mean)**2, 0.0).sum() / n
    out[f"{prefix}/{name}/mean"] = mean
    out[f"{prefix}/{name}/std"] = jnp.sqrt(var)
    out[f"{prefix}/{name}/min"] = jnp.min(jnp.where(ok, r, jnp.inf))
    out[f"{prefix}/{name}/max"] = jnp.max(jnp.where(ok, r, -jnp.inf))
    out[f"{prefix}/{name}/nonfinite"] = 1.0 - ok.mean()
  return out

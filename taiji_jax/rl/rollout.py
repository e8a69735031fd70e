"""RL rollouts: G constrained samples per prompt, with their log-probs.

`make_rollout_fn(...)` returns the pure `rollout(params, ref_params, tables,
batch, key) -> (Rollout, rewards (N, K))` that the trainer jits. For each of
the B prompts it draws G = `group_size` answers from the current policy:

- without reasoning: a trie-constrained temperature sample of the SID
  (`constrained.sample`);
- with reasoning (`think=True`): `<think>`, a sampled rationale of at most
  `max_think` text tokens (`think.reason`), `</think><answer>`, then the
  constrained SID sample from there (and, for the `hit` reward, a
  constrained beam of `hit_beams` items from the same point).

Rows of a group are adjacent (row n is prompt n // G). The rollout keeps the
full token sequence `[prompt; completion]` and recomputes the per-token
log-probs of the completion under the behaviour policy (the parameters that
sampled it) and the reference policy in one teacher-forced forward each, with
`completion_logprobs` — the same function the loss differentiates, so the
first update's ratio is exactly 1.

Log-probs are those of the distribution actually sampled from: softmax of
logits / temperature renormalised over the allowed tokens (the rationale
vocabulary for rationale tokens, the trie's allowed children for each SID
level, history items removed). `renormalise=False` scores under the full
softmax instead (what TRL-based peers do when a logits processor constrains
generation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from taiji_jax.generate import constrained
from taiji_jax.generate import recommend
from taiji_jax.generate import think as think_lib
from taiji_jax.rl import objectives as obj_lib
from taiji_jax.rl import rewards as rewards_lib

NEG_INF = constrained.NEG_INF


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Static settings of the rollouts.

  Attributes:
    group_size: G answers per prompt.
    temperature: sampling temperature (> 0) of rationale and SID.
    think: reason before answering.
    max_think: rationale budget in tokens.
    hit_beams: width of the beam after the reasoning for the `hit` reward
      (0: none; `hit` then checks the sampled item).
    renormalise: log-probs over the allowed tokens (module docstring).
    keep_hidden: keep the behaviour policy's final hidden states of the
      completion (`Rollout.hidden`, for MGDA-UB weighting).
  """
  group_size: int = 8
  temperature: float = 1.0
  think: bool = False
  max_think: int = 32
  hit_beams: int = 0
  renormalise: bool = True
  keep_hidden: bool = False

  def __post_init__(self):
    if self.group_size < 2:
      raise ValueError(f"rollout group_size must be >= 2 (advantages are "
                       f"relative to the group), got {self.group_size}.")
    if not self.temperature > 0:
      raise ValueError(f"rollout temperature must be > 0, got "
                       f"{self.temperature}.")
    if self.think and self.max_think < 1:
      raise ValueError(f"rollout max_think must be >= 1, got "
                       f"{self.max_think}.")


class Rollout(NamedTuple):
  """N = B * G rollouts; C completion tokens after T prompt tokens.

  Attributes:
    tokens: (N, T + C) int32 prompt (left-padded) then completion.
    attention: (N, T + C) bool real tokens (masked slots are never attended
      and do not advance positions, as during generation).
    loss_mask: (N, C) float32 1 on the sampled completion tokens (forced
      markers and padding are 0).
    think_mask: (N, C) bool rationale positions.
    sid_masks: per SID level, (N, K_l) bool allowed codes.
    old_logp: (N, C) float32 behaviour log-probs of the completion tokens.
    ref_logp: (N, C) float32 reference log-probs.
    items: (N,) int32 answers (0: none).
    closed: (N,) bool the rationale was closed by the model (True without
      reasoning).
    think_length: (N,) int32 rationale tokens (0 without reasoning).
    targets, users: (N,) int32 of the prompt; seen (N, H); pref_histories
      (N, L).
    hidden: (N, C, D) the behaviour policy's final hidden states that
      predict the completion tokens (`RolloutConfig.keep_hidden`; else
      None).
  """
  tokens: jax.Array
  attention: jax.Array
  loss_mask: jax.Array
  think_mask: jax.Array
  sid_masks: tuple
  old_logp: jax.Array
  ref_logp: jax.Array
  items: jax.Array
  closed: jax.Array
  think_length: jax.Array
  targets: jax.Array
  users: jax.Array
  seen: jax.Array
  pref_histories: jax.Array
  hidden: jax.Array | None = None


def _masked_logp(logits_nv, target_n, mask_nv):
  """(log-prob of target, entropy) of softmax(logits) restricted to mask."""
  masked = jnp.where(mask_nv, logits_nv, NEG_INF)
  lse_n = jax.nn.logsumexp(masked, axis=-1)
  any_n = mask_nv.any(-1)
  logp_nv = jnp.where(mask_nv, masked - lse_n[:, None], 0.0)
  p_nv = jnp.where(mask_nv, jnp.exp(logp_nv), 0.0)
  entropy_n = -jnp.sum(p_nv * logp_nv, axis=-1)
  logp_n = jnp.take_along_axis(logp_nv, target_n[:, None], axis=1)[:, 0]
  return jnp.where(any_n, logp_n, 0.0), jnp.where(any_n, entropy_n, 0.0)


def completion_hidden(model,
                      tokens_ns: jax.Array,
                      attention_ns: jax.Array,
                      num_completion: int,
                      dropout_rng: jax.Array | None = None) -> jax.Array:
  """(N, C, D) final hidden states that predict the C completion tokens."""
  h_nsd = model.hidden(
      tokens_ns[:, :-1],
      attention_mask_bt=attention_ns[:, :-1],
      dropout_rng=dropout_rng)
  return h_nsd[:, -num_completion:]


def logprobs_from_hidden(model,
                         h_ncd: jax.Array,
                         tokens_ns: jax.Array,
                         think_mask_nc: jax.Array,
                         sid_masks: Sequence[jax.Array],
                         allowed_v: jax.Array | None,
                         level_offsets: Sequence[int],
                         temperature: float = 1.0,
                         renormalise: bool = True):
  """((N, C) log-probs, (N, C) entropies) of the completion tokens from the
  hidden states that predict them (`completion_logprobs`; the LM head and
  the masked softmax only, which is all MGDA-UB differentiates)."""
  n, c = think_mask_nc.shape
  levels = len(sid_masks)
  logits_ncv = model.logits_from_hidden(h_ncd) / temperature
  target_nc = tokens_ns[:, -c:]
  v = logits_ncv.shape[-1]
  text = c - levels
  logps, ents = [], []
  if text:
    full_v = jnp.ones((v,), bool)
    allowed = full_v if allowed_v is None or not renormalise else allowed_v
    mask_ntv = jnp.where(think_mask_nc[:, :text, None], allowed[None, None],
                         full_v[None, None])
    lp, en = jax.vmap(_masked_logp, in_axes=1, out_axes=1)(
        logits_ncv[:, :text], target_nc[:, :text], mask_ntv)
    logps.append(lp)
    ents.append(en)
  for l, mask_nk in enumerate(sid_masks):
    pos = text + l
    if renormalise:
      k = mask_nk.shape[1]
      logits_nk = jax.lax.dynamic_slice_in_dim(logits_ncv[:, pos],
                                               level_offsets[l], k, axis=1)
      code_n = jnp.clip(target_nc[:, pos] - level_offsets[l], 0, k - 1)
      lp, en = _masked_logp(logits_nk, code_n, mask_nk)
    else:
      lp, en = _masked_logp(logits_ncv[:, pos], target_nc[:, pos],
                            jnp.ones((n, v), bool))
    logps.append(lp[:, None])
    ents.append(en[:, None])
  return jnp.concatenate(logps, 1), jnp.concatenate(ents, 1)


def completion_logprobs(model,
                        tokens_ns: jax.Array,
                        attention_ns: jax.Array,
                        think_mask_nc: jax.Array,
                        sid_masks: Sequence[jax.Array],
                        allowed_v: jax.Array | None,
                        level_offsets: Sequence[int],
                        temperature: float = 1.0,
                        renormalise: bool = True,
                        dropout_rng: jax.Array | None = None,
                        return_hidden: bool = False):
  """Teacher-forced log-probs and entropies of the completion tokens.

  The completion is the last C = `think_mask_nc.shape[1]` tokens, its last
  L = len(sid_masks) tokens the SID. Returns ((N, C) log-probs, (N, C)
  entropies) of the sampling distribution (module docstring), and with
  `return_hidden` also the (N, C, D) hidden states they come from; entries
  at forced tokens are those of the full softmax and should be masked out.
  """
  h_ncd = completion_hidden(model, tokens_ns, attention_ns,
                            think_mask_nc.shape[1], dropout_rng)
  logp, entropy = logprobs_from_hidden(model, h_ncd, tokens_ns,
                                       think_mask_nc, sid_masks, allowed_v,
                                       level_offsets, temperature,
                                       renormalise)
  if return_hidden:
    return logp, entropy, h_ncd
  return logp, entropy


def make_rollout_fn(graphdef,
                    cfg: RolloutConfig,
                    trie,
                    paths,
                    level_offsets: Sequence[int],
                    reward_fn,
                    *,
                    pad_id: int,
                    markers: dict[str, int] | None = None,
                    allowed_v: jax.Array | None = None):
  """`rollout(params, ref_params, tables, batch, key)`, pure, not jitted.

  Args:
    graphdef: the decoder's graphdef (`nnx.split`).
    cfg: `RolloutConfig`.
    trie, paths: `SemanticIds.trie` / `.paths`.
    level_offsets: `Vocab.level_offsets`.
    reward_fn: `rewards.make_reward_fn(...)`.
    pad_id: padding id of the prompts.
    markers: {"think_id", "think_end_id", "answer_id"} (reasoning only).
    allowed_v: (V,) bool rationale tokens (`think.think_token_mask`).

  The batch is {"prompts" (B, T), "seen" (B, H), "targets" (B,), "users"
  (B,), "pref_histories" (B, L)}.
  """
  offsets = tuple(int(o) for o in level_offsets)
  levels = len(trie)
  g = cfg.group_size
  if cfg.think and (markers is None or allowed_v is None):
    raise ValueError("reasoning rollouts need the marker ids and allowed_v.")

  def logprobs(params, roll_tokens, attention, think_mask, sid_masks,
               hidden=False):
    model = nnx.merge(graphdef, params)
    out = completion_logprobs(model, roll_tokens, attention, think_mask,
                              sid_masks, allowed_v, offsets, cfg.temperature,
                              cfg.renormalise, return_hidden=hidden)
    logp = jax.lax.stop_gradient(out[0])
    return (logp, jax.lax.stop_gradient(out[2])) if hidden else (logp, None)

  def rollout(params, ref_params, tables, batch, key):
    model = nnx.merge(graphdef, params)
    rep = lambda x: jnp.repeat(x, g, axis=0)
    prompts = rep(batch["prompts"])
    seen = rep(batch["seen"])
    n = prompts.shape[0]
    think_key, sample_key = jax.random.split(key)
    if cfg.think:
      thought, first_nv, cache = think_lib.reason(
          model,
          prompts,
          **markers,
          allowed_v=allowed_v,
          max_think=cfg.max_think,
          extra=levels,
          key=think_key,
          temperature=cfg.temperature,
          pad_id=pad_id)
    else:
      first_nv, cache = recommend.prefill(model, prompts, pad_id, levels)
      thought = None
    beam_items = jnp.zeros((n, 0), jnp.int32)
    if cfg.hit_beams:
      beam_items = constrained.beam_search(
          model.decode_next,
          first_nv,
          cache,
          trie,
          offsets,
          cfg.hit_beams,
          exclude_bh=seen,
          paths=paths).items
    decoded = constrained.sample(
        model.decode_next,
        first_nv,
        cache,
        trie,
        offsets,
        sample_key,
        temperature=cfg.temperature,
        exclude_bh=seen,
        paths=paths)
    items = decoded.items[:, 0]
    codes_nl = decoded.codes[:, 0]
    sid_tokens = (codes_nl + jnp.asarray(offsets)[None]).astype(jnp.int32)
    answered = items > 0
    sid_masks = constrained.allowed_masks(trie, codes_nl, seen, paths)
    if cfg.think:
      m = cfg.max_think
      fed_n = thought.length + thought.closed.astype(jnp.int32)
      live_nm = jnp.arange(m)[None] < fed_n[:, None]
      tail_n2, tail_mask_n2 = think_lib.answer_opening(
          thought.closed, markers["think_end_id"], markers["answer_id"],
          pad_id)
      think_prompt = jnp.concatenate(
          [prompts,
           jnp.full((n, 1), markers["think_id"], prompts.dtype)], 1)
      tokens = jnp.concatenate(
          [think_prompt, thought.tokens, tail_n2, sid_tokens], 1)
      attention = jnp.concatenate([
          think_prompt != pad_id, live_nm, tail_mask_n2,
          jnp.ones((n, levels), bool)
      ], 1)
      loss_mask = jnp.concatenate([
          live_nm,
          jnp.zeros((n, 2), bool),
          jnp.broadcast_to(answered[:, None], (n, levels))
      ], 1)
      think_mask = jnp.concatenate(
          [jnp.ones((n, m), bool),
           jnp.zeros((n, 2 + levels), bool)], 1)
      closed, length = thought.closed, thought.length
    else:
      tokens = jnp.concatenate([prompts, sid_tokens], 1)
      attention = jnp.concatenate(
          [prompts != pad_id, jnp.ones((n, levels), bool)], 1)
      loss_mask = jnp.broadcast_to(answered[:, None], (n, levels))
      think_mask = jnp.zeros((n, levels), bool)
      closed = jnp.ones((n,), bool)
      length = jnp.zeros((n,), jnp.int32)
    old_logp, hidden = logprobs(params, tokens, attention, think_mask,
                                sid_masks, cfg.keep_hidden)
    ref_logp, _ = logprobs(ref_params, tokens, attention, think_mask,
                           sid_masks)
    roll = Rollout(
        tokens=tokens,
        attention=attention,
        loss_mask=loss_mask.astype(jnp.float32),
        think_mask=think_mask,
        sid_masks=sid_masks,
        old_logp=old_logp,
        ref_logp=ref_logp,
        items=items,
        closed=closed,
        think_length=length,
        targets=rep(batch["targets"]),
        users=rep(batch["users"]),
        seen=seen,
        pref_histories=rep(batch["pref_histories"]),
        hidden=hidden)
    inputs = rewards_lib.RewardInputs(
        items=items,
        targets=roll.targets,
        seen=seen,
        pref_histories=roll.pref_histories,
        format_ok=closed,
        beam_items=beam_items)
    return roll, reward_fn(tables, inputs)

  return rollout


def policy_logprobs(graphdef, cfg: RolloutConfig, level_offsets,
                    allowed_v: jax.Array | None = None):
  """`fn(params, roll, dropout_rng=None) -> (logp (N, C), entropy (N, C))`
  of the current parameters on a `Rollout` (what the loss differentiates)."""
  offsets = tuple(int(o) for o in level_offsets)

  def fn(params, roll: Rollout, dropout_rng=None) -> tuple[Any, Any]:
    model = nnx.merge(graphdef, params)
    return completion_logprobs(model, roll.tokens, roll.attention,
                               roll.think_mask, roll.sid_masks, allowed_v,
                               offsets, cfg.temperature, cfg.renormalise,
                               dropout_rng)

  return fn


def policy_head(graphdef, cfg: RolloutConfig, level_offsets,
                allowed_v: jax.Array | None = None):
  """`fn(params, hidden (N, C, D), roll) -> logp (N, C)`: the log-probs of a
  `Rollout`'s completion from given final hidden states (MGDA-UB)."""
  offsets = tuple(int(o) for o in level_offsets)

  def fn(params, h_ncd, roll: Rollout):
    model = nnx.merge(graphdef, params)
    return logprobs_from_hidden(model, h_ncd, roll.tokens, roll.think_mask,
                                roll.sid_masks, allowed_v, offsets,
                                cfg.temperature, cfg.renormalise)[0]

  return fn


def policy_batch(roll: Rollout, logp: jax.Array, advantages: jax.Array,
                 rewards: jax.Array, valid: jax.Array,
                 group_size: int) -> obj_lib.PolicyBatch:
  """The objectives' view of (a slice of) a `Rollout` under log-probs
  `logp` of the current policy."""
  return obj_lib.PolicyBatch(
      logp=logp,
      old_logp=roll.old_logp,
      ref_logp=roll.ref_logp,
      mask=roll.loss_mask,
      advantages=advantages,
      rewards=rewards,
      valid=valid,
      group_size=group_size)

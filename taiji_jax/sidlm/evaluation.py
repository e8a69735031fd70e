"""The SFT evaluation step: rank by constrained beam search, plain or thinking.

`make_eval_step(config, graphdef, sids, vocab, dataset)` returns the pure
`eval_step(params, batch) -> {metric: (B,)}` that `full_ranking.evaluate`
averages over a split. The batch's "histories" are the prompts
(`sidlm.rows.prompt_rows`), "seen_items" the user's history (never returned)
and "targets" the held-out items.

- `config.eval.think = False`: the SID beam starts right after the prompt
  (the packed next-item rows' format).
- `config.eval.think = True`: think-then-recommend (`generate.think`): a
  rationale of at most `eval.max_think` tokens, greedy when
  `eval.think_temperature` is 0, else sampled (`eval.num_traces` traces,
  beams merged), then the beam after `</think><answer>`. Adds
  `think/closed` (the model closed its rationale within the budget),
  `think/length`, and with `eval.format_check` the unconstrained format
  compliance from the bare prompt (`format/think_open`, `format/think_closed`,
  `format/answer`, `format/compliant`; the SFT trainer runs it on the final
  test evaluation only).

Besides Recall/NDCG/MRR@k: `legal_items` (every returned item is a real,
unseen item) and the semantic metrics of `evaluate.semantic`.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from taiji_jax.evaluate import metrics as metrics_lib
from taiji_jax.evaluate import semantic
from taiji_jax.generate import recommend as recommend_lib
from taiji_jax.generate import think as think_lib


def semantic_tables(config: ml_collections.ConfigDict, dataset):
  """(label table or None, title ids or None) for the semantic metrics.

  Labels come from the item feature `config.eval.label_field` ("" or a
  dataset without it: none); titles from "title" when the dataset has it.
  """
  if dataset is None:
    return None, None
  labels = None
  field = config.eval.label_field
  if field:
    labels, _ = semantic.label_table(dataset, field)
  titles = None
  if "title" in dataset.item_features:
    titles = semantic.title_table(dataset)
  return labels, titles


def eval_beams(config: ml_collections.ConfigDict) -> int:
  """Beams of the evaluation's beam search: `eval.num_beams`, >= max(ks).

  The ranked list is the best max(ks) of the final beams; a wider beam
  searches more prefixes (fewer good items pruned at the first level).
  """
  k = max(config.eval.ks)
  beams = int(config.eval.num_beams) or k
  if beams < k:
    raise ValueError(f"config.eval.num_beams={beams} must be >= max(ks)={k} "
                     "(or 0 for max(ks)).")
  return beams


def think_settings(config: ml_collections.ConfigDict) -> dict:
  """The validated reasoning settings of `config.eval` (module docstring)."""
  ev = config.eval
  max_think = int(ev.max_think)
  traces = int(ev.num_traces)
  temperature = float(ev.think_temperature)
  if max_think < 1:
    raise ValueError(f"config.eval.max_think must be >= 1, got {max_think}.")
  if traces < 1 or temperature < 0:
    raise ValueError(f"config.eval.num_traces={traces} must be >= 1 and "
                     f"think_temperature={temperature} >= 0.")
  if traces > 1 and temperature == 0:
    raise ValueError("config.eval.num_traces > 1 needs think_temperature > "
                     "0: greedy traces are all the same.")
  return {
      "max_think": max_think,
      "num_traces": traces,
      "temperature": temperature,
  }


def make_eval_step(config: ml_collections.ConfigDict,
                   graphdef,
                   sids,
                   vocab,
                   dataset=None,
                   format_check: bool | None = None,
                   return_items: bool = False):
  """`eval_step(params, batch) -> {metric: (B,)}`, pure, not yet jitted.

  `format_check` overrides `config.eval.format_check` (thinking only);
  `return_items` makes it return (metrics, ranked items (B, max(ks))), for
  callers that add metrics of their own (the RL stage's rewards).
  """
  if format_check is None:
    format_check = bool(config.eval.format_check)
  ks = tuple(sorted(config.eval.ks))
  num_beams = eval_beams(config)
  labels_vl, title_ids_v = semantic_tables(config, dataset)
  trie, paths = sids.trie, sids.paths
  offsets = tuple(int(o) for o in vocab.level_offsets)
  pad_id = vocab.pad_id
  think = bool(config.eval.think)
  markers = dict(
      think_id=vocab.think_id,
      think_end_id=vocab.think_end_id,
      answer_id=vocab.answer_id)
  if think:
    settings = think_settings(config)
    allowed_v = jnp.asarray(
        think_lib.think_token_mask(vocab.text_mask(), vocab.think_end_id))
    # The free generation's budget: the rationale, 2 markers around it, the
    # answer marker, the SID and </answer>.
    free_budget = settings["max_think"] + 4 + len(trie)
  seed = int(config.seed)

  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)
    prompts, seen = batch["histories"], batch["seen_items"]
    out = {}
    if think:
      key = None
      if settings["temperature"] > 0:
        # Keyed by the batch's first user: the same users, the same traces.
        key = jax.random.fold_in(jax.random.key(seed), batch["users"][0])
      decoded = think_lib.think_then_recommend(
          model,
          prompts,
          trie,
          offsets,
          num_beams,
          **markers,
          allowed_v=allowed_v,
          max_think=settings["max_think"],
          key=key,
          temperature=settings["temperature"] or 1.0,
          num_traces=settings["num_traces"],
          pad_id=pad_id,
          exclude_bh=seen,
          paths=paths)
      thought = decoded.thought
      n = settings["num_traces"]
      out["think/closed"] = thought.closed.astype(jnp.float32).reshape(
          -1, n).mean(1)
      out["think/length"] = thought.length.astype(jnp.float32).reshape(
          -1, n).mean(1)
      if format_check:
        free = think_lib.free_generate(model, prompts, vocab.answer_end_id,
                                       free_budget, pad_id)
        checks = think_lib.format_check(
            free.tokens,
            trie,
            offsets,
            **markers,
            answer_end_id=vocab.answer_end_id,
            text_mask_v=vocab.text_mask())
        out.update({f"format/{k}": v for k, v in checks.items()})
    else:
      decoded = recommend_lib.recommend(
          model,
          prompts,
          trie,
          offsets,
          num_beams,
          pad_id=pad_id,
          exclude_bh=seen,
          paths=paths)
    items_bk = decoded.items[:, :max(ks)]
    out.update(metrics_lib.ranking_metrics(items_bk, batch["targets"], ks))
    seen_bks = items_bk[:, :, None] == seen[:, None, :]
    legal_bk = (items_bk > 0) & ~jnp.any(seen_bks & (seen[:, None, :] > 0),
                                         axis=-1)
    out["legal_items"] = jnp.all(legal_bk, axis=1).astype(jnp.float32)
    if labels_vl is not None:
      out.update(semantic.label_metrics(items_bk, batch["targets"], labels_vl))
    if title_ids_v is not None:
      out.update(
          semantic.title_hits(items_bk, batch["targets"], title_ids_v, ks))
    return (out, items_bk) if return_items else out

  return eval_step

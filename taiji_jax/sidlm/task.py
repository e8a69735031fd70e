"""The SID-LM task: what SFT, the reasoning study and RL share.

A decoder LM reads a user's prompt (profile, recent history as SID tokens,
optionally titles) and writes the next item's SID. This module holds the
task's pieces, with no stage behind them:

  vocabulary   `build_vocab` (sentencepiece pieces + specials + SID tokens)
  rows         `training_rows`: packed next-item rows (`sidlm.rows`) plus
               the item-text -> SID and SID -> title alignment rows
  batches      `epoch_plan` (length buckets, seeded per epoch) and
               `train_batches` (a grain pipeline over steps)
  the model    `model_config` (a preset with overrides), `build` (abstract
               init, sharded state, jitted train and evaluation steps)
  the step     `sft_loss`, `make_train_step` (the function the trainer, the
               benchmark and the memory check compile)
  evaluation   `eval_split` (prompts of a split part), `evaluate_split`
               (trie-constrained beam ranking, `sidlm.evaluation`)
  `Data`       what every run of a dataset reads, built once

The SFT stage (`taiji_jax.stages.sft`) trains it; `stages.artifacts` opens
a finished run.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from taiji_jax import sharding
from taiji_jax.data import pipeline
from taiji_jax.evaluate import full_ranking
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.models import hf_import
from taiji_jax.quantize import semantic_ids as sid_lib
from taiji_jax.sidlm import evaluation
from taiji_jax.sidlm import rows as rows_lib
from taiji_jax.text import pretrained_vocab
from taiji_jax.text import sid_tokens
from taiji_jax.text import vocab as vocab_lib
from taiji_jax.train import optimizer
from taiji_jax.train import train_state

PRESETS = ("tiny", "small")
ALIGNMENT_TASKS = ("item_to_sid", "sid_to_title")


def vocab_texts(dataset) -> list[str]:
  """The texts the vocabulary is trained on: items, users, templates."""
  texts = [dataset.item_text(i) for i in range(1, dataset.num_items + 1)]
  if dataset.user_features:
    texts += [
        f"User: {dataset.user_text(u)}." for u in range(1, dataset.num_users +
                                                        1)
    ]
  texts += [
      " History:", rows_lib.ITEM_TO_SID_TEMPLATE, rows_lib.SID_TO_TITLE_TEMPLATE
  ]
  return texts


def pretrained(config: ml_collections.ConfigDict) -> str:
  """`config.model.pretrained`: a checkpoint to start from ("" for none):
  a .gguf file, a `gguf_import.PRETRAINED` name or a Hugging Face
  directory. With one, its tokenizer is the text vocabulary and its
  weights the initial parameters (`pretrained_params`)."""
  return str(config.model.get("pretrained", "") or "")


def build_vocab(config: ml_collections.ConfigDict,
                dataset,
                sids: sid_lib.SemanticIds,
                workdir: os.PathLike | str,
                extra_texts: Sequence[str] = ()) -> sid_tokens.SidTokens:
  """The run's vocabulary, saved in `<workdir>/vocab`: the pretrained
  checkpoint's tokenizer with the markers and SIDs after its embedding rows
  (`PretrainedVocab`), or a sentencepiece `Vocab` trained on the dataset's
  texts (reused when the texts and codebooks are unchanged)."""
  if pretrained(config):
    rows = hf_import.checkpoint_config(pretrained(config)).vocab_size
    vocab = pretrained_vocab.PretrainedVocab.from_checkpoint(
        pretrained(config), sids.codebook_sizes, first_free=rows)
    vocab.save(pathlib.Path(workdir) / "vocab")
    return vocab
  return vocab_lib.Vocab.build(
      vocab_texts(dataset) + list(extra_texts),
      sids.codebook_sizes,
      vocab_size=config.vocab.size,
      model_type=config.vocab.model_type,
      seed=config.seed,
      workdir=pathlib.Path(workdir) / "vocab")


def new_rows_from(vocab: sid_tokens.SidTokens) -> int | None:
  """The first id a pretrained checkpoint has no embedding row for (its
  markers and SIDs: `train.new_rows_lr_scale` applies from there), None for
  a vocabulary trained with the model (every row is new)."""
  if isinstance(vocab, pretrained_vocab.PretrainedVocab):
    return vocab.first_new_id
  return None


def row_length(config: ml_collections.ConfigDict, levels: int) -> int:
  """Tokens per training row: prefix + (max_items + 1) SIDs (+ titles)."""
  return config.max_prefix + (config.max_items + 1) * (
      levels + config.history_titles)


def history_titles(config: ml_collections.ConfigDict, dataset,
                   vocab) -> list[list[int]] | None:
  """Title tokens after each history SID (`config.history_titles` > 0)."""
  if config.history_titles <= 0:
    return None
  return rows_lib.item_titles(dataset, vocab, config.history_titles)


def training_rows(
    config: ml_collections.ConfigDict,
    dataset,
    split,
    vocab,
    item_tokens: np.ndarray,
    prefixes: dict[int, list[int]],
    titles: list[list[int]] | None = None) -> dict[str, np.ndarray]:
  """{"tokens", "loss_mask"} (R, T) of every training task, unshuffled.

  `config.tasks.<alignment task>` is how many copies of that task's rows go
  into each epoch (0 leaves it out); `titles` (`history_titles`) follow
  every SID of the next-item rows; `config.rows_per_user` > 0 keeps only
  each user's most recent next-item rows (`rows_lib.most_recent_rows`).
  """
  train = split["train"]
  rows = rows_lib.next_item_rows(
      train["sequences"],
      train["users"],
      item_tokens,
      prefixes,
      config.max_items,
      config.max_prefix,
      vocab.pad_id,
      titles=titles,
      max_title=config.history_titles)
  rows = rows_lib.most_recent_rows(rows, int(config.get("rows_per_user", 0)),
                                   item_tokens.shape[1])
  tokens, masks = [rows["tokens"]], [rows["loss_mask"]]
  length = rows["tokens"].shape[1]
  for task in ALIGNMENT_TASKS:
    copies = int(config.tasks[task])
    if copies <= 0:
      continue
    extra = rows_lib.alignment_rows(dataset, vocab, item_tokens, task, length)
    tokens += [extra["tokens"]] * copies
    masks += [extra["loss_mask"]] * copies
  return {"tokens": np.concatenate(tokens), "loss_mask": np.concatenate(masks)}


def real_lengths(tokens: np.ndarray, pad_id: int) -> np.ndarray:
  """(R,) tokens after the left padding of each row."""
  real = tokens != pad_id
  return np.where(real.any(1), tokens.shape[1] - np.argmax(real, axis=1), 0)


def bucket_widths(tokens: np.ndarray, pad_id: int, bucket: int) -> np.ndarray:
  """(R,) batch width of each row: its real length rounded up to a multiple
  of `bucket` (at most the row length); the row length when `bucket` is 0."""
  length = tokens.shape[1]
  if bucket <= 0:
    return np.full(len(tokens), length)
  real = real_lengths(tokens, pad_id)
  return np.minimum(-(-real // bucket) * bucket, length)


def num_batches(rows: dict[str, np.ndarray], batch_size: int, pad_id: int,
                bucket: int) -> int:
  """Batches per epoch of `epoch_batches` (the same for every epoch)."""
  _, counts = np.unique(
      bucket_widths(rows["tokens"], pad_id, bucket), return_counts=True)
  return int(np.sum(-(-counts // batch_size)))


def epoch_plan(rows: dict[str, np.ndarray],
               batch_size: int,
               seed: int,
               epoch: int,
               pad_id: int = 0,
               bucket: int = 0) -> list[tuple[int, np.ndarray]]:
  """The batches of one epoch, in order: (width, row indices) each.

  With `bucket` > 0 each row goes into the bucket of its real length
  rounded up to a multiple of `bucket` (at most the row length), batches are
  drawn from one bucket and cut to that length from the left (rows are
  left-padded), and the batch order is shuffled: short rows (alignment
  rows, users' first windows) no longer pay for the longest row, at the cost
  of one compiled shape per bucket. `bucket` 0 gives fixed-length batches.

  The permutations depend only on (seed, epoch), so a resumed run sees the
  same data order; a bucket's last batch is filled up with that bucket's
  first rows of the permutation (a few rows are seen twice per epoch, never
  a new shape).
  """
  n = len(rows["tokens"])
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(n)
  widths = bucket_widths(rows["tokens"], pad_id, bucket)
  batches = []
  for width in np.unique(widths):
    idx = order[widths[order] == width]
    steps = -(-len(idx) // batch_size)
    idx = np.resize(idx, steps * batch_size).reshape(steps, batch_size)
    batches += [(int(width), i) for i in idx]
  return [batches[b] for b in rng.permutation(len(batches))]


def max_targets(loss_mask: np.ndarray, width: int) -> int:
  """The most targets any row of `loss_mask` (R, T) can have once cut to its
  last `width` columns: targets in the last `width - 1` columns (a target in
  the cut's first column has no input position before it). The static number
  of loss positions of every batch of that width: it depends on the rows and
  the width only, so every process and every epoch gets the same shape, one
  per bucket, and no row of any batch of that width has more."""
  if width <= 1:
    return 0
  return int(loss_mask[:, loss_mask.shape[1] - width + 1:].sum(1).max(
      initial=0))


def loss_positions(loss_mask_bw: np.ndarray, num: int) -> np.ndarray:
  """(B, num) int32: the input positions t whose next token is a target
  (`loss_mask_bw[:, t + 1]`), ascending, padded with -1.

  `sft_loss` applies the LM head at these positions only: the (B, T, V)
  logits of the whole batch (a 49k-way head at every prompt token of a
  pretrained vocabulary) become (B, num, V), the loss unchanged.

  Raises:
    ValueError: a row has more than `num` targets (it would lose some).
  """
  targets_bw = loss_mask_bw[:, 1:].astype(bool)
  most = int(targets_bw.sum(1).max(initial=0))
  if most > num:
    raise ValueError(f"a row has {most} target tokens, more than the "
                     f"{num} loss positions of its batch")
  order = np.argsort(~targets_bw, axis=1, kind="stable")[:, :num]
  order = np.pad(order, ((0, 0), (0, num - order.shape[1])))
  real = np.take_along_axis(targets_bw, order, 1) & (
      np.arange(num) < targets_bw.sum(1, keepdims=True))
  return np.where(real, order, -1).astype(np.int32)


def take_rows(rows: dict[str, np.ndarray], width: int, idx: np.ndarray
             ) -> dict[str, np.ndarray]:
  """The batch of row indices `idx` cut to `width` from the left; arrays of
  `rows` shaped (R, T) like the tokens are cut, others (e.g. a per-row tag)
  only indexed. With a "loss_mask", the batch also carries its
  `loss_positions` (`max_targets` of them per row for this width)."""
  length = rows["tokens"].shape[1]
  batch = {
      k: v[idx][:, length - width:] if v.shape[1:] == (length,) else v[idx]
      for k, v in rows.items()
  }
  if "loss_mask" in batch:
    batch["loss_positions"] = loss_positions(
        batch["loss_mask"], max_targets(rows["loss_mask"], width))
  return batch


def epoch_batches(rows: dict[str, np.ndarray],
                  batch_size: int,
                  seed: int,
                  epoch: int,
                  pad_id: int = 0,
                  bucket: int = 0):
  """Yields the batches of `epoch_plan` (one epoch, all rows)."""
  for width, idx in epoch_plan(rows, batch_size, seed, epoch, pad_id, bucket):
    yield take_rows(rows, width, idx)


def train_batches(rows: dict[str, np.ndarray], config: ml_collections.ConfigDict,
                  pad_id: int, process_rows: slice = slice(None)):
  """The run's batches as a grain MapDataset over steps
  (`pipeline.step_batches` of `epoch_plan`), this process's rows of each."""
  b, bucket = int(config.train.batch_size), int(config.train.length_bucket)
  per_epoch = num_batches(rows, b, pad_id, bucket)
  return pipeline.step_batches(
      per_epoch * int(config.train.num_epochs), per_epoch,
      lambda epoch: epoch_plan(rows, b, config.seed, epoch, pad_id, bucket),
      lambda plan: take_rows(rows, plan[0], plan[1][process_rows]))


def model_config(config: ml_collections.ConfigDict,
                 vocab_size: int) -> decoder_lib.DecoderConfig:
  """`DecoderConfig.<preset>(vocab_size, **config.model.overrides)`, or the
  pretrained checkpoint's config with the overrides and `vocab_size`."""
  overrides = config.model.overrides.to_dict()
  if pretrained(config):
    return dataclasses.replace(
        hf_import.checkpoint_config(pretrained(config), **overrides),
        vocab_size=vocab_size)
  if config.model.preset not in PRESETS:
    raise ValueError(f"config.model.preset must be one of {PRESETS}, got "
                     f"{config.model.preset!r}.")
  preset = getattr(decoder_lib.DecoderConfig, config.model.preset)
  return preset(vocab_size=vocab_size, **overrides)


def pretrained_params(config: ml_collections.ConfigDict, setup: Setup,
                      vocab_size: int) -> Any:
  """The pretrained checkpoint's parameters grown to `vocab_size` rows
  (`hf_import.extend_vocab`: the new rows are the mean embedding plus small
  noise), with the LoRA updates the overrides ask for (`add_lora`: zero at
  the start), placed with the run's shardings.

  Raises:
    ValueError: the checkpoint's config, grown, is not the run's model
      (`model_config`), naming both.
  """
  rules = tuple(tuple(r) for r in config.sharding_rules)
  overrides = config.model.overrides.to_dict()
  # The checkpoint has no LoRA: load it without, then add the updates.
  base = {k: v for k, v in overrides.items() if not k.startswith("lora_")}
  cfg, model = hf_import.load_hf_checkpoint(
      pretrained(config), mesh=setup.mesh, rules=rules, **base)
  cfg, model = hf_import.extend_vocab(
      model, cfg, vocab_size, key=jax.random.key(config.seed), rules=rules)
  want = model_config(config, vocab_size)
  if want.lora_rank:
    cfg = decoder_lib.add_lora(model, dataclasses.replace(
        cfg, **{k: v for k, v in overrides.items() if k.startswith("lora_")}),
                               nnx.Rngs(params=config.seed)).cfg
  if cfg != want:
    raise ValueError(f"{pretrained(config)}: its model {cfg} is not the "
                     f"run's {want}.")
  return jax.device_put(
      nnx.state(model, nnx.Param), setup.state_shardings["params"])


def sft_loss(model, batch, pad_id: int, dropout_rng=None):
  """Next-token loss on the masked-in tokens of a batch of rows.

  Input t predicts token t + 1, so the loss mask is shifted with the
  targets; padding is never attended. `dropout_rng` turns on the model's
  dropout (`DecoderConfig.dropout_rate`). With `batch["loss_positions"]`
  (B, K) (`loss_positions`; `take_rows` adds them) the head runs at those
  K positions only; without, at every position. The two give the same loss
  and gradients.

  Returns:
    (mean loss, number of target tokens).
  """
  inputs_bt = batch["tokens"][:, :-1]
  targets_bt = batch["tokens"][:, 1:]
  h_btd = model.hidden(
      inputs_bt, attention_mask_bt=inputs_bt != pad_id, dropout_rng=dropout_rng)
  if "loss_positions" not in batch:
    return decoder_lib.next_token_loss(
        model.logits_from_hidden(h_btd), targets_bt, batch["loss_mask"][:, 1:])
  positions_bk = batch["loss_positions"]
  at_bk = jnp.maximum(positions_bk, 0)
  h_bkd = jnp.take_along_axis(h_btd, at_bk[..., None], axis=1)
  return decoder_lib.next_token_loss(
      model.logits_from_hidden(h_bkd),
      jnp.take_along_axis(targets_bt, at_bk, axis=1), positions_bk >= 0)


Setup = train_state.Setup


# The evaluation's helpers, under their old names.
def make_train_step(graphdef,
                    tx: optax.GradientTransformation,
                    pad_id: int,
                    seed: int = 0):
  """`train_step(state, batch) -> (state, metrics)`, pure, not yet jitted.

  `state` is {"params", "opt_state", "step"}; `batch` {"tokens",
  "loss_mask"} (B, T) (and optionally "loss_positions"). One step of `tx`
  on `sft_loss`; metrics: loss, targets, tokens (real input tokens),
  grad_norm. The dropout key of a
  step is `fold_in(key(seed), step)`, so a resumed run drops exactly what
  the uninterrupted one did. The SFT trainer, the throughput benchmark and
  the ahead-of-time memory check compile this same function.
  """

  def train_step(state, batch):
    key = jax.random.fold_in(jax.random.key(seed), state["step"])
    (loss, count), grads = jax.value_and_grad(
        lambda p: sft_loss(nnx.merge(graphdef, p), batch, pad_id, key),
        has_aux=True)(
            state["params"])
    metrics = {
        "loss": loss,
        "targets": count,
        # Real (non-padding) input tokens: tokens/s = their sum / seconds.
        "tokens": (batch["tokens"][:, :-1] != pad_id).sum(),
        "grad_norm": optax.tree.norm(grads),
    }
    return train_state.apply_gradients(state, grads, tx), metrics

  return train_step


def state_init_fn(model_cfg: decoder_lib.DecoderConfig,
                  tx: optax.GradientTransformation, seed: int):
  """(graphdef, init_state) where `init_state()` builds the train state.

  `jax.eval_shape(init_state)` gives the abstract state (no memory), from
  which `sharding.tree_shardings` derives the state's shardings.
  """
  init_state = train_state.init_fn(
      lambda: decoder_lib.Decoder(model_cfg, rngs=nnx.Rngs(params=seed)), tx)
  graphdef = train_state.params_graphdef(
      decoder_lib.abstract_decoder(model_cfg))
  return graphdef, init_state


def jit_train_step(train_step, state_shardings, mesh: jax.sharding.Mesh):
  """The train step jitted with state in/out shardings, state donated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(
      train_step,
      in_shardings=(state_shardings, None),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,))


def build(config: ml_collections.ConfigDict,
          model_cfg: decoder_lib.DecoderConfig,
          total_steps: int,
          mesh: jax.sharding.Mesh,
          sids: sid_lib.SemanticIds,
          vocab: sid_tokens.SidTokens,
          dataset=None) -> Setup:
  """Abstract init -> shardings -> sharded init and jitted steps.

  The evaluation step is `evaluation.make_eval_step` (plain or
  think-then-recommend, `config.eval.think`); with `dataset` it also reports
  the semantic metrics of `evaluate.semantic`. The format-compliance check
  (a second, unconstrained generation) runs in the final test evaluation
  only.
  """
  rules = tuple(tuple(r) for r in config.sharding_rules)
  tx = optimizer.from_config(config, total_steps, new_rows_from(vocab))
  pad_id = vocab.pad_id
  graphdef, init_state = state_init_fn(model_cfg, tx, config.seed)
  state, state_shardings = train_state.init_sharded(init_state, mesh, rules)
  train_step = make_train_step(graphdef, tx, pad_id, config.seed)

  eval_step = evaluation.make_eval_step(
      config, graphdef, sids, vocab, dataset, format_check=False)
  final_eval_step = jax.jit(
      evaluation.make_eval_step(config, graphdef, sids, vocab, dataset))
  jit_train = jit_train_step(train_step, state_shardings, mesh)
  return Setup(graphdef, state, state_shardings, jit_train, jax.jit(eval_step),
               final_eval_step,
               train_state.params_copier(state_shardings),
               train_state.batch_putter(mesh, rules), mesh)


def eval_users(part: dict[str, np.ndarray],
               config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The rows of a valid/test part that are evaluated: every user, or with
  `eval.num_users` = n > 0 a fixed sample of n users (the same for every
  run, seed and variant: `rows_lib.fixed_users`)."""
  keep = rows_lib.fixed_users(part["users"], config.eval.get("num_users", 0),
                              "eval.num_users")
  return part if keep.all() else {k: v[keep] for k, v in part.items()}


def eval_split(part: dict[str, np.ndarray],
                item_tokens: np.ndarray,
                prefixes: dict[int, list[int]],
                config: ml_collections.ConfigDict,
                pad_id: int,
                titles: list[list[int]] | None = None) -> dict[str, np.ndarray]:
  """The split part with its prompts in place of the item histories.

  `full_ranking.evaluate` batches it (padding rows with zeros, which are
  excluded from the means); an all-padding prompt row is replaced by the
  first prompt in `put` so every decoded row is well defined. With
  `eval.num_users` > 0 only a fixed sample of that many users is kept
  (`eval_users`).
  """
  part = eval_users(part, config)
  prompts = rows_lib.prompt_rows(
      part["histories"],
      part["users"],
      item_tokens,
      prefixes,
      config.max_items,
      config.max_prefix,
      pad_id,
      titles=titles,
      max_title=config.history_titles)
  return dict(part, histories=prompts)


@dataclasses.dataclass
class Data:
  """What every SFT run of a dataset reads: built once, shared by variants.

  Attributes:
    dataset, split: the dataset and its leave-one-out split (max_items).
    sids: the sids stage's `SemanticIds`.
    vocab: the text + SID vocabulary.
    item_tokens: (num_items + 1, L) SID token ids of every item.
    prefixes: {user: prompt prefix tokens} (`rows_lib.user_prefixes`).
    titles: history title tokens or None (`history_titles`).
  """
  dataset: Any
  split: dict
  sids: sid_lib.SemanticIds
  vocab: sid_tokens.SidTokens  # Vocab or PretrainedVocab
  item_tokens: np.ndarray
  prefixes: dict
  titles: list | None


def eval_putter(setup: Setup, pad_id: int):
  """`put(batch)` of evaluation batches: an all-padding prompt row (padding
  users of the last batch) is replaced by the first prompt, then placed."""

  def put(batch):
    prompts = batch["histories"]
    empty = prompts[:, -1] == pad_id
    batch = dict(
        batch, histories=np.where(empty[:, None], prompts[:1], prompts))
    return setup.put_batch(batch)

  return put


def evaluate_split(config: ml_collections.ConfigDict, setup: Setup, step,
                   params, data: Data, part: str) -> dict[str, float]:
  """Mean metrics of `step` (an eval step of `setup`) on a split part."""
  prompts = eval_split(data.split[part], data.item_tokens, data.prefixes,
                        config, data.vocab.pad_id, data.titles)
  with sharding.use_mesh(setup.mesh,
                         tuple(tuple(r) for r in config.sharding_rules)):
    return full_ranking.evaluate(step, params, prompts,
                                 config.eval.batch_size,
                                 eval_putter(setup, data.vocab.pad_id))

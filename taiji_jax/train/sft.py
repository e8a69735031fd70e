"""Supervised fine-tuning of the SID decoder on next-item rows; resumable.

`train_and_evaluate(config, workdir)` is the whole stage; the absl entry
point `experiments/train_sft.py` and notebooks call it. It reads the
semantic IDs of the sids stage (`config.sids_workdir`, default
`<workdir>/../sids`) and writes into the workdir:

  config.json      the config (a resumed run must use the same one)
  vocab/           the sentencepiece + SID vocabulary (reused when the texts
                   and codebooks are unchanged)
  checkpoints/     orbax: train state, best parameters, loop counters and
                   the input iterator's state, every
                   `checkpoint_every_epochs` epochs and at the end
  metrics.jsonl    per-epoch train loss and valid metrics (process 0)
  results.json     {"valid": {...}, "test": {...}} of the best-valid params,
                   in the format of the SASRec stage

Training rows are `sft_data.next_item_rows` of the training split (every
training interaction is a target once), plus the optional item-text -> SID
and SID -> title alignment rows, batched by length bucket
(`config.train.length_bucket`) and shuffled every epoch by a numpy RNG
seeded with (seed, epoch); dropout keys are folded from (seed, step), so a
resumed run repeats the uninterrupted one exactly. Evaluation prompts the model with each user's profile and
recent history and ranks items by trie-constrained beam search (beams =
max(ks)) that never returns an item the user has seen, the candidate set of
SASRec's masked full ranking.

The batches are a grain pipeline over steps (`train_batches`: each epoch's
`epoch_plan`), the loop is `train.fit`. Resume order: the latest checkpoint
in `<workdir>/checkpoints` (the data order resumes at the step it was
saved), else a fresh initialisation from `config.seed`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Sequence

from absl import logging
from flax import nnx
import jax
import ml_collections
import numpy as np
import optax

from taiji_jax import config_checks as checks
from taiji_jax import sharding
from taiji_jax.data import pipeline
from taiji_jax.evaluate import full_ranking
from taiji_jax.models import decoder as decoder_lib
from taiji_jax.quantize import semantic_ids as sid_lib
from taiji_jax.text import vocab as vocab_lib
from taiji_jax.train import build_sids
from taiji_jax.train import checkpointing
from taiji_jax.train import fit
from taiji_jax.train import metric_writer
from taiji_jax.train import optimizer
from taiji_jax.train import sft_data
from taiji_jax.train import sft_eval
from taiji_jax.train import train_state
from taiji_jax.train import workdir as workdir_lib

PRESETS = ("tiny", "small")
ALIGNMENT_TASKS = ("item_to_sid", "sid_to_title")


def sids_dir(config: ml_collections.ConfigDict,
             workdir: os.PathLike | str) -> pathlib.Path:
  """Where the SIDs are read from: `config.sids_workdir` or `../sids`."""
  if config.sids_workdir:
    return pathlib.Path(config.sids_workdir)
  return pathlib.Path(workdir).absolute().parent / "sids"


def load_sids(config: ml_collections.ConfigDict, workdir: os.PathLike | str,
              dataset) -> sid_lib.SemanticIds:
  """The sids stage's `SemanticIds`, checked against the dataset."""
  path = sids_dir(config, workdir)
  if not (path / sid_lib.FILE_NAME).is_file():
    raise FileNotFoundError(
        f"no {sid_lib.FILE_NAME} in {path}: run the sids stage first "
        f"(experiments/build_sids.py --workdir {path}) or set "
        "--config.sids_workdir.")
  return sid_lib.SemanticIds.load(path, dataset.item_raw_ids)


def vocab_texts(dataset) -> list[str]:
  """The texts the vocabulary is trained on: items, users, templates."""
  texts = [dataset.item_text(i) for i in range(1, dataset.num_items + 1)]
  if dataset.user_features:
    texts += [
        f"User: {dataset.user_text(u)}." for u in range(1, dataset.num_users +
                                                        1)
    ]
  texts += [
      " History:", sft_data.ITEM_TO_SID_TEMPLATE, sft_data.SID_TO_TITLE_TEMPLATE
  ]
  return texts


def build_vocab(config: ml_collections.ConfigDict,
                dataset,
                sids: sid_lib.SemanticIds,
                workdir: os.PathLike | str,
                extra_texts: Sequence[str] = ()) -> vocab_lib.Vocab:
  return vocab_lib.Vocab.build(
      vocab_texts(dataset) + list(extra_texts),
      sids.codebook_sizes,
      vocab_size=config.vocab.size,
      model_type=config.vocab.model_type,
      seed=config.seed,
      workdir=pathlib.Path(workdir) / "vocab")


def row_length(config: ml_collections.ConfigDict, levels: int) -> int:
  """Tokens per training row: prefix + (max_items + 1) SIDs (+ titles)."""
  return config.max_prefix + (config.max_items + 1) * (
      levels + config.history_titles)


def history_titles(config: ml_collections.ConfigDict, dataset,
                   vocab) -> list[list[int]] | None:
  """Title tokens after each history SID (`config.history_titles` > 0)."""
  if config.history_titles <= 0:
    return None
  return sft_data.item_titles(dataset, vocab, config.history_titles)


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
  every SID of the next-item rows.
  """
  train = split["train"]
  rows = sft_data.next_item_rows(
      train["sequences"],
      train["users"],
      item_tokens,
      prefixes,
      config.max_items,
      config.max_prefix,
      vocab.pad_id,
      titles=titles,
      max_title=config.history_titles)
  tokens, masks = [rows["tokens"]], [rows["loss_mask"]]
  length = rows["tokens"].shape[1]
  for task in ALIGNMENT_TASKS:
    copies = int(config.tasks[task])
    if copies <= 0:
      continue
    extra = sft_data.alignment_rows(dataset, vocab, item_tokens, task, length)
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


def take_rows(rows: dict[str, np.ndarray], width: int, idx: np.ndarray
             ) -> dict[str, np.ndarray]:
  """The batch of row indices `idx` cut to `width` from the left; arrays of
  `rows` shaped (R, T) like the tokens are cut, others (e.g. a per-row tag)
  only indexed."""
  length = rows["tokens"].shape[1]
  return {
      k: v[idx][:, length - width:] if v.shape[1:] == (length,) else v[idx]
      for k, v in rows.items()
  }


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
  """`DecoderConfig.<preset>(vocab_size, **config.model.overrides)`."""
  if config.model.preset not in PRESETS:
    raise ValueError(f"config.model.preset must be one of {PRESETS}, got "
                     f"{config.model.preset!r}.")
  preset = getattr(decoder_lib.DecoderConfig, config.model.preset)
  return preset(vocab_size=vocab_size, **config.model.overrides.to_dict())


def sft_loss(model, batch, pad_id: int, dropout_rng=None):
  """Next-token loss on the masked-in tokens of a batch of rows.

  Input t predicts token t + 1, so the loss mask is shifted with the
  targets; padding is never attended. `dropout_rng` turns on the model's
  dropout (`DecoderConfig.dropout_rate`).

  Returns:
    (mean loss, number of target tokens).
  """
  inputs_bt = batch["tokens"][:, :-1]
  logits_btv = model(
      inputs_bt, attention_mask_bt=inputs_bt != pad_id, dropout_rng=dropout_rng)
  return decoder_lib.next_token_loss(logits_btv, batch["tokens"][:, 1:],
                                     batch["loss_mask"][:, 1:])


@dataclasses.dataclass
class Setup:
  """Everything compiled for one run: model structure, steps, shardings."""
  graphdef: Any
  state: Any
  state_shardings: Any
  train_step: Any
  eval_step: Any
  final_eval_step: Any  # eval_step + the format check (test evaluation)
  copy_params: Any
  put_batch: Any
  mesh: Any


# The evaluation's helpers, under their old names.
semantic_tables = sft_eval.semantic_tables
eval_beams = sft_eval.eval_beams


def make_train_step(graphdef,
                    tx: optax.GradientTransformation,
                    pad_id: int,
                    seed: int = 0):
  """`train_step(state, batch) -> (state, metrics)`, pure, not yet jitted.

  `state` is {"params", "opt_state", "step"}; `batch` {"tokens",
  "loss_mask"} (B, T). One step of `tx` on `sft_loss`. The dropout key of a
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
          vocab: vocab_lib.Vocab,
          dataset=None) -> Setup:
  """Abstract init -> shardings -> sharded init and jitted steps.

  The evaluation step is `sft_eval.make_eval_step` (plain or
  think-then-recommend, `config.eval.think`); with `dataset` it also reports
  the semantic metrics of `evaluate.semantic`. The format-compliance check
  (a second, unconstrained generation) runs in the final test evaluation
  only.
  """
  rules = tuple(tuple(r) for r in config.sharding_rules)
  tx = optimizer.from_config(config, total_steps)
  pad_id = vocab.pad_id
  graphdef, init_state = state_init_fn(model_cfg, tx, config.seed)
  state, state_shardings = train_state.init_sharded(init_state, mesh, rules)
  train_step = make_train_step(graphdef, tx, pad_id, config.seed)

  eval_step = sft_eval.make_eval_step(
      config, graphdef, sids, vocab, dataset, format_check=False)
  final_eval_step = jax.jit(
      sft_eval.make_eval_step(config, graphdef, sids, vocab, dataset))
  jit_train = jit_train_step(train_step, state_shardings, mesh)
  return Setup(graphdef, state, state_shardings, jit_train, jax.jit(eval_step),
               final_eval_step,
               train_state.params_copier(state_shardings),
               train_state.batch_putter(mesh, rules), mesh)


def eval_split(part: dict[str, np.ndarray],
                item_tokens: np.ndarray,
                prefixes: dict[int, list[int]],
                config: ml_collections.ConfigDict,
                pad_id: int,
                titles: list[list[int]] | None = None) -> dict[str, np.ndarray]:
  """The split part with its prompts in place of the item histories.

  `full_ranking.evaluate` batches it (padding rows with zeros, which are
  excluded from the means); an all-padding prompt row is replaced by the
  first prompt in `put` so every decoded row is well defined.
  """
  prompts = sft_data.prompt_rows(
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
    prefixes: {user: prompt prefix tokens} (`sft_data.user_prefixes`).
    titles: history title tokens or None (`history_titles`).
  """
  dataset: Any
  split: dict
  sids: sid_lib.SemanticIds
  vocab: vocab_lib.Vocab
  item_tokens: np.ndarray
  prefixes: dict
  titles: list | None


def prepare(config: ml_collections.ConfigDict,
            workdir: os.PathLike | str,
            extra_vocab_texts: Callable[[Any], Sequence[str]] | None = None
           ) -> Data:
  """Loads the data and SIDs and builds the vocabulary into `workdir`.

  `extra_vocab_texts(dataset)` adds texts to the vocabulary's training
  corpus (e.g. teacher rationales, so reasoning text is not spelt out in
  byte pieces).
  """
  dataset = build_sids.load_dataset(config)
  split = dataset.split_leave_one_out(config.max_items)
  sids = load_sids(config, workdir, dataset)
  extra = list(extra_vocab_texts(dataset)) if extra_vocab_texts else []
  vocab = build_vocab(config, dataset, sids, workdir, extra)
  users = np.arange(1, dataset.num_users + 1)
  return Data(dataset, split, sids, vocab, vocab.item_token_table(sids),
              sft_data.user_prefixes(dataset, vocab, users, config.max_prefix),
              history_titles(config, dataset, vocab))


def restore_best_params(source: os.PathLike | str, setup: Setup,
                        config: ml_collections.ConfigDict) -> Any:
  """The best-valid parameters of the SFT run in `source`, on this mesh.

  Raises:
    FileNotFoundError: `source` holds no finished SFT checkpoint.
    ValueError: its model or vocabulary settings differ from `config`'s
      (names the differing fields).
  """
  source = pathlib.Path(source)
  src_config = workdir_lib.read_config(source)
  here = json.loads(config.to_json_best_effort())
  for key in ("model", "vocab", "max_prefix", "max_items"):
    if src_config.get(key) != here.get(key):
      raise ValueError(f"init_from {source}: its {key!r} differs from this "
                       f"run's: {src_config.get(key)} vs "
                       f"{here.get(key)}.")
  ckpt = checkpointing.Checkpoints(source / "checkpoints")
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"init_from {source}: no checkpoint in "
                              f"{source / 'checkpoints'}; train it first.")
    abstract = checkpointing.abstract_like(
        {
            "state": setup.state,
            "best_params": setup.state["params"]
        }, {
            "state": setup.state_shardings,
            "best_params": setup.state_shardings["params"]
        })
    restored, _ = ckpt.restore(abstract)
  finally:
    ckpt.close()
  return restored["best_params"]


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


def load_data(workdir: os.PathLike | str
             ) -> tuple[ml_collections.ConfigDict, Data]:
  """(config, Data) of a finished SFT run, its saved vocabulary reused.

  Unlike `prepare` nothing is written into `workdir`: a later stage (RL)
  reads the SFT run exactly as it was trained.
  """
  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(workdir_lib.read_config(workdir))
  if not (workdir / "vocab").is_dir():
    raise FileNotFoundError(f"{workdir}: no vocab/ (is it an SFT workdir? "
                            "train it first).")
  dataset = build_sids.load_dataset(config)
  split = dataset.split_leave_one_out(config.max_items)
  sids = load_sids(config, workdir, dataset)
  vocab = vocab_lib.Vocab.load(workdir / "vocab")
  vocab.check_compatible(sids)
  users = np.arange(1, dataset.num_users + 1)
  return config, Data(
      dataset, split, sids, vocab, vocab.item_token_table(sids),
      sft_data.user_prefixes(dataset, vocab, users, config.max_prefix),
      history_titles(config, dataset, vocab))


def load_decoder(workdir: os.PathLike | str, data: Data):
  """(decoder with the best-valid parameters, Setup) of a finished SFT run.

  The run's own config.json says the model; `data` must be prepared with
  the same vocabulary (checked through the parameter shapes on restore).
  """
  config = ml_collections.ConfigDict(workdir_lib.read_config(workdir))
  mesh = sharding.make_mesh(config.mesh.to_dict())
  model_cfg = model_config(config, data.vocab.size)
  # Any positive schedule length: only the state structure matters here.
  setup = build(config, model_cfg, config.train.warmup_steps + 2, mesh,
                data.sids, data.vocab)
  params = restore_best_params(workdir, setup, config)
  return nnx.merge(setup.graphdef, params), setup


def check_settings(config: ml_collections.ConfigDict,
                   prefix: str = "") -> None:
  """The settings, before any work (`taiji_jax.config_checks`)."""
  checks.epoch_trainer(config, prefix, sizes=("max_items", "max_prefix"))
  checks.one_of(config, "on_stale_inputs", workdir_lib.ON_STALE, prefix)


@workdir_lib.one_run_at_a_time(check=check_settings)
def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: os.PathLike | str,
                       *,
                       data: Data | None = None,
                       rows: dict[str, np.ndarray] | None = None,
                       extra_results: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
  """Fine-tunes the decoder with early stopping on valid; results.json.

  Args:
    config: an SFT config (`configs/ml100k_sft.py`).
    workdir: the run's directory (resumes from its checkpoints).
    data: `prepare(config, ...)` output to reuse (default: prepared here).
    rows: the training rows {"tokens", "loss_mask"} (default:
      `training_rows`, the packed next-item rows + alignment rows).
    extra_results: added to results.json (e.g. how the rows were made).

  With `config.init_from` a fresh run starts from the best parameters of
  that SFT workdir (a new optimizer state); resuming ignores it.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  inputs = {"sids": sids_dir(config, workdir)}
  workdir_lib.check_same_setting(config, "dataset", inputs["sids"], "sids")
  workdir_lib.write_or_check_config(workdir, config)
  if config.init_from:
    inputs["init_from"] = pathlib.Path(config.init_from)
  workdir_lib.check_inputs(workdir, inputs, config.on_stale_inputs)
  if data is None:
    data = prepare(config, workdir)
  dataset, split, sids, vocab = data.dataset, data.split, data.sids, data.vocab
  item_tokens, prefixes, titles = data.item_tokens, data.prefixes, data.titles
  if rows is None:
    rows = training_rows(config, dataset, split, vocab, item_tokens, prefixes,
                         titles)
  logging.info("dataset %s: %s; %d training rows of %d tokens, vocab %d",
               dataset.name, dataset.statistics(), len(rows["tokens"]),
               rows["tokens"].shape[1], vocab.size)

  batch_size = config.train.batch_size
  steps_per_epoch = num_batches(rows, batch_size, vocab.pad_id,
                                config.train.length_bucket)
  total_steps = steps_per_epoch * config.train.num_epochs
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rules = tuple(tuple(r) for r in config.sharding_rules)
  model_cfg = model_config(config, vocab.size)
  setup = build(config, model_cfg, total_steps, mesh, sids, vocab, dataset)
  logging.info("decoder %s: %d parameters", model_cfg,
               decoder_lib.count_params(model_cfg))
  ckpt = checkpointing.Checkpoints(workdir / "checkpoints")
  state, best_params, meta, resumed = fit.resume(
      ckpt, setup.state, setup.copy_params(setup.state["params"]),
      setup.state_shardings, fit.initial_meta())
  if not resumed and config.init_from:
    state["params"] = restore_best_params(config.init_from, setup, config)
    best_params = setup.copy_params(state["params"])
    logging.info("initialised from the best parameters of %s",
                 config.init_from)
  writer = metric_writer.MetricWriter(workdir, resume_step=meta["step"])
  eval_parts = {
      part:
          eval_split(split[part], item_tokens, prefixes, config, vocab.pad_id,
                      titles) for part in ("valid", "test")
  }

  put_eval = eval_putter(setup, vocab.pad_id)

  def evaluate(params, part, final=False):
    step = setup.final_eval_step if final else setup.eval_step
    return full_ranking.evaluate(step, params, eval_parts[part],
                                 config.eval.batch_size, put_eval)

  batches = iter(
      train_batches(rows, config, vocab.pad_id,
                    sharding.process_rows(mesh, batch_size,
                                          rules)).to_iter_dataset())
  with sharding.use_mesh(mesh, rules):
    out, epochs = fit.fit_epochs(
        config, f"sft {dataset.name}", steps_per_epoch, state, best_params,
        meta, batches=batches, checkpoints=ckpt, writer=writer,
        copy_params=setup.copy_params,
        evaluate=lambda params: evaluate(params, "valid"),
        train_step=lambda state, batch, step: setup.train_step(
            state, setup.put_batch(batch, batch_size)))
    state, best_params, meta = out.state, out.best_params, out.meta
    results = {
        "valid": meta.get("best_valid") or evaluate(best_params, "valid"),
        "test": evaluate(best_params, "test", final=True),
        **epochs,
        "steps": int(state["step"]),
        "dataset": {
            "name": dataset.name,
            "source": dataset.source,
            **dataset.statistics()
        },
        "split": split["counts"],
        "mask_history": True,
        "train_rows": int(len(rows["tokens"])),
        "row_length": int(rows["tokens"].shape[1]),
        "vocab_size": int(vocab.size),
        "num_params": int(decoder_lib.count_params(model_cfg)),
        "sids": str(sids_dir(config, workdir)),
        "init_from": str(config.init_from),
        **(extra_results or {}),
    }
  ckpt.close()
  if jax.process_index() == 0:
    metric_writer.write_json_atomic(workdir / "results.json", results)
  return results

"""The SFT stage: loss mask, train step, and the smoke run end to end."""

import pathlib
import sys

from flax import nnx
import jax
import ml_collections
import numpy as np
import pytest

from taiji_jax import config_lib
from taiji_jax import sharding
from taiji_jax.models import gguf_import
from taiji_jax.quantize import semantic_ids as sid_lib
from taiji_jax.sidlm import rows as sid_rows
from taiji_jax.sidlm import task
from taiji_jax.stages import artifacts
from taiji_jax.stages import sft as sft_stage
from taiji_jax.stages import sids as sids_stage
from taiji_jax.testing import gguf as gguf_testing
from taiji_jax.testing import runs
from taiji_jax.text import pretrained_vocab

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ENTRY = ROOT / "experiments" / "train_sft.py"
SIZES = (4, 4, 5)
_KILL_AT = 25  # a step in the middle of the smoke run's third epoch


def _command(workdir, sids_workdir):
  return [
      sys.executable,
      str(ENTRY), f"--config={CONFIGS / 'ml100k_sft.py'}:smoke",
      f"--workdir={workdir}", f"--config.sids_workdir={sids_workdir}",
      "--config.progress_bar=False"
  ]


def _config(name, arg, **overrides):
  config = config_lib.load_config_file(CONFIGS / name, arg)
  return config_lib.with_overrides(config, progress_bar=False, **overrides)


@pytest.fixture(scope="module")
def smoke_sids(tmp_path_factory):
  """A finished sids stage of the smoke dataset (RQ-KMeans on text)."""
  path = tmp_path_factory.mktemp("smoke_sids") / "sids"
  sids_stage.run(
      _config("ml100k_sids.py", "smoke", **{
          "representation.weights.collaborative": 0.0,
          "quantizers": ("rq_kmeans",),
          "default": "rq_kmeans",
      }), path)
  return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  """(path, config) of a tiny random Llama written as a GGUF file, with a
  byte-level BPE tokenizer and 300 embedding rows."""
  path = tmp_path_factory.mktemp("tiny_llama") / "lm.gguf"
  return path, gguf_testing.write_tiny_llama(path)


@pytest.fixture(scope="module")
def small_setup(tmp_path_factory):
  """Smoke dataset, random unique SIDs saved as a sids stage, vocab, rows."""
  # No dropout, so a train step's loss is a plain function of the params.
  config = _config(
      "ml100k_sft.py", "smoke", **{
          "tasks.item_to_sid": 1,
          "model.overrides.dropout_rate": 0.0
      })
  dataset = artifacts.dataset(config)
  rng = np.random.default_rng(0)
  flat = rng.choice(np.prod(SIZES), dataset.num_items, replace=False)
  codes = np.stack(np.unravel_index(flat, SIZES), 1)
  sids = sid_lib.SemanticIds(
      np.concatenate([np.full((1, 3), -1), codes]), SIZES,
      sid_lib.catalogue_fingerprint(dataset.item_raw_ids))
  root = tmp_path_factory.mktemp("sft_unit")
  sids.save(root / "sids")
  workdir = root / "sft"
  loaded = artifacts.load_sids(config, workdir, dataset)
  vocab = task.build_vocab(config, dataset, loaded, workdir)
  split = dataset.split_leave_one_out(config.max_items)
  item_tokens = vocab.item_token_table(loaded)
  users = np.arange(1, dataset.num_users + 1)
  prefixes = sid_rows.user_prefixes(dataset, vocab, users, config.max_prefix)
  rows = task.training_rows(config, dataset, split, vocab, item_tokens, prefixes)
  return config, dataset, loaded, vocab, split, rows


def test_missing_sids_say_to_run_the_sids_stage(small_setup, tmp_path):
  config, dataset = small_setup[:2]
  with pytest.raises(FileNotFoundError, match="run the sids stage first"):
    artifacts.load_sids(config, tmp_path / "sft", dataset)


def test_loss_mask_covers_only_sid_tokens_of_target_items(small_setup):
  config, dataset, sids, vocab, split, rows = small_setup
  tokens, mask = rows["tokens"], rows["loss_mask"]
  levels, offsets = sids.levels, vocab.level_offsets
  assert tokens.shape[1] == task.row_length(config, levels)
  num_targets = sum(max(len(s) - 1, 0) for s in split["train"]["sequences"])
  is_sid = (tokens >= offsets[0]) & (tokens < vocab.text_offset)
  # item_to_sid rows (one per item) come after the next-item rows.
  num_next = len(tokens) - dataset.num_items
  nxt_tokens, nxt_mask = tokens[:num_next], mask[:num_next]
  # Next-item rows: the mask is on SID tokens only, one whole SID per
  # training target, never on the prefix or padding; each row's first item
  # is context.
  assert not np.any(nxt_mask & ~is_sid[:num_next])
  assert int(nxt_mask.sum()) == num_targets * levels
  for row_t, row_m, row_sid in zip(nxt_tokens, nxt_mask, is_sid[:num_next]):
    body_t = row_t[row_sid].reshape(-1, levels)
    body_m = row_m[row_sid].reshape(-1, levels)
    assert not body_m[0].any()
    assert np.all(body_m[1:].all(1))
    for level in range(levels):  # level l's token sits at position l
      lo = offsets[level]
      assert np.all((body_t[:, level] >= lo)
                    & (body_t[:, level] < lo + SIZES[level]))
  # Alignment rows: the answer SID plus </answer><eos>, nothing else.
  align_t, align_m = tokens[num_next:], mask[num_next:]
  assert np.all(align_m.sum(1) == levels + 2)
  for row_t, row_m in zip(align_t, align_m):
    answer = row_t[row_m]
    assert answer[-2:].tolist() == [vocab.answer_end_id, vocab.eos_id]
    assert np.all((answer[:levels] >= offsets[0])
                  & (answer[:levels] < vocab.text_offset))


def test_train_step_loss_equals_a_direct_computation(small_setup):
  config, _, sids, vocab, _, rows = small_setup
  mesh = sharding.make_mesh(config.mesh.to_dict())
  model_cfg = task.model_config(config, vocab.size)
  setup = task.build(config, model_cfg, 10, mesh, sids, vocab)
  batch = next(task.epoch_batches(rows, config.train.batch_size, 0, 0))
  assert batch["tokens"].shape == (config.train.batch_size,
                                   rows["tokens"].shape[1])
  params = jax.device_get(setup.state["params"])
  model = nnx.merge(setup.graphdef, params)
  inputs = batch["tokens"][:, :-1]
  logits = np.asarray(
      model(inputs, attention_mask_bt=inputs != vocab.pad_id), np.float64)
  targets = batch["tokens"][:, 1:]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
  logz += logits.max(-1)
  nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  mask = batch["loss_mask"][:, 1:]
  want = (nll * mask).sum() / mask.sum()
  state, metrics = setup.train_step(setup.state, setup.put_batch(batch))
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-4)
  assert int(metrics["targets"]) == int(mask.sum())
  assert int(state["step"]) == 1
  assert np.isfinite(float(metrics["grad_norm"]))


def test_the_head_at_the_loss_positions_only_gives_the_same_loss_and_grads(
    small_setup):
  """`loss_positions`: the LM head runs at the K target positions of each
  row, not at all T; loss and gradients equal the full-head ones."""
  config, _, sids, vocab, _, rows = small_setup
  model_cfg = task.model_config(config, vocab.size)
  setup = task.build(config, model_cfg, 10,
                     sharding.make_mesh(config.mesh.to_dict()), sids, vocab)
  batch = next(task.epoch_batches(rows, 8, 0, 0, vocab.pad_id, bucket=8))
  k = batch["loss_positions"].shape[1]
  assert k == task.max_targets(rows["loss_mask"], batch["tokens"].shape[1])
  assert k < batch["tokens"].shape[1] - 1  # the point: fewer than T
  full = {n: batch[n] for n in ("tokens", "loss_mask")}

  def loss(params, b):
    return task.sft_loss(nnx.merge(setup.graphdef, params), b, vocab.pad_id)

  params = setup.state["params"]
  (want, want_n), want_g = jax.value_and_grad(loss, has_aux=True)(params, full)
  (got, got_n), got_g = jax.value_and_grad(loss, has_aux=True)(params, batch)
  assert int(got_n) == int(want_n) == int(batch["loss_mask"][:, 1:].sum())
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4,
                               atol=1e-7)


def test_loss_positions_list_each_rows_targets_and_refuse_too_few():
  mask = np.array([[0, 0, 1, 1, 0, 1],
                   [0, 0, 0, 0, 0, 1],
                   [0, 0, 0, 0, 0, 0]], bool)
  got = task.loss_positions(mask, 4)
  # Input t predicts token t + 1: the targets at 2, 3, 5 -> inputs 1, 2, 4.
  np.testing.assert_array_equal(
      got, [[1, 2, 4, -1], [4, -1, -1, -1], [-1, -1, -1, -1]])
  with pytest.raises(ValueError, match="3 target tokens, more than the 2"):
    task.loss_positions(mask, 2)
  # Targets in the last `width - 1` columns: those a cut row can predict.
  assert task.max_targets(mask, 6) == 3
  assert task.max_targets(mask, 3) == 1
  assert task.max_targets(mask[2:], 6) == 0


def test_every_batch_has_room_for_its_targets_when_targets_start_a_row():
  """Regression (CI, the multihost SFT test): a row whose first target lies
  in the first column of its cut, or that is not left padded at all, once
  made `max_targets` too small and `take_rows` raise."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 40, (24, 12)).astype(np.int32)
  tokens[:12, :6] = 0
  rows = {"tokens": tokens, "loss_mask": (tokens > 20).astype(np.int32)}
  for epoch in range(3):
    for batch in task.epoch_batches(rows, 8, 3, epoch, 0, bucket=6):
      want = batch["loss_mask"][:, 1:].sum(1)
      got = (batch["loss_positions"] >= 0).sum(1)
      np.testing.assert_array_equal(got, want)


def test_epoch_batches_are_seeded_and_cover_every_row(small_setup):
  rows = small_setup[-1]
  n = len(rows["tokens"])
  tagged = {"tokens": np.arange(n)[:, None], "loss_mask": np.arange(n)[:, None]}
  first = [b["tokens"][:, 0] for b in task.epoch_batches(tagged, 16, 0, 0)]
  again = [b["tokens"][:, 0] for b in task.epoch_batches(tagged, 16, 0, 0)]
  other = [b["tokens"][:, 0] for b in task.epoch_batches(tagged, 16, 0, 1)]
  np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
  assert not np.array_equal(np.concatenate(first), np.concatenate(other))
  assert all(len(b) == 16 for b in first)
  assert set(np.concatenate(first).tolist()) == set(range(n))


def test_length_buckets_cut_only_padding_and_cover_every_row(small_setup):
  config, _, _, vocab, _, rows = small_setup
  pad, length = vocab.pad_id, rows["tokens"].shape[1]
  # Tag each row in its last column (a real token of every row).
  tagged = dict(rows, row=np.arange(len(rows["tokens"]))[:, None])
  seen, widths = [], set()
  for batch in task.epoch_batches(tagged, 16, 3, 0, pad, bucket=8):
    width = batch["tokens"].shape[1]
    widths.add(width)
    assert width % 8 == 0 or width == length
    idx = batch["row"][:, 0]
    seen += idx.tolist()
    full = rows["tokens"][idx]
    # Only left padding was cut; the kept columns are the rows' last ones.
    assert np.all(full[:, :length - width] == pad)
    np.testing.assert_array_equal(batch["tokens"], full[:, length - width:])
    np.testing.assert_array_equal(batch["loss_mask"],
                                  rows["loss_mask"][idx][:, length - width:])
    # Every row of the batch needs more than the next smaller bucket.
    real = task.real_lengths(full, pad)
    assert np.all(real > width - 8) and np.all(real <= width)
  assert len(widths) > 1  # alignment rows are much shorter than history rows
  assert set(seen) == set(range(len(rows["tokens"])))
  assert len(seen) == 16 * task.num_batches(rows, 16, pad, bucket=8)
  assert task.num_batches(rows, 16, pad, 0) == -(-len(rows["tokens"]) // 16)
  again = [
      b["row"][:, 0].tolist()
      for b in task.epoch_batches(tagged, 16, 3, 0, pad, bucket=8)
  ]
  assert sum(again, []) == seen


@pytest.mark.slow
def test_smoke_run_end_to_end_and_resume_after_kill(tmp_path, smoke_sids):
  config = _config("ml100k_sft.py", "smoke")
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  # The uninterrupted run and the run that will be killed run concurrently,
  # each in its own process on one CPU device, through the entry point.
  sids = smoke_sids
  runs.run_beside_a_crash(
      _command(straight, sids), _command(killed, sids), kill_at=_KILL_AT)
  assert not (killed / "results.json").exists()
  records = runs.metric_records(straight)
  steps_per_epoch = records[0]["step"]
  # The kill lands mid-epoch 3, after the epoch-2 checkpoint, so the resumed
  # run must redo part of an epoch.
  assert 2 * steps_per_epoch < _KILL_AT < 3 * steps_per_epoch, steps_per_epoch
  saved = runs.checkpoint_steps(killed)
  assert saved and max(saved) == 2 * steps_per_epoch, saved
  runs.resume(_command(killed, sids))
  a = runs.assert_same_run(straight, killed)

  dataset = artifacts.dataset(config)
  split = dataset.split_leave_one_out(config.max_items)
  for part in ("valid", "test"):
    metrics = a[part]
    assert metrics["num_users"] == len(split[part]["targets"])
    for k in config.eval.ks:
      for name in ("recall", "ndcg"):
        assert 0.0 <= metrics[f"{name}@{k}"] <= 1.0
    # Every recommended item is a real, unseen item.
    assert metrics["legal_items"] == 1.0
    # Semantic metrics: labels of the top-1 item; the synthetic titles are
    # unique, so a title hit is an item hit.
    assert 0.0 <= metrics["label_exact@1"] <= metrics["label_acc@1"] <= 1.0
    for k in config.eval.ks:
      assert metrics[f"title_hit@{k}"] == pytest.approx(metrics[f"recall@{k}"])
  assert [r["epoch"] for r in records
         ] == list(range(1, config.train.num_epochs + 1))
  assert records[-1]["train/loss"] < records[0]["train/loss"]
  assert all(np.isfinite(r["train/loss"]) for r in records)

  # Re-running a finished run resumes from its final checkpoint: no
  # retraining, same results; a different config is refused.
  again = sft_stage.train_and_evaluate(
      config_lib.with_overrides(config, sids_workdir=str(smoke_sids)),
      straight)
  assert runs.metric_records(straight) == records
  assert again["steps"] == a["steps"]
  with pytest.raises(ValueError, match="differs in"):
    sft_stage.train_and_evaluate(
        _config("ml100k_sft.py", "smoke", **{
            "train.lr": 1e-4,
            "sids_workdir": str(smoke_sids)
        }), straight)


def test_history_titles_lengthen_rows_but_not_the_loss(small_setup):
  config, dataset, sids, vocab, split, rows = small_setup
  titled = config_lib.with_overrides(config, history_titles=3)
  assert task.history_titles(config, dataset, vocab) is None
  titles = task.history_titles(titled, dataset, vocab)
  item_tokens = vocab.item_token_table(sids)
  users = np.arange(1, dataset.num_users + 1)
  prefixes = sid_rows.user_prefixes(dataset, vocab, users, config.max_prefix)
  longer = task.training_rows(titled, dataset, split, vocab, item_tokens,
                             prefixes, titles)
  levels = sids.codes.shape[1]
  assert longer["tokens"].shape[1] == task.row_length(titled, levels)
  assert task.row_length(titled, levels) > task.row_length(config, levels)
  assert longer["loss_mask"].sum() == rows["loss_mask"].sum()


def test_sft_from_a_pretrained_checkpoint_keeps_its_tokenizer_and_weights(
    tmp_path, smoke_sids, tiny_llama):
  """`model.pretrained`: a tiny Llama GGUF (byte-level BPE tokenizer, 300
  embedding rows) is the text vocabulary and the starting point; the
  markers and SIDs are new rows after its 300, the old rows start as the
  checkpoint's, and the smoke run trains and ranks."""
  path, lm_cfg = tiny_llama
  config = _config(
      "ml100k_sft.py", "smoke", **{
          "model.pretrained": str(path),
          "sids_workdir": str(smoke_sids),
          "train.num_epochs": 2,
      })
  results = sft_stage.train_and_evaluate(config, tmp_path / "sft")
  vocab = pretrained_vocab.load_vocab(tmp_path / "sft" / "vocab")
  assert isinstance(vocab, pretrained_vocab.PretrainedVocab)
  assert vocab.pad_id == 300 and vocab.num_text_pieces <= 300
  assert results["vocab_size"] == vocab.size == 300 + 8 + sum(
      vocab.codebook_sizes)
  assert results["test"]["legal_items"] == 1.0
  records = runs.metric_records(tmp_path / "sft")
  assert all(np.isfinite(r["train/loss"]) for r in records)
  # The initial parameters: the checkpoint's rows, then the new ones.
  model_cfg = task.model_config(config, vocab.size)
  assert (model_cfg.hidden_size, model_cfg.num_layers) == (
      lm_cfg.hidden_size, lm_cfg.num_layers)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  dataset = artifacts.dataset(config)
  sids = artifacts.load_sids(config, tmp_path / "sft", dataset)
  setup = task.build(config, model_cfg, 10, mesh, sids, vocab)
  params = task.pretrained_params(config, setup, vocab.size)
  _, lm = gguf_import.load_gguf(path)
  np.testing.assert_allclose(np.asarray(params["embed"][...])[:300],
                             np.asarray(lm.embed[...]), rtol=1e-6)

  # With LoRA on q and v: the same weights plus zero low-rank updates, the
  # structure the run builds from its config (so it saves and resumes).
  lora = config.to_dict()
  lora["model"]["overrides"].update(lora_rank=2, lora_targets=("q", "v"))
  lora = ml_collections.ConfigDict(lora)
  lora_cfg = task.model_config(lora, vocab.size)
  assert lora_cfg.lora_rank == 2
  lora_setup = task.build(lora, lora_cfg, 10, mesh, sids, vocab)
  lora_params = task.pretrained_params(lora, lora_setup, vocab.size)
  assert jax.tree.structure(lora_params) == jax.tree.structure(
      lora_setup.state["params"])
  np.testing.assert_array_equal(lora_params["embed"][...],
                                params["embed"][...])
  b = lora_params["blocks"][0]["attn"]["lora_q"]["lora_b"][...]
  assert b.shape == (2, lm_cfg.num_heads * lm_cfg.head_dim) and not b.any()


@pytest.mark.slow
def test_a_pretrained_run_killed_mid_epoch_resumes_to_the_same_result(
    tmp_path, smoke_sids, tiny_llama):
  """kill -9 of an SFT run started from a tiny Llama GGUF, then resume: the
  resumed run continues from its checkpoint (not from the checkpoint file
  again) and ends with the uninterrupted run's numbers."""
  path, lm_cfg = tiny_llama
  extra = [f"--config.model.pretrained={path}", "--config.train.num_epochs=3",
           "--config.eval.every_epochs=3"]
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  command = lambda w: _command(w, smoke_sids) + extra
  runs.run_beside_a_crash(command(straight), command(killed), kill_at=_KILL_AT)
  assert not (killed / "results.json").exists()
  assert runs.checkpoint_steps(killed)
  runs.resume(command(killed))
  a = runs.assert_same_run(straight, killed)
  assert a["test"]["legal_items"] == 1.0


def test_the_smollm2_smoke_config_trains_from_the_tiny_random_llama(
    tmp_path, smoke_sids, monkeypatch):
  """`configs/ml100k_smollm2.py:smoke`: the project's tiny random Llama
  (written once into the model cache, the same bytes every time) is the
  checkpoint; the budget keeps one row per user plus the item -> SID rows;
  records and checkpoints fall every 3 and 6 steps inside the 7-step
  epochs, and at the evaluations."""
  monkeypatch.setenv("TAIJI_MODEL_CACHE_DIR", str(tmp_path / "models"))
  path = gguf_import.gguf_path(gguf_import.TINY_RANDOM_LLAMA)
  again = tmp_path / "again.gguf"
  gguf_testing.write_tiny_llama(again)
  assert path.read_bytes() == again.read_bytes()
  config = _config("ml100k_smollm2.py", "smoke", sids_workdir=str(smoke_sids))
  results = sft_stage.train_and_evaluate(config, tmp_path / "sft")
  vocab = pretrained_vocab.load_vocab(tmp_path / "sft" / "vocab")
  assert vocab.first_new_id == 300
  dataset = artifacts.dataset(config)
  assert results["train_rows"] == dataset.num_users + dataset.num_items
  assert results["test"]["legal_items"] == 1.0
  steps = [r["step"] for r in runs.metric_records(tmp_path / "sft")]
  assert steps == [3, 6, 7, 9, 12, 14]
  assert runs.checkpoint_steps(tmp_path / "sft")[-1] == 14

"""What the RL stage reads: prompts, evaluation parts, reward tables.

Pure data preparation on the host; `stages/rl.py` wires it to the jitted
rollout, update and evaluation. The evaluation step is the SFT stage's
(trie-constrained beam, history excluded) plus the semantic and preference
rewards of the ranked items and the held-out judges (`rl/judges.py`).
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np

from taiji_jax.cot import data as cot_data
from taiji_jax.data import pipeline
from taiji_jax.rl import judges as judges_lib
from taiji_jax.rl import rewards as rewards_lib
from taiji_jax.sidlm import evaluation as sid_evaluation
from taiji_jax.sidlm import rows as sid_rows
from taiji_jax.sidlm import task
from taiji_jax.text import embedding_cache

EVAL_REWARDS = ("semantic", "preference")


def normalised_rows(x: np.ndarray) -> np.ndarray:
  """(I + 1, D): a zero row 0 (padding) above the L2-normalised rows of x."""
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return np.concatenate([np.zeros((1, x.shape[1]), np.float32), x])


def item_embeddings(config, sids_workdir: pathlib.Path, dataset,
                    workdir: pathlib.Path) -> np.ndarray:
  """(I + 1, D) L2-normalised text embeddings of every item; row 0 zeros.

  Reuses the sids stage's (`sids_workdir`) `embeddings/content.npz` when it
  holds the same encoder's embeddings of the same item texts, else encodes
  into `<workdir>/embeddings/content.npz`.
  """
  texts = [dataset.item_text(i) for i in range(1, dataset.num_items + 1)]
  x = embedding_cache.text_embeddings(
      config.text_encoder,
      texts,
      workdir / "embeddings" / "content.npz",
      progress=bool(config.progress_bar),
      also=[sids_workdir / "embeddings" / "content.npz"])
  return normalised_rows(x)


def judge_tables(config, dataset, split, sids_workdir: pathlib.Path,
                 workdir: pathlib.Path) -> dict[str, np.ndarray]:
  """The held-out judges' tables (`taiji_jax.rl.judges`) for the named
  `config.judges.names`.

  The semantic judge's item embeddings are cached in
  `<workdir>/embeddings/judge.npz`, or read from a sibling run's (same
  encoder, same texts: the key says so), so the runs of one experiment
  encode the catalogue once.

  Raises:
    ValueError: an unknown judge, or the semantic judge's encoder is the
      semantic reward's (then it would not be held out).
  """
  jc = config.judges
  names = list(jc.names)
  unknown = [n for n in names if n not in judges_lib.JUDGES]
  if unknown or len(set(names)) != len(names):
    raise ValueError(f"config.judges.names={names}: unknown {unknown} or "
                     f"repeated; known: {judges_lib.JUDGES}.")
  out = {}
  if "semantic" in names:
    enc, reward_enc = jc.text_encoder, config.text_encoder
    if (enc.name, enc.path) == (reward_enc.name, reward_enc.path):
      raise ValueError(
          f"config.judges.text_encoder is the semantic reward's encoder "
          f"({enc.name!r}); a judge must be a model the policy was not "
          "trained on.")
    texts = [dataset.item_text(i) for i in range(1, dataset.num_items + 1)]
    here = workdir / "embeddings" / "judge.npz"
    siblings = sorted(workdir.absolute().parent.glob("*/embeddings/judge.npz"))
    x = embedding_cache.text_embeddings(
        enc,
        texts,
        here,
        progress=bool(config.progress_bar),
        also=[p for p in siblings if p != here.absolute()] +
        [sids_workdir / "embeddings" / "judge.npz"])
    out["judge_item_embeddings"] = judges_lib.centred_rows(x)
  if "preference" in names:
    out["judge_item_knn"] = judges_lib.item_knn(
        split["train"]["sequences"], dataset.num_items,
        neighbours=int(jc.knn_neighbours), shrink=float(jc.knn_shrink))
  return out


def right_align(histories: np.ndarray, length: int) -> np.ndarray:
  """The last `length` columns of right-aligned histories (zero-padded)."""
  h = histories.shape[1]
  if h >= length:
    return histories[:, h - length:]
  return np.pad(histories, ((0, 0), (length - h, 0)))


def training_prompts(config, sft_config, data: task.Data,
                     pref_len: int) -> dict[str, np.ndarray]:
  """{"prompts", "seen", "targets", "users", "pref_histories"} of every RL
  prompt: each user's last `prompts_per_user` training targets."""
  longest = max(len(s) for s in data.split["train"]["sequences"])
  ex = cot_data.next_item_examples(data.split, int(config.prompts_per_user),
                                   max(longest, 1))
  prompts = sid_rows.prompt_rows(
      ex["histories"],
      ex["users"],
      data.item_tokens,
      data.prefixes,
      sft_config.max_items,
      sft_config.max_prefix,
      data.vocab.pad_id,
      titles=data.titles,
      max_title=sft_config.history_titles)
  return {
      "prompts": prompts,
      "seen": ex["histories"],
      "targets": ex["targets"],
      "users": ex["users"],
      "pref_histories": right_align(ex["histories"], pref_len),
  }


def prompt_batches(prompts: dict[str, np.ndarray],
                   batch_size: int,
                   seed: int,
                   num_steps: int,
                   process_rows: slice = slice(None)):
  """The RL run's prompt batches: a grain MapDataset over steps.

  Each epoch is a permutation of the prompts seeded by (seed, epoch), cut
  into `len // batch_size` batches (the remainder waits for a later
  epoch's order); this process gathers its `process_rows` of each batch.
  """
  n = len(prompts["targets"])
  per_epoch = n // batch_size
  if per_epoch < 1:
    raise ValueError(f"config.train.batch_size={batch_size} is larger than "
                     f"the {n} RL prompts.")

  def plan(epoch):
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[:per_epoch * batch_size].reshape(per_epoch, batch_size)

  return pipeline.step_batches(
      num_steps, per_epoch, plan,
      lambda idx: {k: v[idx[process_rows]] for k, v in prompts.items()})


def eval_parts(sft_config, data: task.Data,
               pref_len: int) -> dict[str, dict[str, np.ndarray]]:
  """valid/test with prompts in "histories" and SASRec's "pref_histories"."""
  pref_split = data.dataset.split_leave_one_out(pref_len)
  out = {}
  for part in ("valid", "test"):
    p = task.eval_split(data.split[part], data.item_tokens, data.prefixes,
                       sft_config, data.vocab.pad_id, data.titles)
    pref = task.eval_users(pref_split[part], sft_config)
    if not np.array_equal(pref["users"], p["users"]):
      raise AssertionError(f"{part}: the two splits list different users.")
    p["pref_histories"] = pref["histories"]
    out[part] = p
  return out


def make_eval_step(sft_config, graphdef, data: task.Data, sasrec_graphdef,
                   judge_names=()):
  """`step({"policy", "tables"}, batch)`: the SFT evaluation plus the
  semantic / preference rewards (`reward/*`) and the held-out judges
  (`judge/*`, `judge_names`) of the top-1 and top-10 items."""
  base = sid_evaluation.make_eval_step(
      sft_config,
      graphdef,
      data.sids,
      data.vocab,
      data.dataset,
      format_check=False,
      return_items=True)
  names = [n for n in EVAL_REWARDS if n != "preference" or sasrec_graphdef]
  reward_fn = rewards_lib.make_reward_fn(names, sasrec_graphdef)
  depth = min(10, max(sft_config.eval.ks))

  def step(both, batch):
    out, items_bk = base(both["policy"], batch)
    b = items_bk.shape[0]
    # The top `depth` items of every user in one batch of rewards.
    rep = lambda x: jnp.repeat(x, depth, axis=0)
    inputs = rewards_lib.RewardInputs(
        items=items_bk[:, :depth].reshape(-1),
        targets=rep(batch["targets"]),
        seen=rep(batch["seen_items"]),
        pref_histories=rep(batch["pref_histories"]),
        format_ok=jnp.ones((b * depth,), bool),
        beam_items=jnp.zeros((b * depth, 0), jnp.int32))
    r_bjk = reward_fn(both["tables"], inputs).reshape(b, depth, -1)
    for k, name in enumerate(names):
      out[f"reward/{name}@1"] = r_bjk[:, 0, k]
      out[f"reward/{name}@{depth}"] = r_bjk[:, :, k].mean(1)
    if judge_names:
      out.update(
          judges_lib.judge_metrics(
              both["tables"],
              items_bk[:, :depth],
              batch["targets"],
              batch["seen_items"],
              names=judge_names,
              ks=sorted({1, depth})))
    return out

  return step

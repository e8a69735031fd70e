"""What the RL stage reads: prompts, evaluation parts, reward tables.

Pure data preparation on the host; `rl/trainer.py` wires it to the jitted
rollout, update and evaluation. The evaluation step is the SFT stage's
(trie-constrained beam, history excluded) plus the semantic and preference
rewards of the ranked items.
"""

from __future__ import annotations

import pathlib

from flax import nnx
import jax.numpy as jnp
import ml_collections
import numpy as np

from taiji_jax.cot import data as cot_data
from taiji_jax.rl import rewards as rewards_lib
from taiji_jax.train import build_sids
from taiji_jax.train import sasrec_trainer
from taiji_jax.train import sft
from taiji_jax.train import sft_data
from taiji_jax.train import sft_eval

EVAL_REWARDS = ("semantic", "preference")


def item_embeddings(config, sids_workdir: pathlib.Path, dataset,
                    workdir: pathlib.Path) -> np.ndarray:
  """(I + 1, D) L2-normalised text embeddings of every item; row 0 zeros.

  Reuses the sids stage's (`sids_workdir`) `embeddings/content.npz` when its cache key
  (encoder, path, hash of the item texts) matches, else encodes into
  `<workdir>/embeddings/content.npz`.
  """
  enc = config.text_encoder
  cfg = ml_collections.ConfigDict({
      "progress_bar": bool(config.progress_bar),
      "representation": {
          "text_encoder": enc.to_dict()
      },
  })
  texts = [dataset.item_text(i) for i in range(1, dataset.num_items + 1)]
  cached = build_sids.cached_key(sids_workdir / "embeddings" / "content.npz")
  source = sids_workdir if cached == build_sids.content_key(enc, texts) else (
      workdir)
  x = build_sids.content_embeddings(cfg, dataset, source)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return np.concatenate([np.zeros((1, x.shape[1]), np.float32), x])


def load_sasrec(path: pathlib.Path, dataset):
  """(graphdef, params, max_len) of the preference model, checked."""
  if not (path / "config.json").is_file():
    raise FileNotFoundError(
        f"the preference reward needs a trained SASRec in {path} (no "
        "config.json); run the sasrec stage or set config.sasrec_workdir.")
  model, sasrec_config = sasrec_trainer.load_scorer(path)
  if sasrec_config.dataset.name != dataset.name or (
      model.cfg.num_items != dataset.num_items):
    raise ValueError(f"{path}: SASRec was trained on "
                     f"{sasrec_config.dataset.name!r} with "
                     f"{model.cfg.num_items} items, the SFT model on "
                     f"{dataset.name!r} with {dataset.num_items}.")
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params, int(sasrec_config.max_len)


def right_align(histories: np.ndarray, length: int) -> np.ndarray:
  """The last `length` columns of right-aligned histories (zero-padded)."""
  h = histories.shape[1]
  if h >= length:
    return histories[:, h - length:]
  return np.pad(histories, ((0, 0), (length - h, 0)))


def training_prompts(config, sft_config, data: sft.Data,
                     pref_len: int) -> dict[str, np.ndarray]:
  """{"prompts", "seen", "targets", "users", "pref_histories"} of every RL
  prompt: each user's last `prompts_per_user` training targets."""
  longest = max(len(s) for s in data.split["train"]["sequences"])
  ex = cot_data.next_item_examples(data.split, int(config.prompts_per_user),
                                   max(longest, 1))
  prompts = sft_data.prompt_rows(
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


def eval_parts(sft_config, data: sft.Data,
               pref_len: int) -> dict[str, dict[str, np.ndarray]]:
  """valid/test with prompts in "histories" and SASRec's "pref_histories"."""
  pref_split = data.dataset.split_leave_one_out(pref_len)
  out = {}
  for part in ("valid", "test"):
    p = sft._eval_split(data.split[part], data.item_tokens, data.prefixes,  # pylint: disable=protected-access
                        sft_config, data.vocab.pad_id, data.titles)
    if not np.array_equal(pref_split[part]["users"], p["users"]):
      raise AssertionError(f"{part}: the two splits list different users.")
    p["pref_histories"] = pref_split[part]["histories"]
    out[part] = p
  return out


def make_eval_step(sft_config, graphdef, data: sft.Data, sasrec_graphdef):
  """`step({"policy", "tables"}, batch)`: the SFT evaluation plus the
  semantic / preference rewards of the top-1 and top-10 items."""
  base = sft_eval.make_eval_step(
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
    return out

  return step

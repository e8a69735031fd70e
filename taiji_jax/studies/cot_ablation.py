"""The reasoning ablation: SFT without CoT, direct CoT, RUPR CoT, RUPR + ORFT.

`run(config, workdir)` (`configs/ml100k_cot_ablation.py`,
`experiments/cot_ablation.py`) does, for every seed, into
`<workdir>/seed_<s>/`:

  base/       SFT on the packed next-item rows (`stages.sft`), the vocabulary
              trained with sample rationales in its corpus; ranked by the
              plain beam (reported as the reference row);
  data/       the CoT examples (each user's last `cot.per_user` training
              targets; with `cot.num_users` > 0 of a fixed sample of
              users) and k candidate rationales per example from the
              direct and the RUPR teacher (`candidates_<teacher>.json`,
              with what made them and `rationale_checks` rates):
              `cot.teacher` "attribute" (`teachers.AttributeTeacher`, from
              the data) or "chat" (`chat_teacher.ChatTeacher`: the instruct
              LLM `cot.chat.model` through its chat template);
  no_cot/     base fine-tuned on `[prompt] <think></think><answer>SID</answer>`
              rows (k copies per example, so as many steps as RUPR);
  direct/     ... on the direct teacher's rationales (no target seen);
  rupr/       ... on the RUPR teacher's rationales (target seen);
  orft/       ORFT: every RUPR candidate scored by the perplexity of the
              answer SID under `cot.orft.scorer` ("base": base/, which
              never trained on any candidate, the default; "rupr": the
              rupr/ model, fine-tuned on the very candidates it scores, so
              in sample: refused unless `cot.orft.allow_in_sample`),
              R = the `cot.orft.quantile` of those PPLs, kept if PPL < R
              (`orft_stats.json`, `orft_scores.npz`, `orft_ppl_hist.png`,
              and the kept set as `accepted.jsonl`: user, target,
              rationale, PPL per line);
  rupr_orft/  base fine-tuned on the kept RUPR rows only;
  rl/<run>/   RL from the `rl_runs.start` variant (default rupr_orft), one
              run per fixed weight and adaptive rule of `rl_runs`
              (`studies/rl_variants.py`: fixed_0.50, popo_light, popo), with
              `config.rl` (reasoning rollouts; the final parameters are
              evaluated, with the rewards and the held-out judges).

Each variant's directory also gets `samples.json`: what the model thinks
and recommends for the first test users (`sample_thoughts`).

Every fine-tune starts from base/'s best parameters with the same
optimizer settings and mixes `cot.replay` copies of base/'s own training rows
(packed next-item + alignment rows) into its CoT rows, so the SID task is
not forgotten, and every variant is evaluated with the same
think-then-recommend decoding (greedy rationale of at most `cot.max_think`
tokens, then the trie-constrained beam), so the rows differ only in the
training rationales. `<workdir>/results.json` holds each variant's
per-seed test metrics and their mean and sample standard deviation;
`<workdir>/table.md` the README table, `<workdir>/table_rl.md` the RL one
(the start model and every RL run: training rewards, judges, ranking,
think closed). A sub-run with a results.json is
reused, so re-running the command resumes where it stopped.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from taiji_jax import config_checks
from taiji_jax import config_lib
from taiji_jax import sharding
from taiji_jax.cot import chat_teacher
from taiji_jax.cot import data as cot_data
from taiji_jax.cot import orft
from taiji_jax.cot import rationale_checks
from taiji_jax.cot import teachers
from taiji_jax.sidlm import rows as sid_rows
from taiji_jax.sidlm import task
from taiji_jax.stages import artifacts
from taiji_jax.stages import sft as sft_stage
from taiji_jax.studies import rl_table
from taiji_jax.studies import rl_variants
from taiji_jax.train import metric_writer
from taiji_jax.train import workdir as workdir_lib

VARIANTS = ("no_cot", "direct", "rupr", "rupr_orft")
SCORERS = ("base", "rupr")
IN_SAMPLE_SCORERS = ("rupr",)  # trained on the candidates they score
TEACHERS = ("attribute", "chat")
ACCEPTED_FILE = "accepted.jsonl"
SAMPLES_FILE = "samples.json"
# Columns of the table: (results key, header).
TABLE_METRICS = (
    ("no_think/ndcg@10", "NDCG@10 without thinking"),
    ("recall@10", "Recall@10"),
    ("ndcg@10", "NDCG@10"),
    ("label_acc@1", "genre acc@1"),
    ("title_hit@10", "title hit@10"),
    ("think/closed", "think closed"),
    ("format/compliant", "format compliant"),
)
# The RL table's columns: the RL-vs-SFT study's, and whether thoughts close.
RL_TABLE_METRICS = rl_table.TABLE_METRICS + (("think/closed", "think closed"),)


def item_embeddings(sids_dir: pathlib.Path, dataset) -> np.ndarray | None:
  """(num_items + 1, D) text-encoder item vectors of the sids stage, or None.

  The RUPR teacher's content neighbours; without the sids stage's
  `embeddings/content.npz` it states no neighbour facts.
  """
  path = pathlib.Path(sids_dir) / "embeddings" / "content.npz"
  if not path.is_file():
    logging.warning("%s missing: the teacher states no content neighbours",
                    path)
    return None
  with np.load(path, allow_pickle=False) as f:
    x = f["x"]
  if x.shape[0] != dataset.num_items:
    raise ValueError(f"{path}: {x.shape[0]} item vectors for "
                     f"{dataset.num_items} items; rebuild the sids stage.")
  return np.concatenate([np.zeros((1, x.shape[1]), x.dtype), x])


def _finished(workdir: pathlib.Path) -> dict[str, Any] | None:
  path = workdir / "results.json"
  return json.loads(path.read_text()) if path.is_file() else None


def _fit(config, workdir, data, rows=None, extra=None) -> dict[str, Any]:
  done = _finished(workdir)
  if done is not None:
    workdir_lib.write_or_check_config(workdir, config)
    logging.info("%s: finished before, reusing its results", workdir)
    sft_stage.keep_vocab(workdir, data.vocab)
    return done
  return sft_stage.train_and_evaluate(
      config, workdir, data=data, rows=rows, extra_results=extra)


def teacher_spec(config: ml_collections.ConfigDict, name: str) -> dict:
  """What writes the `name` ("direct" / "rupr") candidates: the settings a
  cached candidates file must have been made with."""
  cot = config.cot
  if cot.teacher not in TEACHERS:
    raise ValueError(f"cot.teacher must be one of {TEACHERS}, got "
                     f"{cot.teacher!r}.")
  spec = {"teacher": cot.teacher, "direct": name == "direct"}
  if cot.teacher == "attribute":
    spec["max_sentences"] = int(cot.max_sentences)
  else:
    spec.update(cot.chat.to_dict())
  return spec


def make_teachers(config: ml_collections.ConfigDict, data,
                  item_emb: np.ndarray | None) -> dict[str, teachers.Teacher]:
  """{"direct", "rupr"} teachers of `cot.teacher` (the chat model loaded
  once for both)."""
  cot = config.cot
  teacher_spec(config, "rupr")  # checks cot.teacher
  if cot.teacher == "attribute":
    return {
        name: teachers.AttributeTeacher(
            data.dataset,
            item_emb,
            direct=name == "direct",
            max_sentences=cot.max_sentences) for name in ("direct", "rupr")
    }
  chat = cot.chat
  rupr = chat_teacher.load(
      chat.model,
      data.dataset,
      data.sids.codebook_sizes,
      max_items=chat.max_items,
      max_new_tokens=chat.max_new_tokens,
      temperature=chat.temperature,
      batch_size=chat.batch_size,
      noun=chat.noun)
  return {"rupr": rupr, "direct": rupr.variant(True)}


def _candidates(make_teacher, spec, examples, k, seed, path: pathlib.Path,
                checker: rationale_checks.RationaleChecker):
  """Cached `cot_data.candidate_rationales` (JSON in the seed's data/): a
  file made for other examples, k or teacher settings (`spec`) is made
  again. `make_teacher()` is only called when nothing is cached."""
  if path.is_file():
    cached = json.loads(path.read_text())
    if (cached["num_examples"] == len(examples["targets"]) and
        cached["k"] == k and cached.get("teacher") == spec):
      return {"example": np.asarray(cached["example"]), "texts": cached["texts"]}
    logging.info("%s: made for other settings; writing it again", path)
  out = cot_data.candidate_rationales(make_teacher(), examples, k, seed)
  targets = None if spec["direct"] else examples["targets"][out["example"]]
  if jax.process_index() == 0:
    metric_writer.write_json_atomic(
        path, {
            "num_examples": len(examples["targets"]),
            "k": k,
            "teacher": spec,
            "checks": checker.summarize(out["texts"], targets),
            "example": out["example"].tolist(),
            "texts": out["texts"],
        })
  return out


def fine_tune_config(config: ml_collections.ConfigDict, seed: int,
                     base_dir: pathlib.Path) -> ml_collections.ConfigDict:
  """The SFT config of a CoT fine-tune from base/ (module docstring)."""
  cot = config.cot
  return config_lib.with_overrides(
      config.sft, **{
          "seed": seed,
          "init_from": str(base_dir),
          "train.num_epochs": cot.epochs,
          "train.lr": cot.lr,
          "train.warmup_steps": cot.warmup_steps,
          "eval.every_epochs": 1,
          "eval.think": True,
          "eval.max_think": cot.max_think,
      })


def check_scorer(config: ml_collections.ConfigDict) -> str:
  """`cot.orft.scorer`, refused when it scores in sample without
  `cot.orft.allow_in_sample` (its perplexities then say what it memorised,
  not how well a rationale supports the answer)."""
  orft_config = config.cot.orft
  scorer = orft_config.scorer
  if scorer not in SCORERS:
    raise ValueError(f"cot.orft.scorer must be one of {SCORERS}, got "
                     f"{scorer!r}.")
  if scorer in IN_SAMPLE_SCORERS and not orft_config.allow_in_sample:
    raise ValueError(
        f"cot.orft.scorer={scorer!r} was fine-tuned on the candidates it "
        "would score (in-sample perplexities); use 'base', or set "
        "cot.orft.allow_in_sample=True to ask for it explicitly.")
  return scorer


def orft_filter(config, root: pathlib.Path, data, examples, candidates,
                prompts, length) -> tuple[np.ndarray, dict[str, Any]]:
  """ORFT on the RUPR candidates: (accepted mask, stats); cached."""
  out = root / "orft"
  scorer = check_scorer(config)
  scores = out / orft.SCORES_FILE
  if scores.is_file() and (out / orft.STATS_FILE).is_file():
    with np.load(scores) as f:
      if len(f["ppl"]) == len(candidates["texts"]):
        return f["accepted"], json.loads((out / orft.STATS_FILE).read_text())
  rows = cot_data.rows_for(examples, candidates["example"],
                           candidates["texts"], prompts, data.item_tokens,
                           data.vocab, config.cot.max_think, "answer", length)
  model, setup = artifacts.sft_decoder(root / scorer, data)
  with sharding.use_mesh(setup.mesh,
                         tuple(tuple(r) for r in config.sft.sharding_rules)):
    ppl = orft.answer_perplexity(
        model,
        rows["tokens"],
        rows["loss_mask"],
        data.vocab.pad_id,
        config.cot.orft.batch_size,
        put=setup.put_batch)
  r = orft.threshold(ppl, config.cot.orft.quantile)
  accepted = orft.accept(ppl, r)
  stats = orft.write_report(out, ppl, accepted, candidates["example"], r)
  if jax.process_index() == 0:
    _write_accepted(out / ACCEPTED_FILE, examples, candidates, ppl, accepted)
  stats["scorer"] = scorer
  stats["scorer_workdir"] = str(root / scorer)
  stats["in_sample"] = scorer in IN_SAMPLE_SCORERS
  stats["quantile"] = float(config.cot.orft.quantile)
  metric_writer.write_json_atomic(out / orft.STATS_FILE, stats)
  return accepted, stats


def _write_accepted(path: pathlib.Path, examples, candidates, ppl,
                    accepted) -> None:
  """The kept candidates, one JSON line each: user, target, rationale, ppl."""
  tmp = path.with_name(path.name + ".tmp")
  with tmp.open("w") as f:
    for j in np.flatnonzero(accepted):
      e = int(candidates["example"][j])
      f.write(
          json.dumps({
              "user": int(examples["users"][e]),
              "target": int(examples["targets"][e]),
              "rationale": candidates["texts"][j],
              "ppl": float(ppl[j]),
          }) + "\n")
  os.replace(tmp, path)


def run_seed(config: ml_collections.ConfigDict, root: pathlib.Path,
             seed: int) -> dict[str, Any]:
  """Base, data, the four variants and ORFT of one seed (module docstring)."""
  cot = config.cot
  base_config = config_lib.with_overrides(config.sft, seed=seed)
  base_dir = root / "base"
  base_dir.mkdir(parents=True, exist_ok=True)
  sids_dir = artifacts.sids_dir(base_config, base_dir)

  def vocab_texts(dataset):
    split = dataset.split_leave_one_out(base_config.max_items)
    return cot_data.vocabulary_texts(dataset,
                                     item_embeddings(sids_dir, dataset),
                                     split, cot.vocab_examples, 2, seed)

  data = sft_stage.prepare(base_config, base_dir, vocab_texts)
  out = {"base": _fit(base_config, base_dir, data)}

  examples = cot_data.next_item_examples(data.split, cot.per_user,
                                         base_config.max_items)
  # cot.num_users > 0: the examples of a fixed sample of users only.
  keep = sid_rows.fixed_users(examples["users"], cot.num_users,
                              "cot.num_users")
  examples = {key: v[keep] for key, v in examples.items()}
  prompts = sid_rows.prompt_rows(examples["histories"], examples["users"],
                                 data.item_tokens, data.prefixes,
                                 base_config.max_items, base_config.max_prefix,
                                 data.vocab.pad_id)
  length = prompts.shape[1] + cot.max_think + 4 + data.item_tokens.shape[1]
  emb = item_embeddings(sids_dir, data.dataset)
  made = {}

  def teacher(name):
    if not made:
      made.update(make_teachers(config, data, emb))
    return made[name]

  checker = rationale_checks.RationaleChecker(data.dataset)
  cands = {
      name:
          _candidates(
              functools.partial(teacher, name), teacher_spec(config, name),
              examples, cot.k, seed, root / "data" / f"candidates_{name}.json",
              checker) for name in ("direct", "rupr")
  }
  made.clear()  # the chat teacher's parameters are not needed any more
  n = len(examples["targets"])
  cands["no_cot"] = {"example": np.repeat(np.arange(n), cot.k),
                     "texts": [""] * (n * cot.k)}
  tune = fine_tune_config(config, seed, base_dir)
  # The base's own rows, mixed into every fine-tune (cot.replay copies).
  packed = task.training_rows(base_config, data.dataset, data.split, data.vocab,
                             data.item_tokens, data.prefixes, data.titles)
  replay = {
      key: np.concatenate([packed[key]] * cot.replay)
      if cot.replay > 0 else packed[key][:0] for key in ("tokens", "loss_mask")
  }
  orft_stats = None
  for variant in cot.variants:
    c = cands["rupr" if variant == "rupr_orft" else variant]
    example_ids, texts = c["example"], c["texts"]
    if variant == "rupr_orft":
      accepted, orft_stats = orft_filter(config, root, data, examples,
                                         cands["rupr"], prompts, length)
      example_ids = example_ids[accepted]
      texts = [t for t, a in zip(texts, accepted) if a]
    rows = cot_data.rows_for(examples, example_ids, texts, prompts,
                             data.item_tokens, data.vocab, cot.max_think,
                             "reasoning", length)
    rationale_tokens = rows["loss_mask"].sum(1) - 4 - data.item_tokens.shape[1]
    extra = {
        "variant": variant,
        "cot_examples": n,
        "cot_rows": int(len(example_ids)),
        "mean_rationale_tokens": float(np.mean(rationale_tokens)),
        "replay_rows": int(len(replay["tokens"])),
    }
    rows = concat_rows(rows, replay, data.vocab.pad_id)
    if variant == "rupr_orft":
      extra["orft"] = orft_stats
    out[variant] = _fit(tune, root / variant, data, rows, extra)
    if "test_no_think" not in out[variant]:
      out[variant]["test_no_think"] = evaluate_without_thinking(
          tune, root / variant, data)
      if jax.process_index() == 0:
        metric_writer.write_json_atomic(root / variant / "results.json",
                                        out[variant])
    sample_thoughts(tune, root / variant, data)
  if rl_variants.variants(config.rl_runs):
    out["rl"] = rl_variants.run(config.rl, config.rl_runs,
                                root / config.rl_runs.start, root / "rl", seed)
  return out


def concat_rows(a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                pad_id: int) -> dict[str, np.ndarray]:
  """{"tokens", "loss_mask"} of a then b, left-padded to the longer length."""
  length = max(a["tokens"].shape[1], b["tokens"].shape[1])

  def widen(x, fill):
    out = np.full((len(x), length), fill, x.dtype)
    out[:, length - x.shape[1]:] = x
    return out

  return {
      "tokens":
          np.concatenate([widen(a["tokens"], pad_id),
                          widen(b["tokens"], pad_id)]),
      "loss_mask":
          np.concatenate(
              [widen(a["loss_mask"], False),
               widen(b["loss_mask"], False)]),
  }


def evaluate_without_thinking(config: ml_collections.ConfigDict,
                              workdir: pathlib.Path, data) -> dict[str, Any]:
  """Test metrics of a fine-tuned model's plain SID beam (no <think>).

  The beam starts right after the prompt, as the base's packed rows teach:
  what the CoT rows did to the recommender itself, apart from reasoning at
  inference.
  """
  plain = config_lib.with_overrides(config, **{"eval.think": False})
  _, setup = artifacts.sft_decoder(workdir, data)
  step = task.build(plain, task.model_config(plain, data.vocab.size),
                   plain.train.warmup_steps + 2, setup.mesh, data.sids,
                   data.vocab, data.dataset).eval_step
  params = artifacts.sft_best_params(workdir, setup, config)
  return task.evaluate_split(plain, setup, step, params, data, "test")


def sample_thoughts(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                    data, num_users: int = 8) -> list[dict[str, Any]]:
  """What a fine-tuned model writes for the first test users; cached.

  Decodes `num_users` test prompts with the run's own think-then-recommend
  settings and writes `<workdir>/samples.json`: per user the generated
  rationale, whether the model closed it, the top-5 items and the target.
  """
  path = workdir / SAMPLES_FILE
  if path.is_file():
    return json.loads(path.read_text())
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from taiji_jax.generate import \
      think as think_lib  # pylint: disable=g-import-not-at-top
  model, setup = artifacts.sft_decoder(workdir, data)
  test = data.split["test"]
  n = min(num_users, len(test["targets"]))
  prompts = sid_rows.prompt_rows(test["histories"][:n], test["users"][:n],
                                 data.item_tokens, data.prefixes,
                                 config.max_items, config.max_prefix,
                                 data.vocab.pad_id)
  v = data.vocab

  @nnx.jit
  def decode(model, prompts, seen):
    return think_lib.think_then_recommend(
        model,
        prompts,
        data.sids.trie,
        tuple(int(o) for o in v.level_offsets),
        5,
        think_id=v.think_id,
        think_end_id=v.think_end_id,
        answer_id=v.answer_id,
        allowed_v=think_lib.think_token_mask(v.text_mask(), v.think_end_id),
        max_think=int(config.eval.max_think),
        pad_id=v.pad_id,
        exclude_bh=seen,
        paths=data.sids.paths)

  out = decode(model, prompts, test["seen_items"][:n])
  tokens, length = np.asarray(out.thought.tokens), np.asarray(
      out.thought.length)
  ds = data.dataset
  samples = [{
      "user": int(test["users"][j]),
      "rationale": v.decode(tokens[j, :length[j]].tolist()),
      "closed": bool(out.thought.closed[j]),
      "top5": [ds.item_text(int(i)) for i in np.asarray(out.items[j]) if i],
      "target": ds.item_text(int(test["targets"][j])),
  } for j in range(n)]
  if jax.process_index() == 0:
    metric_writer.write_json_atomic(path, samples)
  return samples


def summarize(per_seed: dict[int, dict[str, dict]]) -> dict[str, Any]:
  """{variant: {metric: {"mean", "std", "values"}}} over seeds (test split).

  `std` is the sample standard deviation (ddof = 1; 0 for one seed).
  """
  out = {}
  variants = [v for v in next(iter(per_seed.values())) if v != "rl"]
  for variant in variants:
    rows = [per_seed[s][variant] for s in per_seed]
    tests = []
    for r in rows:
      # The plain beam's metrics: a thinking run's extra evaluation, or a
      # plain run's own.
      plain = r.get("test_no_think",
                    r["test"] if "think/closed" not in r["test"] else {})
      tests.append({
          **r["test"],
          **{f"no_think/{k}": v for k, v in plain.items()}
      })
    names = sorted(set.intersection(*(set(t) for t in tests)))
    entry = {}
    for name in names:
      entry[name] = workdir_lib.seed_stats(t[name] for t in tests)
    entry["train_rows"] = [r.get("cot_rows", r.get("train_rows")) for r in rows]
    entry["steps"] = [r.get("steps") for r in rows]
    out[variant] = entry
  return out


def summarize_rl(per_seed: dict[int, dict[str, dict]]) -> dict[str, Any]:
  """{run: {metric: stats}} of the RL runs' final parameters on test, the
  start model first ("sft"); empty without RL runs."""
  seeds = [s for s in per_seed if "rl" in per_seed[s]]
  if not seeds:
    return {}
  out = {}
  for name in per_seed[seeds[0]]["rl"]:
    tests = [per_seed[s]["rl"][name]["test"] for s in seeds]
    names = sorted(set.intersection(*(set(t) for t in tests)))
    out[name] = {k: workdir_lib.seed_stats(t[k] for t in tests) for k in names}
  return out


def format_rl_table(summary_rl: dict[str, Any], start: str) -> str:
  """The markdown RL table (mean ± std over the seeds)."""
  return workdir_lib.seed_table(
      [(f"{start} (RL start)" if name == "sft" else name, entry)
       for name, entry in summary_rl.items()], RL_TABLE_METRICS)


def format_table(summary: dict[str, Any]) -> str:
  """The markdown table of `summarize` (mean ± std over the seeds)."""
  names = {"base": "packed SFT only (plain beam, no think)",
           "no_cot": "SFT without CoT (`<think></think>`)",
           "direct": "direct-distilled CoT",
           "rupr": "RUPR CoT",
           "rupr_orft": "RUPR + ORFT"}
  return workdir_lib.seed_table(
      [(names.get(variant, variant), entry)
       for variant, entry in summary.items()], TABLE_METRICS)


def check_settings(config: ml_collections.ConfigDict) -> None:
  """The ablation's own settings, before anything runs (named errors)."""
  cot = config.cot
  for variant in cot.variants:
    if variant not in VARIANTS:
      raise ValueError(f"cot.variants: unknown variant {variant!r}; known "
                       f"{VARIANTS}.")
  teacher_spec(config, "rupr")
  config_checks.positive(cot, ("k", "per_user", "max_think", "epochs"), "cot")
  config_checks.positive(cot, ("num_users",), "cot", allow_zero=("num_users",))
  if "rupr_orft" in cot.variants:
    check_scorer(config)
    config_checks.in_range(cot, "orft.quantile", 0.0, 1.0, "cot")
  if cot.teacher == "chat":
    config_checks.positive(
        cot.chat, ("max_items", "max_new_tokens", "temperature", "batch_size"),
        "cot.chat")
  if rl_variants.check(config.rl, config.rl_runs):
    if config.rl_runs.start not in cot.variants:
      raise ValueError(f"rl_runs.start={config.rl_runs.start!r} is not one "
                       f"of cot.variants {tuple(cot.variants)}.")


def run(config: ml_collections.ConfigDict,
        workdir: os.PathLike | str) -> dict[str, Any]:
  """Every seed, then results.json and table.md (module docstring); the
  settings are checked before the workdir is touched."""
  check_settings(config)
  return _run(config, workdir)


@workdir_lib.one_run_at_a_time
def _run(config: ml_collections.ConfigDict,
         workdir: os.PathLike | str) -> dict[str, Any]:
  workdir = pathlib.Path(workdir)
  per_seed = workdir_lib.run_seeds(config, workdir, run_seed)
  summary = summarize(per_seed)
  orft_runs = {
      s: r["rupr_orft"].get("orft") for s, r in per_seed.items()
      if "rupr_orft" in r
  }
  summary_rl = summarize_rl(per_seed)
  results = {
      "summary": summary,
      "summary_rl": summary_rl,
      "orft": orft_runs,
      "per_seed": {str(s): r for s, r in per_seed.items()},
      "seeds": [int(s) for s in config.seeds],
  }
  table = format_table(summary)
  if jax.process_index() == 0:
    metric_writer.write_json_atomic(workdir / "results.json", results)
    (workdir / "table.md").write_text(table + "\n")
    if summary_rl:
      rl_md = format_rl_table(summary_rl, config.rl_runs.start)
      (workdir / "table_rl.md").write_text(rl_md + "\n")
      table += "\n\n" + rl_md
  print(table)
  return results

"""The instruct-LLM teacher: chat template, prompts, sampling, claim checks."""

import json
import types

import numpy as np
import pytest

from taiji_jax import config_lib
from taiji_jax.cot import chat_teacher
from taiji_jax.cot import data as cot_data
from taiji_jax.cot import rationale_checks
from taiji_jax.data import load_dataset
from taiji_jax.models import gguf_import
from taiji_jax.models import hf_import
from taiji_jax.studies import cot_ablation
from taiji_jax.testing import gguf as gguf_testing
from taiji_jax.text import chat_template

SIZES = (8, 8, 6)
MAX_LEN = 6


@pytest.fixture(scope="module")
def dataset():
  return load_dataset("synthetic", num_users=30, num_items=40, seed=1)


@pytest.fixture(scope="module")
def examples(dataset):
  split = dataset.split_leave_one_out(max_len=MAX_LEN)
  ex = cot_data.next_item_examples(split, 1, MAX_LEN)
  return {k: v[:5] for k, v in ex.items()}


@pytest.fixture(scope="module")
def teacher(dataset):
  return chat_teacher.load(
      gguf_import.TINY_RANDOM_LLAMA,
      dataset,
      SIZES,
      max_items=MAX_LEN,
      max_new_tokens=10,
      batch_size=8)


def test_render_is_the_chatml_of_the_messages():
  text = chat_template.render(chat_template.CHATML, [{
      "role": "system",
      "content": "S"
  }, {
      "role": "user",
      "content": "hi\nthere"
  }])
  assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi\n"
                  "there<|im_end|>\n<|im_start|>assistant\n")
  no_prompt = chat_template.render(
      chat_template.CHATML, [{"role": "user", "content": "x"}],
      add_generation_prompt=False)
  assert no_prompt == "<|im_start|>user\nx<|im_end|>\n"
  with pytest.raises(chat_template.ChatTemplateError, match="role"):
    chat_template.render(chat_template.CHATML, [{"role": "bot", "content": ""}])
  with pytest.raises(chat_template.ChatTemplateError, match="bad input"):
    chat_template.render("{{ raise_exception('bad input') }}", [])
  # Undefined names are errors, not empty strings.
  with pytest.raises(chat_template.ChatTemplateError):
    chat_template.render("{{ bos_token }}", [])


def test_the_format_comes_from_the_checkpoint_or_is_refused(tmp_path):
  fmt = chat_template.from_checkpoint(gguf_import.TINY_RANDOM_LLAMA)
  assert fmt.template == chat_template.CHATML
  assert fmt.end_of_turn == "<|im_end|>"
  cfg = gguf_testing.tiny_llama_config()
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from taiji_jax.models import \
      decoder as decoder_lib  # pylint: disable=g-import-not-at-top
  bare = tmp_path / "bare.gguf"
  gguf_testing.write_gguf(
      bare, cfg, decoder_lib.Decoder(cfg, rngs=nnx.Rngs(0)), chat=None)
  with pytest.raises(chat_template.ChatTemplateError, match="bare.gguf"):
    chat_template.from_checkpoint(bare)
  hf = tmp_path / "hf"
  hf.mkdir()
  with pytest.raises(chat_template.ChatTemplateError, match="no chat template"):
    chat_template.from_checkpoint(hf)
  (hf / "tokenizer_config.json").write_text(
      json.dumps({"chat_template": "T", "eos_token": {"content": "<e>"}}))
  assert chat_template.from_checkpoint(hf).end_of_turn == "<e>"


def test_the_direct_prompt_never_depends_on_the_target(teacher, dataset,
                                                         examples):
  direct = teacher.variant(True)
  for u, h, t in zip(examples["users"], examples["histories"],
                     examples["targets"]):
    other = t % dataset.num_items + 1
    text = direct.prompt_text(u, h, t)
    assert text == direct.prompt_text(u, h, other) == direct.prompt_text(
        u, h, None)
    rupr = teacher.prompt_text(u, h, t)
    target_line = f"Next they chose: {chat_teacher.describe_item(dataset, t)}."
    assert target_line in rupr and "Next they chose" not in text
    # The same history, oldest first, in both.
    for j, i in enumerate(h[h > 0], 1):
      line = f"{j}. {chat_teacher.describe_item(dataset, int(i))}"
      assert line in rupr and line in text
    assert rupr.startswith("<|im_start|>system\n" + chat_teacher.SYSTEM)
    assert rupr.endswith("<|im_start|>assistant\n")
  # Prompts become the tokenizer's ids: the chat markers are single tokens.
  ids = teacher.prompts(examples["users"][:1], examples["histories"][:1],
                        examples["targets"][:1])[0]
  im_start = teacher.vocab.encode("<|im_start|>")
  assert len(im_start) == 1 and np.sum(ids == im_start[0]) == 3


def test_describe_item_names_the_features(dataset):
  f = dataset.item_features
  text = chat_teacher.describe_item(dataset, 3)
  assert text.startswith(f["title"][3])
  for label in rationale_checks.teachers_lib.item_labels(f["category"][3]):
    assert label in text


def test_rationales_are_k_text_samples_deterministic_in_the_seed(
    teacher, examples):
  out = cot_data.candidate_rationales(teacher, examples, 3, seed=0)
  assert len(out["texts"]) == 15
  assert out["texts"] == cot_data.candidate_rationales(teacher, examples, 3,
                                                       0)["texts"]
  assert out["texts"] != cot_data.candidate_rationales(teacher, examples, 3,
                                                       1)["texts"]
  vocab = teacher.vocab
  text_ids = np.flatnonzero(vocab.text_mask())
  # The checkpoint's unused padding rows (GGUF token type 5) are not text.
  assert not vocab.text_mask()[vocab.encode("<unused0>")[0]]
  for text in out["texts"]:
    ids = vocab.encode(text)
    # Text tokens only: no chat marker, SID or our marker.
    assert set(ids) <= set(text_ids.tolist()), text
    assert "<unused" not in text
  direct = cot_data.candidate_rationales(teacher.variant(True), examples, 3, 0)
  assert direct["texts"] != out["texts"]
  with pytest.raises(ValueError, match="RUPR teacher needs"):
    teacher.rationales_batch(examples["users"], examples["histories"], None, 2,
                             0)


def test_the_teacher_is_the_checkpoint_as_it_is(teacher):
  """Growing the embedding for <pad> leaves every old logit unchanged."""
  _, raw = hf_import.load_hf_checkpoint(gguf_import.TINY_RANDOM_LLAMA)
  ids = np.asarray([teacher.vocab.encode("<|im_start|>user\nthe cat")])
  a = np.asarray(teacher.decoder(ids))
  b = np.asarray(raw(ids))
  np.testing.assert_allclose(a[..., :b.shape[-1]], b, atol=1e-5)


def test_bad_settings_are_named_errors(teacher, dataset):
  with pytest.raises(ValueError, match="temperature"):
    chat_teacher.ChatTeacher(teacher.decoder, teacher.vocab, teacher.chat,
                             dataset, temperature=0)
  other = types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=3))
  with pytest.raises(ValueError, match="!= vocab.size .*extend_vocab"):
    chat_teacher.ChatTeacher(other, teacher.vocab, teacher.chat, dataset)
  fmt = chat_template.ChatFormat(chat_template.CHATML, "no such token", "x")
  with pytest.raises(ValueError, match="end-of-turn"):
    chat_teacher.ChatTeacher(teacher.decoder, teacher.vocab, fmt, dataset)
  with pytest.raises(ValueError, match="out of range"):
    teacher.prompt_text(1, np.asarray([0, 5]), dataset.num_items + 1)
  with pytest.raises(ValueError, match="empty history"):
    teacher.prompt_text(1, np.asarray([0, 0]), 3)


def test_checks_flag_lists_leaks_and_labels_the_target_lacks(dataset):
  checker = rationale_checks.RationaleChecker(dataset)
  f = dataset.item_features
  target = 3
  own = rationale_checks.teachers_lib.item_labels(f["category"][target])[0]
  others = [
      c for c in checker.vocabulary["category"] if c != own and c not in
      rationale_checks.teachers_lib.item_labels(f["category"][target])
  ]
  good = checker.check(f"They like {own.upper()} stories lately.", target)
  assert good == {
      "list_like": False,
      "labels": [own],
      "names_target": False,
      "off_target_labels": []
  }
  bad = checker.check(f"1. Mostly {others[0]}s, it seems.", target)
  assert bad["list_like"] and not bad["names_target"]
  assert bad["off_target_labels"] == [others[0]]
  assert checker.check(f"{f['title'][target].upper()}!", target)["names_target"]
  # Whole words only.
  assert checker.labels(f"un{own}like") == ()
  s = checker.summarize(["", f"{own} again.", "- a list"], [target] * 3)
  assert s["num"] == 3 and s["empty"] == pytest.approx(1 / 3)
  assert s["list_like"] == pytest.approx(1 / 3)
  assert s["names_a_label"] == pytest.approx(1 / 3)
  assert s["off_target_label"] == 0.0


def _ablation_config(**overrides):
  config = config_lib.load_config_file(
      cot_ablation.pathlib.Path(__file__).resolve().parents[1] / "configs" /
      "ml100k_cot_ablation.py", "smoke")
  return config_lib.with_overrides(config, **overrides)


def test_ablation_settings_are_checked_before_anything_runs(tmp_path):
  with pytest.raises(ValueError, match="in-sample"):
    cot_ablation.run(_ablation_config(**{"cot.orft.scorer": "rupr"}), tmp_path)
  cot_ablation.check_settings(
      _ablation_config(**{
          "cot.orft.scorer": "rupr",
          "cot.orft.allow_in_sample": True
      }))
  with pytest.raises(ValueError, match="cot.teacher"):
    cot_ablation.check_settings(_ablation_config(**{"cot.teacher": "gpt"}))
  with pytest.raises(ValueError, match="cot.chat.temperature"):
    cot_ablation.check_settings(
        _ablation_config(**{
            "cot.teacher": "chat",
            "cot.chat.temperature": 0.0
        }))
  with pytest.raises(ValueError, match="unknown variant"):
    cot_ablation.check_settings(_ablation_config(**{"cot.variants": ("x",)}))
  assert not any(tmp_path.iterdir())


def test_cached_candidates_are_remade_for_another_teacher(
    tmp_path, dataset, examples):
  checker = rationale_checks.RationaleChecker(dataset)
  calls = []

  class Fixed(rationale_checks.teachers_lib.Teacher):

    def rationales(self, user, history_items, target_item, k, seed):
      calls.append(user)
      return [f"{len(calls)}"] * k

  path = tmp_path / "candidates_rupr.json"
  spec = {"teacher": "attribute", "direct": False, "max_sentences": 4}
  a = cot_ablation._candidates(Fixed, spec, examples, 2, 0, path, checker)  # pylint: disable=protected-access
  n = len(calls)
  b = cot_ablation._candidates(Fixed, spec, examples, 2, 0, path, checker)  # pylint: disable=protected-access
  assert b["texts"] == a["texts"] and len(calls) == n  # reused
  saved = json.loads(path.read_text())
  assert saved["teacher"] == spec and saved["checks"]["num"] == 2 * n
  other = dict(spec, max_sentences=1)
  c = cot_ablation._candidates(Fixed, other, examples, 2, 0, path, checker)  # pylint: disable=protected-access
  assert len(calls) == 2 * n and c["texts"] != a["texts"]

"""A checkpoint's chat template, rendered as Hugging Face tokenizers do.

An instruct model answers well only when prompted in the format it was
tuned on. That format is data in the checkpoint: a Jinja template in the
GGUF metadata (`tokenizer.chat_template`) or in a Hugging Face directory
(`tokenizer_config.json`'s "chat_template", or a `chat_template.jinja`
file). `from_checkpoint` reads it with the token that ends an assistant turn
(the checkpoint's EOS: `<|im_end|>` for SmolLM2), and `render` applies it
the way `transformers`' `apply_chat_template` does: a sandboxed Jinja
environment with `trim_blocks` and `lstrip_blocks`, `messages` as a list of
{"role", "content"} dicts, `add_generation_prompt` opening the assistant
turn, and `raise_exception` for templates that validate their input.

A checkpoint without a template is refused (naming the file) unless one is
given: `CHATML` is the generic ChatML template, for a model known to use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Mapping, Sequence

import jinja2
from jinja2 import sandbox

from taiji_jax.models import gguf_import

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] "
          "+ '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
  """A missing or unusable chat template (the message names the source)."""


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """A chat template and the token string that ends the assistant's turn."""
  template: str
  end_of_turn: str
  source: str


def _raise(message):
  raise ChatTemplateError(f"chat template: {message}")


def _environment() -> sandbox.ImmutableSandboxedEnvironment:
  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
  env.globals["raise_exception"] = _raise
  return env


def render(template: str,
           messages: Sequence[Mapping[str, str]],
           add_generation_prompt: bool = True,
           **context) -> str:
  """The prompt text of `messages` under `template`.

  Raises:
    ChatTemplateError: a message without a known role or string content, or
      a template that does not parse or raises.
  """
  for j, m in enumerate(messages):
    if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
      raise ChatTemplateError(f"message {j} must have a role in {ROLES} and "
                              f"string content, got {dict(m)!r}.")
  try:
    compiled = _environment().from_string(template)
    return compiled.render(
        messages=[dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        **context)
  except jinja2.TemplateError as e:
    raise ChatTemplateError(f"chat template does not render: {e}") from e


def _hf_directory(directory: pathlib.Path) -> ChatFormat:
  config_path = directory / "tokenizer_config.json"
  config = (json.loads(config_path.read_text())
            if config_path.is_file() else {})
  jinja_path = directory / "chat_template.jinja"
  template = (jinja_path.read_text() if jinja_path.is_file() else
              config.get("chat_template"))
  if isinstance(template, list):  # named templates: take "default"
    template = {t.get("name"): t.get("template") for t in template
               }.get("default")
  if not template:
    raise ChatTemplateError(
        f"{directory}: no chat template (neither chat_template.jinja nor "
        "tokenizer_config.json's chat_template); give one explicitly, e.g. "
        "chat_template.CHATML for a ChatML model.")
  eos = config.get("eos_token")
  if isinstance(eos, dict):
    eos = eos.get("content")
  if not eos:
    raise ChatTemplateError(f"{config_path}: no eos_token, so the end of the "
                            "assistant's turn is unknown.")
  return ChatFormat(template, eos, str(directory))


def from_checkpoint(path_or_name: os.PathLike | str) -> ChatFormat:
  """The chat template and end-of-turn token of a checkpoint: a .gguf file,
  a `gguf_import.PRETRAINED` name, or a Hugging Face directory.

  Raises:
    ChatTemplateError: the checkpoint has no template or no EOS token.
  """
  gguf = gguf_import.gguf_path(path_or_name)
  if gguf is None:
    return _hf_directory(pathlib.Path(path_or_name))
  meta = gguf_import.GGUFFile(gguf).metadata
  template = meta.get("tokenizer.chat_template")
  if not template:
    raise ChatTemplateError(
        f"{gguf}: no tokenizer.chat_template in the metadata; give one "
        "explicitly, e.g. chat_template.CHATML for a ChatML model.")
  eos = meta.get("tokenizer.ggml.eos_token_id")
  tokens = meta.get("tokenizer.ggml.tokens")
  if eos is None or tokens is None or not 0 <= int(eos) < len(tokens):
    raise ChatTemplateError(f"{gguf}: no valid tokenizer.ggml.eos_token_id, "
                            "so the end of the assistant's turn is unknown.")
  return ChatFormat(str(template), str(tokens[int(eos)]), str(gguf))

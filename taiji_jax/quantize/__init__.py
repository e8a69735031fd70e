"""Item tokenizers: quantizers, collision handling and semantic IDs.

Pure functions over arrays:
  kmeans       k-means++ / Lloyd / balanced assignment, chunked for 1M items
  residual     residual encode/decode shared by both quantizers
  rq_kmeans    OneRec's residual k-means
  rq_vae       TIGER's RQ-VAE (Flax NNX, optax)
  collisions   collision statistics; TIGER extra level or GR4AD hash level
  fusion       content + collaborative representation fusion
  quality      utilisation, entropy, reconstruction, label-purity report
  semantic_ids `SemanticIds`: unique codes, item<->SID maps, jit-able trie
"""

from taiji_jax.quantize.semantic_ids import SemanticIdError
from taiji_jax.quantize.semantic_ids import SemanticIds
from taiji_jax.quantize.semantic_ids import walk_trie

"""Tiny decoders with random parameters for decoding and RL tests."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from taiji_jax.models import decoder as decoder_lib


def random_decoder(vocab_size: int,
                   seed: int = 1,
                   std: float = 0.5,
                   max_seq_len: int = 128) -> decoder_lib.Decoder:
  """`DecoderConfig.tiny` with every parameter drawn from N(0, std^2).

  A large std puts the logits far from uniform, so greedy choices have
  clear margins and depend on the context.
  """
  cfg = decoder_lib.DecoderConfig.tiny(
      vocab_size=vocab_size, max_seq_len=max_seq_len)
  graphdef, state = nnx.split(decoder_lib.abstract_decoder(cfg))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(
      lambda s: jnp.asarray(std * rng.normal(size=s.shape), s.dtype), state)
  return nnx.merge(graphdef, state)

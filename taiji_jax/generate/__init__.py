"""Decoding: trie-constrained beam search and sampling over semantic IDs."""

"""Flax NNX models: SASRec (CF baseline and preference reward model)."""

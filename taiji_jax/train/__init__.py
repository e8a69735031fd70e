"""Trainers: pure train steps, host loops, checkpoints and metric writing."""

"""Checkpoints: saving, pruning, verifying and loading the run's DeepSpeed checkpoints."""

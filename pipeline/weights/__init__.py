"""Weights I/O: DeepSpeed checkpoints to tensors, pretrained starts, head and table adaptation."""

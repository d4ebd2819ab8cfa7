"""Training and evaluation input: shard streams, decoding, augmentation, batching."""

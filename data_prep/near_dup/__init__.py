"""Near-duplicate detection: perceptual hashes (hashing.py), multi-index hashing (index.py), the evaluation-set
index of ``shard --exclude-near`` (exclude.py) and ``data_prep dedup`` (dedup.py)."""

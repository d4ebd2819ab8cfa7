"""Evaluation: top-1/top-5 and multi-label mAP over shards, in and outside training."""

"""Shard preparation: image collections -> deterministic, resumable WebDataset shards written by Ray tasks.

Entry points: ``python -m data_prep shard|verify|demo-data`` (design: the docstring of data_prep/__main__.py),
or ``data_prep.shard.job.run_shard_job(ShardConfig(...))`` from Python.
"""

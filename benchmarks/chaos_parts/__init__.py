"""chaos.py's modules: launching and killing runs (launch), the shard job's targets (sharding), the trainer's (training)."""

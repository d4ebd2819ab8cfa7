"""The shard job: plan, Ray scan and write tasks, output layout, _info.json, verification."""

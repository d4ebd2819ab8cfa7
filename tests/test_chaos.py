"""The chaos harness (benchmarks/chaos.py) at a small size: a 2-rank training job and a Ray shard job are each
SIGKILLed twice at random moments (a rank or the torchrun launcher; the data_prep driver or a Ray worker),
relaunched until they complete, and end bit-identical to an uninterrupted run."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_chaos():
    spec = importlib.util.spec_from_file_location("chaos_harness", REPO / "benchmarks" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kills_then_relaunches_end_bit_identical(tmp_path):
    chaos = _load_chaos()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    workdir = tmp_path / "chaos"
    rc = chaos.main(["--seed", "1", "--kills-train", "2", "--kills-shard", "2", "--steps", "12", "--every", "4",
                     "--images", "160", "--shard-size", "10", "--workdir", str(workdir)])
    results = {r["job"]: r for r in json.loads((workdir / "summary.json").read_text())}
    assert rc == 0, results
    for job in ("training", "sharding"):
        result = results[job]
        assert result["completed"] and result["identical"], result
        assert len(result["kills"]) >= 1, result  # at least one kill landed before the job completed
    assert len(results["training"]["kills"]) == 2  # training kills always land (every launch is killed once)
    # nothing the harness started is left running (Ray included)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before

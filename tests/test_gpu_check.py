"""benchmarks/gpu_check.py runs every part end to end on the CPU (--tiny), keeps its budget, and the trainer's
MFU window leaves evaluation and save time out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(args, timeout=400) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OUT"):
        env.pop(key, None)
    res = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_run_measures_every_part_and_writes_the_figures(tmp_path, demo_shards):
    # compile is left out: tests/test_compile.py covers it, and tracing costs ~15 s of CI here
    out = _run(["--tiny", "--out", str(tmp_path), "--shards", str(demo_shards),
                "--only", "speed", "attention", "loader", "memory"])
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    for part in ("speed", "attention", "loader", "memory"):
        assert "error" not in figures[part] and "skipped" not in figures[part], (part, figures[part])
    assert figures["speed"]["coatnet-tiny"]["ours_images_per_s"] > 0
    assert all(r["fastest"] in ("sdpa", "math") for k, r in figures["attention"].items() if k != "seconds")
    assert figures["loader"]["images_per_s"] > 0 and figures["loader"]["sustains"] in (True, False)
    assert figures["memory"]["estimate_step_gib"] > 0 and "DeepSpeed" in figures["memory"]["measured_with"]
    assert "gpu_check summary" in out and "coatnet-tiny" in out.split("gpu_check summary")[1]


def test_a_spent_budget_skips_parts_and_still_reports(tmp_path):
    out = _run(["--tiny", "--budget-s", "0", "--out", str(tmp_path)], timeout=120)
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all("skipped" in figures[part] for part in ("speed", "attention", "loader", "memory", "compile"))
    assert "gpu_check summary" in out


def test_throughput_window_counts_training_time_only():
    from pipeline.train.metrics import Throughput

    now = [0.0]
    meter = Throughput(global_batch=100, macs_per_image=10**9, device=torch.device("cpu"), clock=lambda: now[0])
    meter.peak = 10.0
    now[0] += 4.0                      # steps 1-4: one second each
    with meter.paused():               # an evaluation and a save inside the window
        now[0] += 30.0
    now[0] += 6.0                      # steps 5-10
    out = meter.window(10, 100, 0)
    assert out["perf/images_per_s"] == pytest.approx(100.0)  # 1000 images in 10 s of training, not 40 s
    assert out["perf/mfu"] == pytest.approx(100.0 * 6e9 / 1e12 / 10.0)
    assert out["eta_s"] == pytest.approx(40.0 / 10 * 90)     # the ETA counts everything
    meter.restart(4)                   # a rollback back to step 4
    now[0] += 2.0
    assert meter.window(6, 100, 0)["perf/images_per_s"] == pytest.approx(100.0)

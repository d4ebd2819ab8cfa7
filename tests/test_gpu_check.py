"""benchmarks/gpu_check.py runs every part end to end on the CPU (--tiny), keeps its budget, writes its figures
after every part (a kill keeps the finished ones), and the trainer's MFU window leaves evaluation and save time
out."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OUT"):
        env.pop(key, None)
    return env


def _run(args, timeout=400) -> str:
    env = _env()
    res = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_run_measures_every_part_and_writes_the_figures(tmp_path, demo_shards):
    # compile is left out: tests/test_compile.py covers it, and tracing costs ~15 s of CI here
    parts = ["trainer", "speed", "attention", "decode", "memory"]
    out = _run(["--tiny", "--out", str(tmp_path), "--shards", str(demo_shards), "--budget-s", "700", "--only", *parts],
               timeout=800)  # a budget for 2 shared CPU cores: three trainer launches
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    for part in parts:
        assert "error" not in figures[part] and "skipped" not in figures[part], (part, figures[part])
    assert figures["speed"]["coatnet-tiny"]["ours_images_per_s"] > 0
    assert all(r["fastest"] in ("sdpa", "math") for k, r in figures["attention"].items() if k != "seconds")
    ld = figures["decode"]["cpu"]
    assert ld["images_per_s"] > 0 and ld["sustains"] in (True, False), ld
    assert "CUDA" in figures["decode"]["gpu"]["skipped"]  # the trainer refuses decode=gpu without a GPU
    augment = figures["decode"]["augment"]  # decode=gpu's batched augmentation vs the per-image one, on CPU here
    assert augment["batched_images_per_s"] > 0 and augment["per_image_images_per_s"] > 0, augment
    trainer = figures["trainer"]
    for run in ("eager", "resume", "compiled"):
        assert trainer[run]["steps_per_s"] > 0 and trainer[run]["graph_breaks"] >= 0, (run, trainer[run])
    assert trainer["resume"]["first_step"] == trainer["steps"] + 1 and trainer["resumed_from_saved_step"]
    assert trainer["eager"]["first_step"] == 1 and trainer["compiled"]["last_step"] == trainer["steps"]
    assert figures["memory"]["estimate_step_gib"] > 0 and "DeepSpeed" in figures["memory"]["measured_with"]
    assert "gpu_check summary" in out and "coatnet-tiny" in out.split("gpu_check summary")[1]


def test_a_spent_budget_skips_parts_and_still_reports(tmp_path):
    out = _run(["--tiny", "--budget-s", "0", "--out", str(tmp_path)], timeout=120)
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all("skipped" in figures[part] for part in ("trainer", "speed", "attention", "decode", "memory", "compile"))
    assert "gpu_check summary" in out


def test_default_budget_leaves_room_for_a_second_try():
    from benchmarks.gpu_check import PARTS, build_parser

    assert build_parser().parse_args([]).budget_s <= 360  # two calls of budget + start fit a 15-minute lease
    assert PARTS[0] == "trainer"  # the figures nothing else can give come first


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_run_keeps_the_figures_of_the_parts_that_finished(tmp_path):
    # speed takes seconds here, compile's tracing much longer: kill while compile runs
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path), "--only", "speed",
                             "compile"], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    path, deadline = tmp_path / "gpu_check.json", time.monotonic() + 500
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0]
    assert still_running, output[-3000:]
    figures = json.loads(path.read_text())
    assert figures["speed"]["coatnet-tiny"]["ours_images_per_s"] > 0
    assert "compile" not in figures


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

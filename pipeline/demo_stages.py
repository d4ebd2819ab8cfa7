"""What both demos share: run each stage's command as a user would, echo it, time it; the output folder; the launcher.

pipeline/demo.py (single-label) and pipeline/demo_multilabel.py (JFT-style) are stage lists built on these.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from core.errors import UserError
from pipeline.runtime.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


class Stages:
    """Runs each stage's command, echoing it, and keeps its wall time for the summary."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def run(self, stage: str, cmd: list[str]) -> None:
        print(f"\n== {stage}\n$ {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"demo: stage '{stage}' failed (exit {result.returncode}); its output is above")

    def print_times(self, total: float) -> None:
        print("wall time per stage:")
        for stage, seconds in self.times.items():
            print(f"  {stage:40s} {seconds:6.1f} s")
        print(f"  {'total':40s} {total:6.1f} s")


def prepare_out(path: str) -> Path:
    """An empty output folder: replaced when an earlier demo made it, refused when it holds anything else."""
    out = Path(path).resolve()
    marker = out / ".coatnet-demo"
    made_by_demo = marker.exists() or (out / "summary.json").exists()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not made_by_demo:
        raise UserError(f"--out {out} exists and was not made by the demo; pass another --out or remove it "
                        f"yourself")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    marker.write_text("made by python -m pipeline.demo; replaced on each run\n")
    # the venv's deepspeed launcher on PATH
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return out


def launcher(ranks: int) -> list[str]:
    """DeepSpeed's own launcher with `ranks` local processes (CPU accelerator, gloo on CPU)."""
    return ["deepspeed", "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "--module"]

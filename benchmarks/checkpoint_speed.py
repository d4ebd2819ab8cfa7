"""Time training is blocked per checkpoint save, synchronous against checkpoint.async_save, side by side.

    python benchmarks/checkpoint_speed.py                       # coatnet-0, 2 CPU ranks, generated shards
    python benchmarks/checkpoint_speed.py --model coatnet-1 --steps 9

Two runs of `python -m pipeline.pretrain` through the deepspeed launcher with the same config, one with
checkpoint.async_save=false, one with true, saving every --every steps. Blocked time of a save = the time the
trainer spent in it (rank 0's `training blocked` log line): for async, the copy off the training state plus any wait
for the previous save still in flight. The run's last step is not a periodic save (no training follows it) and is not
counted. Prints each save, the mean per save of both runs, `blocked ratio (async/sync): X`, and the load average
(the machine may be shared).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BLOCKED = re.compile(r"checkpoint \S*step_(\d+) \(training blocked ([\d.]+) s\)")


def make_shards(root: Path) -> Path:
    out = root / "shards"
    for cmd in (["demo-data", str(root / "images"), "--classes", "4", "--per-class", "40", "--size", "40", "--seed",
                 "0"], ["shard", str(root / "images"), str(out), "--split", "train", "--shard-size", "32", "--seed",
                        "0", "--workers", "1"]):
        subprocess.run([sys.executable, "-m", "data_prep", *cmd], check=True, capture_output=True,
                       env={**os.environ, "RAY_ADDRESS": ""})
    return out


def train(shards: Path, run_dir: Path, args, async_save: bool) -> dict[int, float]:
    """{step: seconds training was blocked by its save} of one 2-rank run."""
    overrides = {"run_dir": run_dir, "data.train": shards, "data.val": "null", "data.image_size": 32,
                 "data.num_workers": 1, "data.randaugment_layers": 0, "model.name": args.model,
                 "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.steps": args.steps,
                 "train.log_every": 1, "checkpoint.every_steps": args.every, "checkpoint.keep": 2,
                 "deepspeed.zero_stage": 2, "precision": "fp32", "train.ema_decay": 0.9,
                 "checkpoint.async_save": str(async_save).lower()}
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(args.port),
           "--module", "pipeline.pretrain", *(f"{k}={v}" for k, v in overrides.items())]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    out = res.stdout + res.stderr
    if res.returncode:
        sys.exit(f"training failed ({'async' if async_save else 'sync'}):\n{out[-4000:]}")
    return {int(s): float(t) for s, t in BLOCKED.findall(out) if int(s) < args.steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="coatnet-0", help="large enough that writing its checkpoint matters")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--every", type=int, default=2, help="checkpoint.every_steps")
    parser.add_argument("--port", type=int, default=29761)
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="checkpoint-speed-") as tmp:
        root = Path(tmp)
        shards = make_shards(root)
        results = {}
        for name, flag in (("sync", False), ("async", True)):
            start = time.monotonic()
            results[name] = train(shards, root / name, args, flag)
            sizes = sum(f.stat().st_size for f in (root / name / "checkpoints").glob("step_*/*") if f.is_file())
            print(f"{name:5s}: saves {results[name]} s (blocked), run {time.monotonic() - start:.0f} s, "
                  f"{sizes / 1e6:.0f} MB in the kept checkpoints")
    mean = {name: sum(v.values()) / max(1, len(v)) for name, v in results.items()}
    print(f"blocked per save: sync {mean['sync']:.3f} s, async {mean['async']:.3f} s "
          f"({len(results['sync'])} periodic saves each, {args.model}, 2 CPU ranks, ZeRO-2, fp32)")
    print(f"blocked ratio (async/sync): {mean['async'] / mean['sync']:.3f}")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

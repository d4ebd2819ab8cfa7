"""The `trainer` part of benchmarks/gpu_check.py: the real trainer on one device, as a GPU run would start it.

Why a part of its own: the other parts time the model in isolation; only the trainer runs DeepSpeed's engine,
the loader's workers, the step guard, the EMA, saving and resuming together. Three runs of
`pipeline.train.trainer.run` (bf16, deterministic=false, data.num_workers > 0), each in a child process:

  eager     N steps, saves at the end;
  resume    the same run folder, N/2 more steps: it must start from the saved step;
  compiled  N steps with model.compile=true (inductor on CUDA, aot_eager on CPU).

Each child counts, per step, the host synchronisations CUDA reports under torch.cuda.set_sync_debug_mode("warn")
(none on CPU: there is nothing to sync with; tests/test_no_sync.py counts the calls there), and times the
steps; TORCH_LOGS=graph_breaks,recompiles in its environment prints what dynamo broke or recompiled, counted
from its output. `sdpa_backends` names the SDPA kernel each attention stage dispatched to in one training step.
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SDPA_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
            "_efficient_attention_forward", "_flash_attention_forward", "flex_attention")


def trainer_overrides(s: dict, shards: Path, run_dir: Path, steps: int) -> list[str]:
    """The trainer's command line for this check: bf16, fast kernels, loader workers, one save at the end."""
    micro = s["trainer_batch"]
    values = {"run_dir": run_dir, "data.train": shards, "data.val": "null", "data.image_size": s["trainer_size"],
              "data.num_workers": s["workers"], "model.name": s["trainer_model"], "precision": "bf16",
              "train.deterministic": "false", "train.micro_batch_size": micro, "train.global_batch_size": micro,
              "train.steps": steps, "train.log_every": max(1, steps // 3), "checkpoint.every_steps": 0,
              "train.stop_check_s": 1e6, "optim.warmup_steps": 1}
    return [f"{k}={v}" for k, v in values.items()]


def part_trainer(s: dict, device, budget, shards: Path | None, work: Path) -> dict:
    if shards is None:
        raise RuntimeError("the trainer part needs --shards (benchmarks/gpu_check.py --make-shards DIR)")
    steps = s["trainer_steps"]
    run_dir = work / "trainer_run"
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    runs = [("eager", steps, []), ("resume", steps + steps // 2, []),
            ("compiled", steps, ["model.compile=true", f"model.compile_backend={backend}"])]
    out: dict = {"model": s["trainer_model"], "size": s["trainer_size"], "micro_batch": s["trainer_batch"],
                 "workers": s["workers"], "steps": steps}
    for name, total, extra in runs:
        if budget.left() < s["trainer_min_s"]:
            out[name] = {"skipped": f"time budget ({budget.left():.0f} s left)"}
            continue
        folder = run_dir if name != "compiled" else work / "trainer_compiled"
        out[name] = run_child(trainer_overrides(s, shards, folder, total) + extra, work / f"trainer_{name}.json",
                              timeout=budget.left())
        print(f"  trainer {name}: { {k: v for k, v in out[name].items() if k != 'sync_sites'} }", flush=True)
    resumed = out.get("resume", {})
    if "first_step" in resumed:
        out["resumed_from_saved_step"] = resumed["first_step"] == steps + 1
    out["sdpa_backends"] = sdpa_backends(s["trainer_model"], s["trainer_size"], s["trainer_batch"], device)
    return out


def run_child(overrides: list[str], out_json: Path, timeout: float) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "TORCH_LOGS": "graph_breaks,recompiles"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out_json), *overrides], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"error": f"stopped at the time budget ({timeout:.0f} s)", "seconds": time.monotonic() - start}
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {log[-1500:]}", "seconds": time.monotonic() - start}
    result = json.loads(out_json.read_text())
    result["graph_breaks"] = len(re.findall(r"Graph break", log))
    result["recompiles"] = len(re.findall(r"Recompiling function", log))
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def sdpa_backends(name: str, size: int, batch: int, device) -> dict:
    """{attention stage: the SDPA op it ran} for one bf16 forward + backward of the model as the trainer holds
    it (contiguous parameters, bf16 weights), recorded below autograd by a dispatch mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from model import create_model

    seen: dict = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func.overloadpacket.__name__
            if op in SDPA_OPS and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
                seen.setdefault(f"N={args[0].shape[-2]} heads={args[0].shape[1]}", set()).add(op)
            return func(*args, **(kwargs or {}))

    model = create_model(name, num_classes=1000, image_size=size).to(device, torch.bfloat16)
    images = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
    with Record():
        model(images).float().sum().backward()
    return {stage: sorted(ops) for stage, ops in seen.items()}


# ------------------------------------------------------------------------------------------------ child
def child(out_json: str, argv: list[str]) -> None:
    """Run the trainer, counting the host syncs CUDA reports in each step and timing the steps."""
    import pipeline.train.trainer as T
    from pipeline.config import load_config

    syncs: dict = collections.Counter()
    sites: dict = collections.Counter()
    state = {"step": 0}
    times: list[tuple[int, float]] = []
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            syncs[state["step"]] += 1
            sites[f"{os.path.relpath(filename, REPO)}:{lineno}"] += 1
            return
        shown(message, category, filename, lineno, file, line)

    warnings.simplefilter("always")
    warnings.showwarning = show
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    original = T.train_step

    def timed_step(engine, loader, criterion, accumulation, dtype, guard, step, *rest, **kwargs):  # rest: times
        state["step"] = step
        times.append((step, time.perf_counter()))
        return original(engine, loader, criterion, accumulation, dtype, guard, step, *rest, **kwargs)

    T.train_step = timed_step
    T.run(load_config(None, argv))
    steady = times[2:] if len(times) > 3 else times
    rate = (len(steady) - 1) / (steady[-1][1] - steady[0][1]) if len(steady) > 1 else None
    per_step = [syncs.get(step, 0) for step, _ in times]
    Path(out_json).write_text(json.dumps({
        "first_step": times[0][0] if times else None, "last_step": times[-1][0] if times else None,
        "steps_per_s": rate, "syncs_per_step_median": sorted(per_step)[len(per_step) // 2] if per_step else None,
        "syncs_total": sum(per_step), "sync_debug_mode": torch.cuda.is_available(),
        "sync_sites": dict(sites.most_common(8))}))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    child(sys.argv[1], sys.argv[2:])

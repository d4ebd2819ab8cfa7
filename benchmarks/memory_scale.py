"""Per-rank peak memory of each phase of a run, against coatnet-nano's same phase, next to the fp32 model size.

    .venv/bin/python benchmarks/memory_scale.py                                   # coatnet-2, coatnet-3 (~3 min on 2 cores)
    .venv/bin/python benchmarks/memory_scale.py --models coatnet-nano,coatnet-tiny --json   # the smoke test's setting

For each model it launches 2 real CPU ranks (torchrun, bf16, ZeRO-2 by default, as the trainer) three times, on tiny generated
shards, and each rank measures these phases with the pipeline's own building blocks, in the order
pipeline.train.trainer.run uses them:
  build     build_model + build_engine + build_ema (a fresh run: the model, DeepSpeed's optimizer, the EMA);
  step      the first two optimizer steps (pipeline.train.trainer.train_step, then the EMA update): the second is
            every later step's peak, with Adam's moments (allocated in the first step) held through its backward;
  eval      the in-run evaluation with EMA weights (pipeline.evaluation.periodic.Evaluator);
  save      Checkpointer.save;
  resume    a new launch: build, then Checkpointer.restore of that checkpoint (the phase is the restore);
  finetune  a new launch with `pretrained=` the first run (EMA weights): build_model from them + engine + EMA.
A phase's peak is VmHWM (resident set high-water mark, Linux) after resetting it at the phase start
(`echo 5 > /proc/self/clear_refs`), so it includes what is alive from earlier phases, as in a real run; on a
GPU also torch.cuda.max_memory_allocated. Everything a model-independent process holds (Python, torch,
DeepSpeed, the data loader) is removed by subtracting coatnet-nano's peak of the same phase: the rest is
what the model's size costs. The target: that rest <= 1.5 x fp32 model + the rank's optimizer shard.
The optimizer shard is what DeepSpeed's estimators count as the optimizer's part of a rank and move to the CPU
with offload_optimizer (estimate_zero2/3_model_states_mem_needs: 16 bytes x params / ranks from ZeRO-2 on: fp32
master 4, Adam moments 8, the fp32 gradient partition the step consumes 4); ZeRO-1 partitions no gradients, so
its shard is the 12 bytes of master and moments. The 1.5 x fp32 (6 bytes) then holds the 16-bit model (2), the
EMA fragment (4 / ranks), DeepSpeed's buckets, activations and the gloo all-gather's staging copy (2).

The planner (launch.plan.rank_peak) is evaluated at the same setting and printed beside the measurement.

    .venv/bin/python benchmarks/memory_scale.py --offload --models coatnet-0 --ranks 2 --image-size 32

`--offload` runs ZeRO-2 (or --zero 3) with deepspeed.offload_optimizer=true (pretraining launch only, no baseline) and reports
per rank, after the step phase, the bytes of the tensors DeepSpeed's optimizer keeps off the GPU (its attributes
but the 16-bit weights and the gradient buckets, ON_ACCELERATOR; storages counted once): on a CPU everything is in
one RSS, so the tensors' bytes are the measurement, next to launch.offload's per-rank model (docs/NOTES-off21.md).
Not run in CI except the smoke setting (tests/test_memory_scale.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MIB = 2 ** 20
PHASES = ("build", "step", "eval", "save", "resume", "finetune")
STAGES = {"pretrain": ("build", "step", "eval", "save"), "resume": ("resume",), "finetune": ("finetune",)}
BASELINE = "coatnet-nano"


# ---------------------------------------------------------------- measuring (inside a rank)

def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class Phases:
    """Peak host (and device) memory of named phases of this rank, written as JSON when done."""

    def __init__(self, info, out: Path):
        self.info, self.out, self.rows = info, out, []

    def measure(self, name: str):
        import contextlib

        import torch
        import torch.distributed as dist

        @contextlib.contextmanager
        def phase():
            if dist.is_initialized():
                dist.barrier()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            cuda = self.info.device.type == "cuda"
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start, t0 = _status_mib("VmRSS"), time.time()
            yield
            row = {"phase": name, "rank": self.info.rank, "start_mib": start, "peak_mib": _status_mib("VmHWM"),
                   "seconds": time.time() - t0}
            if cuda:
                row["device_peak_mib"] = torch.cuda.max_memory_allocated() / MIB
            self.rows.append(row)
            if dist.is_initialized():
                dist.barrier()
        return phase()

    def write(self) -> None:
        self.out.write_text(json.dumps(self.rows))


def _config(args):
    from pipeline.config import load_config

    run_dir = Path(args.work) / args.model / ("finetune" if args.stage == "finetune" else "pretrain")
    micro = args.micro_batch
    overrides = {
        "run_dir": run_dir, "model.name": args.model, "model.num_classes": None, "data.train": args.shards,
        "data.val": args.shards, "data.image_size": args.image_size, "data.num_workers": 1,
        "data.shuffle_buffer": 16, "train.micro_batch_size": micro, "train.global_batch_size": micro * args.ranks,
        "train.steps": 10, "train.eval_every": 0, "train.ema_decay": 0.9999, "deepspeed.zero_stage": args.zero,
        "precision": "bf16", "checkpoint.every_steps": 0, "seed": 0,
    }
    if args.stage == "finetune":
        overrides["pretrained"] = Path(args.work) / args.model / "pretrain"
        overrides["pretrained_unfinished"] = True  # the first run is this benchmark's engine, not a finished run
    mode = "finetune" if args.stage == "finetune" else "pretrain"
    return load_config(REPO / "configs/demo/pretrain.yaml", [f"{k}={'null' if v is None else v}"
                                                            for k, v in overrides.items()] + list(args.set),
                       defaults=mode), mode


def worker(args) -> None:
    """One rank of one stage (pretrain | resume | finetune): the trainer's building blocks, phase by phase."""
    import torch

    from pipeline.runtime import distributed as D
    from pipeline.train.build import build_engine, build_model
    from pipeline.checkpoint.checkpointer import Checkpointer
    from pipeline.train.ema import build_ema
    from pipeline.faults.step_guard import StepGuard
    from pipeline.train.state import TrainState
    from pipeline.train import trainer as T

    cfg, mode = _config(args)
    plan = T.plan_run(cfg)
    info = D.setup(deterministic=False)
    T.resolve_run_precision(cfg, info)
    T.write_run_files(cfg, plan, info)
    phases = Phases(info, Path(args.work) / f"{args.model}-{args.stage}-rank{info.rank}.json")
    checkpointer = Checkpointer(os.path.join(cfg.run_dir, "checkpoints"), cfg.checkpoint.keep, info,
                                cfg.deepspeed.zero_stage)
    resume = checkpointer.find_resume() if args.stage == "resume" else None
    checkpointer.run_config = T.resolved_config(cfg, plan, resume, info)

    def build():
        model = build_model(cfg, plan, info, from_pretrained=resume is None)
        engine = build_engine(cfg, plan, info, model, universal=False)
        guard = StepGuard(cfg.train.max_bad_steps, cfg.train.spike_factor, rank=info.rank)
        state = TrainState(cfg.seed, info, plan.global_batch, plan.steps_per_epoch, ema=build_ema(cfg, engine),
                           run_meta={"model_config": engine.module.config.to_dict(), "classes": plan.classes,
                                     "world_size": info.world_size, "zero_stage": cfg.deepspeed.zero_stage,
                                     "mode": mode}, guard=guard)
        return engine, state, guard

    if args.stage == "pretrain":
        with phases.measure("build"):
            engine, state, guard = build()
    elif args.stage == "finetune":
        with phases.measure("finetune"):
            engine, state, guard = build()
    else:
        engine, state, guard = build()
        with phases.measure("resume"):
            checkpointer.restore(engine, state, resume)
    if args.stage == "pretrain":
        from pipeline.data.loader import build_train_loader
        from pipeline.train.loss import build_loss
        from pipeline.train.metrics import MetricsLogger
        from pipeline.evaluation.periodic import Evaluator

        loader = build_train_loader(cfg, plan.shards, info.rank, info.world_size, plan.num_classes,
                                    state=state.data_state, device=info.device)
        state.attach_loader(loader)
        criterion = build_loss(cfg)
        engine.train()
        with phases.measure("step"):  # two: from the second on, Adam's moments exist through the backward
            for _ in range(2):
                T.train_step(engine, loader, criterion, plan.accumulation, torch.bfloat16, guard, state.step + 1)
                state.advance(applied=guard.applied)
        if cfg.deepspeed.offload_optimizer:
            held = optimizer_held_bytes(engine)
            phases.rows[-1]["optimizer_held"] = held
            phases.rows[-1]["offload_held_bytes"] = sum(v for k, v in held.items() if k not in ON_ACCELERATOR)
            phases.rows[-1]["largest_param"] = max(p.numel() for p in engine.module.parameters())
        logger = MetricsLogger(cfg.run_dir, info.is_main, resume_step=state.step)
        evaluator = Evaluator(cfg, info, plan.num_classes, logger)
        with phases.measure("eval"):
            evaluator(engine, state)
        engine.train()
        with phases.measure("save"):
            checkpointer.save(engine, state)
        logger.close()
        loader.close()
    phases.write()


# Attributes of DeepSpeed's ZeRO-2/3 optimizers that stay on the GPU with offload_optimizer (and without
# offload_param): the module's 16-bit weights (flat groups and their partitions) and the gradient buckets. On a CPU run they are host memory like the
# rest, so they are told apart by name; everything else the optimizer holds is what offload puts in host memory.
ON_ACCELERATOR = frozenset({"bit16_groups", "bit16_groups_flat", "parallel_partitioned_bit16_groups",
                            "round_robin_bit16_groups", "ipg_buffer", "temp_grad_buffer_for_gpu_offload",
                            "grads_in_partition", "averaged_gradients", "fp16_partitioned_groups",
                            "fp16_partitioned_groups_flat"})


def _tensors(value, depth=0):
    """The tensors (and their .grad) inside an attribute value: lists, tuples and dicts a few levels deep."""
    import torch

    if isinstance(value, torch.Tensor):
        yield value
        if value.grad is not None:
            yield value.grad
    elif depth < 4 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)


def optimizer_held_bytes(engine) -> dict[str, int]:
    """Bytes of every tensor DeepSpeed's ZeRO optimizer holds, by attribute (its inner optimizer's state as
    "optimizer.state"), each storage counted once and the module's own parameters left out.

    Why this and not RSS: on a CPU run the offloaded states are in the same RSS as everything else (there is no
    GPU for the rest to live on); the tensors' own bytes are what offload moves to host memory on a GPU run."""
    seen = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    opt = engine.optimizer
    out: dict[str, int] = {}
    items = list(vars(opt).items()) + [("optimizer.state", opt.optimizer.state)]
    for name, value in items:
        if name == "optimizer":
            continue
        for t in _tensors(value):
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            out[name] = out.get(name, 0) + storage.nbytes()
    return out


# ---------------------------------------------------------------- driving (the parent process)

def _run(cmd: list[str], timeout: float) -> None:
    # MALLOC_MMAP_THRESHOLD_: every allocation over 128 KiB is its own mapping, returned to the OS when freed. By
    # default glibc raises that threshold as big blocks are freed and keeps freed heap resident, so a phase's
    # VmHWM would include what earlier phases freed; with it, RSS is what is live, as max_memory_allocated on a GPU.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")


def make_shards(root: Path, image_px: int) -> Path:
    """Tiny shape-colour shards (train and val), as tests/conftest.py's demo_shards builds them."""
    out = root / "shards"
    if (out / "_info.json").exists():
        return out
    for split, per_class, seed in (("train", 8, 0), ("val", 4, 1)):
        images = root / f"images-{split}"
        _run([sys.executable, "-m", "data_prep", "demo-data", str(images), "--classes", "4", "--per-class",
              str(per_class), "--size", str(image_px), "--seed", str(seed), "--label-set", "shape-color"], 300)
        _run([sys.executable, "-m", "data_prep", "shard", str(images), str(out), "--split", split,
              "--shard-size", "8", "--seed", "0", "--workers", "1"], 300)
    return out


def measure_model(args, model: str, shards: Path) -> list[dict]:
    from pipeline.runtime.distributed import free_port

    rows = []
    for stage in args.stages.split(","):
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(args.ranks), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).resolve()), "--worker", stage,
               "--model", model, "--work", str(args.work), "--shards", str(shards), "--image-size",
               str(args.image_size), "--micro-batch", str(args.micro_batch), "--zero", str(args.zero),
               "--ranks", str(args.ranks), *(f"--set={kv}" for kv in args.set)]
        t0 = time.time()
        done = [Path(args.work) / f"{model}-{stage}-rank{rank}.json" for rank in range(args.ranks)]
        if not (args.reuse and all(f.exists() for f in done)):
            _run(cmd, args.timeout)
        for rank in range(args.ranks):
            for row in json.loads((Path(args.work) / f"{model}-{stage}-rank{rank}.json").read_text()):
                rows.append({"model": model, **row})
        print(f"  {model} {stage}: {time.time() - t0:.0f} s", file=sys.stderr)
    return rows


def model_sizes(model: str, image_size: int, num_classes: int = 4) -> int:
    from model import count_params
    return count_params(model, image_size, num_classes=num_classes)


def optimizer_shard_bytes(zero_stage: int, params: int, ranks: int) -> float:
    """A rank's optimizer shard as DeepSpeed's estimators count it: fp32 master + Adam moments (12 bytes per
    parameter), and from ZeRO-2 on the fp32 gradient partition (4 more), split over the ranks."""
    return (12 if zero_stage <= 1 else 16) * params / ranks


def summarise(rows: list[dict], args) -> list[dict]:
    """Per model, phase and rank: peak, minus the baseline's, fp32 size, optimizer shard, ratio to the target,
    and the planner's figure for the same setting."""
    from launch.plan import rank_peak

    base = {(r["phase"], r["rank"]): r["peak_mib"] for r in rows if r["model"] == BASELINE}
    planned: dict = {}
    out = []
    for r in rows:
        params = model_sizes(r["model"], args.image_size)
        fp32 = 4 * params / MIB
        shard = optimizer_shard_bytes(args.zero, params, args.ranks) / MIB
        above = r["peak_mib"] - base[(r["phase"], r["rank"])] if (r["phase"], r["rank"]) in base else None
        if r["model"] not in planned:
            planned[r["model"]] = rank_peak(r["model"], args.image_size, args.micro_batch, args.ranks, args.zero,
                                            device="cpu", num_classes=4, ema=True, overrides=tuple(args.set))
            planned[BASELINE] = planned.get(BASELINE) or rank_peak(
                BASELINE, args.image_size, args.micro_batch, args.ranks, args.zero, device="cpu", num_classes=4,
                ema=True, overrides=tuple(args.set))
        plan_above = (planned[r["model"]]["phases"][r["phase"]] - planned[BASELINE]["phases"][r["phase"]]) / MIB
        target = 1.5 * fp32 + shard
        out.append({**r, "params": params, "fp32_mib": fp32, "optimizer_shard_mib": shard, "above_baseline_mib": above,
                    "target_mib": target, "ratio_to_target": None if above is None else above / target,
                    "planned_above_mib": plan_above,
                    "planned_vs_measured": None if not above else plan_above / above})
    return out


def summarise_offload(rows: list[dict], args) -> list[dict]:
    """Per model and rank (the step phase): what the optimizer holds for offload (optimizer_held_bytes) against
    launch.offload's model of a rank (no pinned rounding: nothing is pinned on a CPU), and their ratio."""
    from launch.model_states import ZeroSetting, model_states_bytes
    from launch.offload import zero2_offload_rank

    out = []
    for r in rows:
        if r["phase"] != "step" or "offload_held_bytes" not in r:
            continue
        params = model_sizes(r["model"], args.image_size)
        if args.zero == 3:  # the planner keeps DeepSpeed's ZeRO-3 estimator (per partition already), per rank
            model = model_states_bytes(ZeroSetting(3, offload_optimizer=True), params, r["largest_param"], 1,
                                       args.ranks)[1] // args.ranks
        else:
            model = zero2_offload_rank(params, r["largest_param"], args.ranks, pinned=False).total
        out.append({**r, "params": params, "planned_offload_bytes": model,
                    "planned_vs_measured": model / r["offload_held_bytes"]})
    return out


def print_offload_table(summary: list[dict]) -> None:
    header = f"{'model':<14}{'rank':>4}{'params':>12}{'step peak':>11}{'held':>9}{'planner':>9}{'plan/meas':>10}"
    print(header)
    print("-" * len(header))
    for s in summary:
        print(f"{s['model']:<14}{s['rank']:>4}{s['params']:>12,}{s['peak_mib']:>11.0f}"
              f"{s['offload_held_bytes'] / MIB:>9.1f}{s['planned_offload_bytes'] / MIB:>9.1f}"
              f"{s['planned_vs_measured']:>10.3f}")
    print("(MiB per rank after two steps; held: the tensors DeepSpeed's ZeRO optimizer keeps off the GPU with "
          "offload_optimizer, by attribute in --json; planner: launch.offload.zero2_offload_rank, at ZeRO-3 "
          "DeepSpeed's estimator per rank)")


def print_table(summary: list[dict]) -> None:
    header = (f"{'model':<14}{'phase':<10}{'rank':>4}{'peak':>9}{'-nano':>9}{'fp32':>8}{'opt.shard':>10}"
              f"{'target':>9}{'ratio':>7}{'planner':>9}{'plan/meas':>10}")
    print(header)
    print("-" * len(header))
    for s in summary:
        above = "-" if s["above_baseline_mib"] is None else f"{s['above_baseline_mib']:.0f}"
        ratio = "-" if s["ratio_to_target"] is None else f"{s['ratio_to_target']:.2f}"
        pvm = "-" if s["planned_vs_measured"] is None else f"{s['planned_vs_measured']:.2f}"
        print(f"{s['model']:<14}{s['phase']:<10}{s['rank']:>4}{s['peak_mib']:>9.0f}{above:>9}{s['fp32_mib']:>8.0f}"
              f"{s['optimizer_shard_mib']:>10.0f}{s['target_mib']:>9.0f}{ratio:>7}{s['planned_above_mib']:>9.0f}"
              f"{pvm:>10}")
    print("(MiB per rank; -nano: above coatnet-nano's same phase and rank; target: 1.5 x fp32 + optimizer shard; "
          "ratio <= 1 meets it; planner: launch.plan.rank_peak above its own nano figure)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="coatnet-2,coatnet-3", help="comma-separated; coatnet-nano is always run")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--zero", type=int, default=2, choices=(1, 2, 3), help="ZeRO stage (default 2, the trainer's)")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    p.add_argument("--stages", default=",".join(STAGES), help="launches to run (default all: pretrain,resume,finetune)")
    p.add_argument("--reuse", action="store_true", help="keep the measurements already in --work (re-summarise)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--offload", action="store_true",
                   help="ZeRO-2 (or --zero 3) with deepspeed.offload_optimizer=true, pretraining launch only: the host bytes the "
                        "optimizer holds per rank against the planner's model (launch/offload.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every launch (e.g. deepspeed.bucket_elements=500000000), repeatable")
    # internal: one rank of one stage
    p.add_argument("--worker", choices=tuple(STAGES), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.stage = args.worker
        worker(args)
        return 0
    if args.offload and args.zero == 1:
        raise SystemExit("error: --offload measures ZeRO-2 (launch/offload.py's model) or ZeRO-3 (DeepSpeed's "
                         "estimator); got --zero 1")
    if args.offload:  # only the pretraining launch: the step is where offload's states are all allocated
        args.set = [*args.set, "deepspeed.offload_optimizer=true"]
        args.stages = "pretrain"
    models = [m for m in args.models.split(",") if m]
    if not args.offload:
        models = [BASELINE] + [m for m in models if m != BASELINE]
    with tempfile.TemporaryDirectory(prefix="memory-scale-") as tmp:
        args.work = args.work or tmp
        Path(args.work).mkdir(parents=True, exist_ok=True)
        shards = make_shards(Path(args.work), max(40, args.image_size))
        rows = []
        for model in models:
            rows += measure_model(args, model, shards)
        summary = summarise_offload(rows, args) if args.offload else summarise(rows, args)
    if args.json:
        print(json.dumps({"setting": {"ranks": args.ranks, "zero_stage": args.zero, "image_size": args.image_size,
                                      "micro_batch": args.micro_batch, "precision": "bf16",
                                      "offload_optimizer": args.offload}, "rows": summary}))
    else:
        (print_offload_table if args.offload else print_table)(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

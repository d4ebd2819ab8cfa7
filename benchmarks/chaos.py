"""Chaos harness: SIGKILL a 2-rank training job and a Ray shard job at random moments, relaunch the
same command until it completes, and check the end result is bit-identical to an uninterrupted run.

Only the command lines and on-disk formats of the README are used:

  training  torchrun --nproc_per_node 2 -m pipeline.pretrain --config configs/demo/pretrain.yaml key=value ...
            RUN/checkpoints/step_XXXXXXXX/complete.json, RUN/metrics.jsonl, DeepSpeed's
            get_fp32_state_dict_from_zero_checkpoint (the final checkpoints of both runs, torch.equal per tensor)
  sharding  python -m data_prep shard IMAGES OUT --split train --shard-size S --workers 2
            OUT/train-NNNNNN.tar (sha256 of each) and the `shards` entries of OUT/_info.json

Kill targets: a training rank (one process), the torchrun launcher with its whole process group, the data_prep
driver (one process; its private Ray must die with it, leftovers are counted and killed), one Ray worker
process of the shard job (Ray retries its task). Kill moments are drawn by a seeded RNG between a launch and
its expected end (measured by the uninterrupted run). For training the draw is stratified over three windows
so that some kills land in each: `init` (launcher, imports, DeepSpeed init, resume), `step` (a random moment
inside a random remaining step) and `save` (while a checkpoint folder exists without its complete.json).

    .venv/bin/python benchmarks/chaos.py                            # K=5 kills each, 40 steps, 400 images
    .venv/bin/python benchmarks/chaos.py --seed 3 --kills-train 8 --kills-shard 8 --workdir runs/chaos

Every process the harness starts runs in its own session and is SIGKILLed by process group at the end, plus
every descendant it saw (Ray's processes included), so nothing outlives it. Exit 0 only if both results are
identical.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness's modules beside this script
from chaos_parts.launch import PY, TRAIN_TARGETS, SHARD_TARGETS, _ACTIVE, log, base_env, run_checked, Outcome  # noqa: E402
from chaos_parts.sharding import Sharding  # noqa: E402
from chaos_parts.training import Training  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
def summary(outcomes: list[Outcome]) -> str:
    rows = [("job", "target", "kills", "landed in", "faults survived", "steps redone", "stragglers",
             "ref s", "chaos s", "time lost s", "identical")]
    for o in outcomes:
        targets = TRAIN_TARGETS if o.name == "training" else SHARD_TARGETS
        for target in targets:
            ks = [k for k in o.kills if k.target == target]
            landed: dict[str, int] = {}
            for k in ks:
                key = k.landed_in.split(" (")[0]
                landed[key] = landed.get(key, 0) + 1
            rows.append((o.name, target, str(len(ks)), ", ".join(f"{v} {k}" for k, v in sorted(landed.items())) or "-",
                         "", str(sum(k.redone for k in ks)) if o.name == "training" else "-",
                         str(sum(k.stragglers for k in ks)), "", "", "", ""))
        survived = len(o.kills) if o.completed else max(0, len(o.kills) - 1)
        rows.append((o.name, "all", f"{len(o.kills)}/{o.planned}", f"{o.launches} launches, {o.failures} other failures",
                     str(survived), str(sum(k.redone for k in o.kills)) if o.name == "training" else "-",
                     str(sum(k.stragglers for k in o.kills)), f"{o.ref_s:.1f}", f"{o.chaos_s:.1f}",
                     f"{o.chaos_s - o.ref_s:+.1f}", "yes" if o.identical else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for o in outcomes:
        lines.append(f"{o.name}: {o.detail}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="RNG seed of the kill plan (default 0)")
    p.add_argument("--kills-train", type=int, default=5, help="SIGKILLs of the training job (default 5)")
    p.add_argument("--kills-shard", type=int, default=5, help="SIGKILLs of the shard job (default 5)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where to put images, shards, runs and logs (default: a temporary folder, removed after)")
    p.add_argument("--images", type=int, default=400,
                   help="images for the shard job (4 classes; default 400); training always uses 4 x 40")
    p.add_argument("--shard-size", type=int, default=10, help="samples per shard in the shard job (default 10)")
    p.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    p.add_argument("--every", type=int, default=5, help="checkpoint.every_steps (default 5)")
    p.add_argument("--train-workers", type=int, default=0, choices=(0, 1), help="data.num_workers (default 0)")
    p.add_argument("--only", choices=("train", "shard"), default=None, help="run only one of the two jobs")
    p.add_argument("--launch-timeout", type=float, default=900, help="seconds one launch may take (default 900)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    temp_root = None
    if args.workdir is None:
        temp_root = Path(tempfile.mkdtemp(prefix="chaos-"))
        root = temp_root
    else:
        root = args.workdir.resolve()
        if root.exists() and any(root.iterdir()):
            log(f"error: --workdir {root} is not empty")
            return 2
        root.mkdir(parents=True, exist_ok=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="chaos-ray-", dir="/tmp"))
    outcomes: list[Outcome] = []
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` or a scheduler: clean up first
    try:
        train_images = root / "images-train"
        data_cmd = [PY, "-m", "data_prep", "demo-data", str(train_images), "--classes", "4", "--per-class", "40",
                    "--size", "40", "--seed", "0", "--label-set", "shape-color"]
        run_checked(data_cmd, timeout=300)
        shard_images = train_images
        if args.images != 160 and args.only != "train":
            shard_images = root / "images-shard"
            run_checked([*data_cmd[:4], str(shard_images), "--classes", "4", "--per-class",
                         str(max(1, args.images // 4)), *data_cmd[9:]], timeout=300)
        log(f"workdir {root}; seed {args.seed}")
        if args.only in (None, "train"):
            shards = root / "train-shards"
            run_checked([PY, "-m", "data_prep", "shard", str(train_images), str(shards), "--split", "train",
                         "--shard-size", "32", "--seed", "0", "--workers", "1", "--no-progress"], timeout=600,
                        env=base_env(RAY_TMPDIR=str(ray_tmp)))
            training = Training(args, shards, root)
            ref = training.reference()
            log(f"[train] uninterrupted: {ref[0]:.1f}s ({ref[1]:.1f}s until step 1, {ref[2]:.2f}s per step), "
                f"{args.steps} steps, checkpoint every {args.every}")
            outcomes.append(training.chaos(rng, args.kills_train, ref))
        if args.only in (None, "shard"):
            sharding = Sharding(args, shard_images, root, ray_tmp)
            ref_s = sharding.reference()
            log(f"[shard] uninterrupted: {ref_s:.1f}s for {args.images} images, shard size {args.shard_size}")
            outcomes.append(sharding.chaos(rng, args.kills_shard, ref_s))
    finally:
        for launch in list(_ACTIVE):
            launch.cleanup()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if temp_root is not None:
            shutil.rmtree(temp_root, ignore_errors=True)
    table = summary(outcomes)
    log("\n" + table)
    ok = bool(outcomes) and all(o.identical for o in outcomes)
    if args.workdir is not None:
        (root / "summary.json").write_text(json.dumps(
            [{"job": o.name, "identical": o.identical, "completed": o.completed, "planned": o.planned,
              "kills": [dict(vars(k), redone=k.redone) for k in o.kills], "launches": o.launches,
              "failures": o.failures, "ref_s": o.ref_s, "chaos_s": o.chaos_s, "detail": o.detail}
             for o in outcomes], indent=1))
    log("RESULT: " + ("identical" if ok else "NOT identical"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Driver memory and time of listing + planning as the number of inputs grows.

    python benchmarks/plan_scale.py                        # quick: 50k, 200k, 800k entries
    python benchmarks/plan_scale.py --sizes 1M,4M,16M      # the acceptance run
    python benchmarks/plan_scale.py --baseline /tmp/before # also the old in-memory planner, side by side
    python benchmarks/plan_scale.py --sizes 1M,4M --dedup --before /tmp/before   # --dedup, new vs a checkout
    python benchmarks/plan_scale.py --source webdataset --sizes 100k,400k --before /tmp/before   # packed listing
    python benchmarks/plan_scale.py --listing-workers 1,2  # the listing in parts on 1 and 2 Ray workers

Input (--source): a generated JSONL manifest of N rows over 1000 classes, whose paths do not exist and are never
read (default); N webdataset samples (a 16-byte .jpg and a .cls member each) in tars of 10,000; or N members
over 1000 per-class tars (ImageNet-21K's layout, 16-byte members).
The image scan is SKIPPED (synthetic: every entry usable, sha1 of its id) -- this measures listing, the
per-partition judge/sort, the scan bookkeeping (partition files and receipts on OUT/_state) and the shard
ranges, not Pillow. The scan tasks and the read of shard 0's entries (a write task's work) run in the measured
process too, so the peak covers them as well as the driver. (The manifest lister stats every path: a missing file costs one failed stat, and the
rows are then rejected as missing_file; so the benchmark passes --assume-present, see below.)

--listing-workers 1,2: N members (the first of --sizes, default 400k) in per-class tars of --per-part members
each (default 4,000: ImageNet-21K's tars hold ~650 JPEGs, JFT-style webdataset tars ~10,000), listed by
``shard.listing_parts`` on a private Ray of 1, then 2, CPUs (each in its own subprocess, Ray's workers warmed
first). Printed per worker count: the parts phase (the Ray tasks: what spreads over the cluster), the merge
and judge (the driver merges, groups of partitions are judged by Ray tasks on the driver's node), and ``listing speed-up (2 vs 1 workers): X`` of the parts phase, the
per-core rate, and what it projects for JFT-3B (3e9 images) on 100 cores. On a machine shared with other
jobs the speed-up says little: with the kernel's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``)
all of one session's processes -- here the driver and its Ray workers -- share one fair slice of the CPUs, so
a second worker adds a core only when one is idle; the load average is printed with the result.

Each (mode, N) runs in its own subprocess, which reports its own peak RSS (VmHWM) and wall time.
Modes: ``new`` (data_prep.sources.listing.list_partitioned + tasks.scan_partitions + plan.shard_ranges, in-process,
no Ray) and ``old`` (list_inputs + build_plan of a checkout of the code before partitioned planning, e.g.
``git worktree add /tmp/before HEAD``). Printed: a table, the ratios largest/smallest N of peak memory and of
time per entry, and a linear extrapolation to 13M and 1B entries.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def make_manifest(path: Path, n: int, classes: int = 1000) -> None:
    with open(path, "w") as handle:
        for start in range(0, n, 100_000):
            handle.write("".join(f'{{"path":"img/{i % 997:03d}/im{i:09d}.jpg","label":"c{i % classes:04d}"}}\n'
                                 for i in range(start, min(n, start + 100_000))))


def make_webdataset(folder: Path, n: int, classes: int = 1000, per_tar: int = 10_000) -> None:
    import io
    import tarfile

    folder.mkdir(parents=True)
    for start in range(0, n, per_tar):
        with tarfile.open(folder / f"{start // per_tar:06d}.tar", "w") as archive:
            for i in range(start, min(n, start + per_tar)):
                for ext, data in (("jpg", b"\xff\xd8" + i.to_bytes(14, "big")), ("cls", b"%d" % (i % classes))):
                    info = tarfile.TarInfo(f"s{i:09d}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))


def make_class_tars(folder: Path, n: int, classes: int = 1000) -> None:
    import io
    import tarfile

    folder.mkdir(parents=True)
    for c in range(classes):
        with tarfile.open(folder / f"n{c:08d}.tar", "w") as archive:
            for i in range(c, n, classes):
                info = tarfile.TarInfo(f"n{c:08d}_{i}.JPEG")
                info.size = 16
                archive.addfile(info, io.BytesIO(b"\xff\xd8" + i.to_bytes(14, "big")))


SOURCES = {"manifest": lambda path, n: make_manifest(path, n), "webdataset": make_webdataset, "tars": make_class_tars}


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _present(monkey_module) -> None:
    """Every manifest path "exists" (size 1000, mtime 0): the benchmark has no image files, and a stat that
    fails would reject every row as missing_file before planning."""
    monkey_module.stat = lambda path: (1000, 0)


def _data_prep_modules():
    """data_prep's job, layout, manifests, plan, sources and tasks modules, in the subpackage layout or, for a
    `--before` checkout from before it, the flat one (the measured code is the same)."""
    try:
        from data_prep.shard import job, layout, plan, tasks
        from data_prep.sources import listing as sources, manifests
    except ImportError:
        from data_prep import job, layout, manifests, plan, sources, tasks
    return job, layout, manifests, plan, sources, tasks


def child_new(manifest: Path, work: Path, shard_size: int, dedup: bool = False, kind: str = "manifest") -> dict:
    from types import SimpleNamespace

    job, layout, manifests, plan, sources, tasks = _data_prep_modules()

    _present(manifests)
    start = time.perf_counter()
    listing = sources.list_partitioned(manifest, kind, None, 0, work / "spill")
    listed = time.perf_counter() - start
    out = work / "out"
    usable = [0] * len(listing.counts)
    for part in range(len(listing.counts)):  # the driver's loop of job._scan, its task run in-process (no Ray)
        if listing.counts[part]:
            target = layout.inputs_path(out, "train", part)  # what job._publish_inputs does
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(listing.inputs_path(part), target)
            (receipt,) = tasks.scan_partitions(str(out), "train", "f", [part], 0, synthetic=True)
            usable[part] = receipt["usable"]
    duplicates = job._dedup(SimpleNamespace(out=str(out), split="train")) if dedup else {}  # what plan_job does
    assert not duplicates  # synthetic sha1s are all distinct: this measures the bookkeeping of every pair
    shards = plan.shard_ranges(usable, shard_size)
    first = tasks.plan_entries(out, "train", shards[0], listing.classes, {})  # a write task's read of shard 0
    assert len(first) == min(shard_size, sum(usable))
    return {"entries": listing.listed, "shards": len(shards), "list_s": listed,
            "seconds": time.perf_counter() - start, "peak_mb": _peak_rss_mb()}


def child_old(manifest: Path, shard_size: int, kind: str = "manifest") -> dict:
    from data_prep import manifests, plan, sources  # a checkout from before partitioned planning: the flat layout
    from data_prep.images import ScanResult

    _present(manifests)
    start = time.perf_counter()
    listing = sources.list_inputs(manifest, kind, None)
    listed = time.perf_counter() - start
    import hashlib

    scans = {i.id: ScanResult(None, "", 64, 48, hashlib.sha1(i.id.encode()).hexdigest()) for i in listing.inputs}
    built = plan.build_plan(listing, scans, "f", shard_size, 0, False)
    return {"entries": len(listing.inputs) + len(listing.rejects), "shards": len(built.shards), "list_s": listed,
            "seconds": time.perf_counter() - start, "peak_mb": _peak_rss_mb()}


def child_listing(src: Path, work: Path, workers: int) -> dict:
    """The listing in parts on a private Ray of `workers` CPUs: parts phase (Ray tasks) and driver merge, timed.
    workers 0: the one-process listing (``list_partitioned``), the baseline."""
    if workers == 0:
        from data_prep.sources.listing import list_partitioned

        start = time.perf_counter()
        listing = list_partitioned(src, "tars", None, 0, work / "spill")
        seconds = time.perf_counter() - start
        return {"entries": listing.listed, "parts": 1, "parts_s": seconds, "merge_s": 0.0, "seconds": seconds,
                "peak_mb": _peak_rss_mb()}
    import ray

    from data_prep.shard import job
    from data_prep.shard.cluster import init_local_ray
    from data_prep.shard.config import ShardConfig
    from data_prep.shard.judge_tasks import run_on_driver_node
    from data_prep.shard.listing_parts import list_in_parts
    from data_prep.sources.parts import plan_parts

    init_local_ray(workers)

    @ray.remote(num_cpus=1)
    def warm() -> int:  # start every worker process and import the lister before the clock starts
        import data_prep.shard.listing_parts  # noqa: F401

        return os.getpid()

    ray.get([warm.remote() for _ in range(2 * workers)])
    cfg = ShardConfig(src=src, out=work / "out", progress=False, workers=workers)
    marks = {}

    def timed_remote(*args):
        job._run_remote(*args)
        marks["tasks_end"] = time.perf_counter()

    def timed_groups(*args):
        begin = time.perf_counter()
        results = run_on_driver_node(*args)
        marks["judge_s"] = time.perf_counter() - begin
        return results

    start = time.perf_counter()
    plan = plan_parts(cfg.src, "tars", cfg.seed, None, None, cfg.limits())
    (work / "spill").mkdir()
    listing = list_in_parts(cfg, plan, work / "spill", lambda: 2 * workers, timed_remote, None, timed_groups)
    end = time.perf_counter()
    ray.shutdown()
    return {"entries": listing.listed, "parts": len(plan.parts), "parts_s": marks["tasks_end"] - start,
            "merge_s": end - marks["tasks_end"], "judge_s": marks["judge_s"], "seconds": end - start,
            "peak_mb": _peak_rss_mb()}


def listing_workers(args, counts: list[int]) -> int:
    """--listing-workers: the same generated per-class tars listed on each worker count, side by side."""
    n = parse_size(args.sizes.split(",")[0]) if args.sizes_given else 400_000
    results = {}
    with tempfile.TemporaryDirectory(prefix="plan_scale-", dir=args.dir) as tmp:
        src = Path(tmp) / "tars"
        make_class_tars(src, n, classes=max(1, n // args.per_part))
        for workers in [0, *counts]:
            with tempfile.TemporaryDirectory(prefix="work-", dir=tmp) as work:
                cmd = [sys.executable, __file__, "--child", "listing", "--manifest", str(src), "--work", work,
                       "--workers", str(workers)]
                proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                      capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(f"listing child ({workers} workers) failed:\n{proc.stderr[-3000:]}")
            r = results[workers] = json.loads(proc.stdout.strip().splitlines()[-1])
            if not workers:
                print(f"one process (no Ray): {r['entries']:,} entries in {r['seconds']:.2f} s "
                      f"({r['entries'] / r['seconds']:,.0f} entries/s), peak {r['peak_mb']:.0f} MB", flush=True)
                continue
            print(f"{workers} worker(s): {r['entries']:,} entries in {r['parts']} parts: parts {r['parts_s']:.2f} s "
                  f"({r['entries'] / r['parts_s']:,.0f} entries/s), merge+judge {r['merge_s']:.2f} s "
                  f"({r['entries'] / r['merge_s']:,.0f} entries/s; judge {r['judge_s']:.2f} s), "
                  f"total {r['seconds']:.2f} s, "
                  f"driver peak {r['peak_mb']:.0f} MB", flush=True)
    one, most = results[counts[0]], results[counts[-1]]
    speedup = one["parts_s"] / most["parts_s"]
    print(f"listing speed-up ({counts[-1]} vs {counts[0]} workers): {speedup:.2f}")
    print(f"end-to-end listing speed-up incl. the driver's merge ({counts[-1]} vs {counts[0]}): "
          f"{one['seconds'] / most['seconds']:.2f}")
    per_core = one["entries"] / one["parts_s"] / counts[0]
    judge_core = one["entries"] / one["judge_s"] / counts[0]
    merge_rate = one["entries"] / (one["merge_s"] - one["judge_s"])  # the driver's own pass: one core
    jft = 3e9
    print(f"per-core listing rate: {per_core:,.0f} entries/s; JFT-3B (3e9) parts phase on 100 cores: "
          f"{jft / (100 * per_core) / 3600:.2f} h (linear); judge {judge_core:,.0f} entries/s per core of the "
          f"driver's node: {jft / (64 * judge_core) / 3600:.2f} h on a 64-core node; the driver's merge pass "
          f"{merge_rate:,.0f} entries/s (one core): {jft / merge_rate / 3600:.2f} h; one process, whole listing: "
          f"{jft * results[0]['seconds'] / results[0]['entries'] / 3600:.1f} h")
    print(f"parts on {counts[-1]} workers vs one process, end to end: "
          f"{results[0]['seconds'] / most['seconds']:.2f}x")
    print(f"load average now: {os.getloadavg()[0]:.2f} (1 min)")
    return 0


def run_child(mode: str, manifest: Path, shard_size: int, code: Path, dedup: bool = False,
              kind: str = "manifest") -> dict:
    with tempfile.TemporaryDirectory(prefix="plan_scale-", dir=manifest.parent) as work:
        cmd = [sys.executable, __file__, "--child", mode, "--manifest", str(manifest), "--work", work,
               "--shard-size", str(shard_size), "--source", kind, *(["--dedup"] if dedup else [])]
        env = {**os.environ, "PYTHONPATH": str(code)}
        proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50k,200k,800k", help="comma-separated entry counts (1M, 4M, 16M, ...)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--baseline", type=Path, help="a checkout of the old code to run side by side")
    parser.add_argument("--dir", type=Path, help="where the manifests go (default: a temp folder)")
    parser.add_argument("--dedup", action="store_true", help="also plan --dedup (new mode; with --before CODE, "
                                                                "the same run under another checkout's code)")
    parser.add_argument("--source", choices=tuple(SOURCES), default="manifest",
                        help="what to generate and list (default manifest; see above)")
    parser.add_argument("--before", "--baseline-dedup", dest="before", type=Path,
                        help="a checkout whose listing and planning run side by side (the new mode under its "
                             "code: what a change did)")
    parser.add_argument("--listing-workers", help="comma-separated Ray CPU counts (e.g. 1,2): time the listing in "
                                                  "parts of generated per-class tars on each")
    parser.add_argument("--per-part", type=int, default=4000, help="--listing-workers: members per tar")
    parser.add_argument("--child", choices=["new", "old", "listing"], help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes_given = "--sizes" in (argv if argv is not None else sys.argv)
    if args.child == "listing":
        print(json.dumps(child_listing(args.manifest, args.work, args.workers)))
        return 0
    if args.listing_workers:
        return listing_workers(args, [int(w) for w in args.listing_workers.split(",")])
    if args.child:
        result = (child_new(args.manifest, args.work, args.shard_size, args.dedup, args.source)
                  if args.child == "new" else child_old(args.manifest, args.shard_size, args.source))
        print(json.dumps(result))
        return 0
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    modes = [("new", ROOT)] + ([("old", args.baseline.resolve())] if args.baseline else [])
    if args.before:
        modes.append(("before", args.before.resolve()))  # "new" mode under that checkout's modules
    results: dict[str, list[dict]] = {m: [] for m, _ in modes}
    with tempfile.TemporaryDirectory(prefix="plan_scale-", dir=args.dir) as tmp:
        for n in sizes:
            manifest = Path(tmp) / (f"manifest-{n}.jsonl" if args.source == "manifest" else f"{args.source}-{n}")
            SOURCES[args.source](manifest, n)
            for mode, code in modes:
                r = run_child("new" if mode == "before" else mode, manifest, args.shard_size, code,
                              args.dedup and mode != "old", args.source)
                results[mode].append(r)
                print(f"{mode:>4} {n:>12,} entries: peak {r['peak_mb']:9.1f} MB, {r['seconds']:8.1f} s "
                      f"(list {r['list_s']:.1f} s), {1e6 * r['seconds'] / n:6.2f} us/entry, {r['shards']} shards",
                      flush=True)
            shutil.rmtree(manifest) if manifest.is_dir() else manifest.unlink()
    print("\nmode      entries    peak MB   seconds  us/entry")
    for mode, _ in modes:
        for n, r in zip(sizes, results[mode]):
            print(f"{mode:>4} {n:>12,} {r['peak_mb']:10.1f} {r['seconds']:9.1f} {1e6 * r['seconds'] / n:9.2f}")
    for mode, _ in modes:
        rs = results[mode]
        if len(rs) < 2:
            continue
        small, big = rs[0], rs[-1]
        mem_ratio = big["peak_mb"] / small["peak_mb"]
        time_ratio = (big["seconds"] / sizes[-1]) / (small["seconds"] / sizes[0])
        print(f"{mode}: {sizes[-1]:,} vs {sizes[0]:,}: peak memory x{mem_ratio:.2f}, time per entry x{time_ratio:.2f}")
        # linear fit through the two ends: memory = a + b*n, time = c + d*n
        b = (big["peak_mb"] - small["peak_mb"]) / (sizes[-1] - sizes[0])
        d = (big["seconds"] - small["seconds"]) / (sizes[-1] - sizes[0])
        for n in (13_000_000, 1_000_000_000):
            mem = small["peak_mb"] + b * (n - sizes[0])
            sec = small["seconds"] + d * (n - sizes[0])
            print(f"{mode}: extrapolated to {n:,}: peak {mem:,.0f} MB, {sec / 3600:,.2f} h single-process")
    return 0


if __name__ == "__main__":
    sys.exit(main())

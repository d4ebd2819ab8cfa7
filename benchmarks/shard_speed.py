"""Images/s of the Ray shard job (2 workers) against a single-process webdataset.ShardWriter loop.

Both sides do the same per-image work on the same generated JPEGs: read, sha1, decode (Pillow draft),
EXIF-rotate, convert, resize to shorter side <= --max-size, encode JPEG, write a tar sample with jpg/cls/json.
The Ray side additionally scans every file first (header, completeness, sha1) and plans the global shuffle,
because that is what the real job does.

Three figures are printed:
  baseline        single process, webdataset.ShardWriter
  ray end-to-end  `python -m data_prep shard` as a user runs it: starts a private Ray, scans, writes, stops
  ray job         the same job on an already running Ray (as on a cluster: startup excluded)

    .venv/bin/python benchmarks/shard_speed.py                 # 2,000 JPEGs of 500x375, max size 256
    .venv/bin/python benchmarks/shard_speed.py --images 500    # quicker
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.images import ImageOptions, encode  # noqa: E402
from data_prep.shard.job import ShardConfig, run_shard_job  # noqa: E402


def make_images(root: Path, count: int, width: int, height: int, classes: int = 10, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth structure + grain, quality 90; not noise, which no real dataset is).

    A pool of textures is cropped at random offsets, colour-shifted and grained, so every file differs.
    """
    rng = np.random.default_rng(seed)
    margin = 64
    yy, xx = np.mgrid[0:height + margin, 0:width + margin].astype(np.float32)
    pool = []
    for _ in range(16):
        coarse = rng.normal(128, 50, size=(6, 8, 3)).clip(0, 255).astype(np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((width + margin, height + margin), Image.BICUBIC),
                          dtype=np.int16)
        waves = 25 * np.sin(xx / rng.uniform(8, 40) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(8, 40))
        pool.append(base + waves.astype(np.int16)[..., None])
    paths = []
    for i in range(count):
        dx, dy = rng.integers(0, margin, size=2)
        crop = pool[i % len(pool)][dy:dy + height, dx:dx + width]
        pixels = crop + rng.integers(-25, 26, size=3, dtype=np.int16) + rng.integers(-6, 7, size=crop.shape,
                                                                                       dtype=np.int16)
        path = root / f"class_{i % classes:02d}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return sorted(paths)


def baseline(paths: list[Path], root: Path, out: Path, opts: ImageOptions, shard_size: int) -> tuple[float, float]:
    """The same per-image work in one process, written with webdataset.ShardWriter: (wall s, CPU s)."""
    import webdataset as wds  # imported before the clock starts

    classes = sorted({p.parent.name for p in paths})
    out.mkdir(parents=True)
    start, cpu = time.perf_counter(), time.process_time()
    with wds.ShardWriter(str(out / "base-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0) as sink:
        for path in paths:
            data = path.read_bytes()
            jpg, width, height = encode(data, opts)
            rel = path.relative_to(root).as_posix()
            meta = {"source": rel, "class": path.parent.name, "label": classes.index(path.parent.name),
                    "width": width, "height": height, "sha1": hashlib.sha1(data).hexdigest()}
            sink.write({"__key__": rel.replace("/", "_").replace(".", "_"), "jpg": jpg,
                        "cls": str(meta["label"]).encode(), "json": json.dumps(meta).encode()})
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--max-size", type=int, default=256)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--shard-size", type=int, default=100, help="samples per shard (= per Ray task)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="baseline and Ray job are run alternately this many times; best and median are "
                             "reported (the machine is shared, so single runs are noisy)")
    parser.add_argument("--keep", action="store_true", help="keep the generated images and shards")
    args = parser.parse_args()

    import ray

    from data_prep.shard.cluster import init_local_ray

    work = Path(tempfile.mkdtemp(prefix="shard-speed-"))
    n = args.images
    try:
        t0 = time.perf_counter()
        src = work / "src"
        paths = make_images(src, n, args.width, args.height)
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"generated {n} JPEGs of {args.width}x{args.height} ({size_mb:.1f} MB) in "
              f"{time.perf_counter() - t0:.1f} s; max size {args.max_size}, quality {args.quality}, shard size "
              f"{args.shard_size}, {os.cpu_count()} CPUs on this machine, load average "
              f"{os.getloadavg()[0]:.1f}")
        opts = ImageOptions(max_size=args.max_size, quality=args.quality)
        cfg = dict(src=src, shard_size=args.shard_size, seed=0, max_size=args.max_size, quality=args.quality,
                   workers=args.workers, progress=False)

        start = time.perf_counter()
        e2e = run_shard_job(ShardConfig(out=work / "ray_e2e", **cfg))  # starts and stops a private Ray
        e2e_s = time.perf_counter() - start
        assert e2e.num_samples == n

        init_local_ray(args.workers)
        run_shard_job(ShardConfig(out=work / "warmup", **{**cfg, "src": _subset(src, work / "warm_src")}))
        base_runs, ray_runs, base_cpu, ray_cpu = [], [], [], []
        for r in range(args.repeats):
            wall, cpu = baseline(paths, src, work / f"base{r}", opts, args.shard_size)
            base_runs.append(wall)
            base_cpu.append(cpu)
            start = time.perf_counter()
            job = run_shard_job(ShardConfig(out=work / f"ray{r}", **cfg))
            ray_runs.append(time.perf_counter() - start)
            ray_cpu.append(job.task_cpu_seconds)
            assert job.num_samples == n
            print(f"  run {r}: baseline {n / base_runs[-1]:6.1f} images/s, ray job {n / ray_runs[-1]:6.1f} images/s "
                  f"(phases {job.phases}), load average {os.getloadavg()[0]:.1f}")
        ray.shutdown()

        def rate(runs, pick):
            return n / pick(runs)

        best_base, best_ray = rate(base_runs, min), rate(ray_runs, min)
        med_base, med_ray = rate(base_runs, statistics.median), rate(ray_runs, statistics.median)
        print(f"baseline        1 process, webdataset.ShardWriter:  best {best_base:6.1f}  median {med_base:6.1f} "
              f"images/s")
        print(f"ray job         {args.workers} workers, Ray already up:     best {best_ray:6.1f}  "
              f"median {med_ray:6.1f} images/s   ratio best {best_ray / best_base:4.2f}  "
              f"median {med_ray / med_base:4.2f}")
        print(f"ray end-to-end  {args.workers} workers, incl. Ray start/stop: {n / e2e_s:6.1f} images/s "
              f"(ratio {n / e2e_s / best_base:4.2f} to the best baseline), phases {e2e.phases}")
        print(f"per core: ray job best {best_ray / args.workers:6.1f} images/s per worker; CPU time per image: "
              f"baseline {1e3 * min(base_cpu) / n:.2f} ms, ray shard tasks {1e3 * min(ray_cpu) / n:.2f} ms "
              f"(= {n / min(ray_cpu):.0f} images per CPU-second)")
        same = _payload(work / "ray_e2e") == _payload(work / "ray0")
        print(f"every Ray run wrote byte-identical shards: {same}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _subset(src: Path, dest: Path, count: int = 8) -> Path:
    """A few images to start Ray's worker processes before the timed run."""
    for path in sorted(src.rglob("*.jpg"))[:count]:
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return dest


def _payload(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


if __name__ == "__main__":
    main()

"""Training input pipeline throughput: our WebDataset shard stream against torchvision's ImageFolder.

    .venv/bin/python benchmarks/loader_speed.py [--classes 8 --per-class 128 --size 256 --image-size 224
                                                 --workers 2 --batch 64 --batches 12 --rounds 3 --mix 0.8
                                                 --decode cpu|gpu --device cpu|cuda]
    .venv/bin/python benchmarks/loader_speed.py --per-class 64 --batches 6 --rounds 3   # a quicker run

Both sides decode JPEGs and apply the same train transform (RandomResizedCrop, flip, RandAugment(2, 15),
normalise, same parameters) with the same number of DataLoader workers and batch size, over the same images:
loose files (`data_prep demo-data`) for ImageFolder, with its PIL loader and the ops placed as torchvision's
classification reference presets place them, and for ours the shards `data_prep shard` made from that folder,
read by pipeline.data.loader with pipeline.data.transforms.train_transform (tensor decode and crop, RandAugment on PIL);
our workers ship uint8 and the batch is normalised (and with --mix, MixUp/CutMix'ed) where it is consumed,
on --device. ImageFolder ships float32 from its workers, as usual (and with --mix, MixUp/CutMix run in the
consumer on CPU). `--decode gpu` measures data.decode=gpu (JPEG bytes shipped, decode and augmentation on
--device; on a CPU device this only exercises the path). The two alternate round by round in this
process so load from other processes hits both alike; the figure per side is the median round. Prints both
rates (wall-clock images/s, and images per CPU-second of all processes, which other load does not skew) and
their ratios (target >= 1.3).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil  # comes with DeepSpeed (and Ray), installed with the project
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data.loader import TrainLoader  # noqa: E402
from pipeline.data.shards import open_shards, worker_init  # noqa: E402
from pipeline.data.transforms import MEAN, STD, batch_mix_transform  # noqa: E402


def make_data(root: Path, classes: int, per_class: int, size: int) -> tuple[Path, Path]:
    images, shards = root / "images", root / "shards"
    py = sys.executable
    subprocess.run([py, "-m", "data_prep", "demo-data", str(images), "--classes", str(classes), "--per-class",
                    str(per_class), "--size", str(size), "--seed", "0"], check=True, capture_output=True)
    # --max-size 0: the shards hold the very same JPEG bytes as the loose files.
    subprocess.run([py, "-m", "data_prep", "shard", str(images), str(shards), "--split", "train", "--shard-size",
                    "128", "--seed", "0", "--max-size", "0", "--workers", "1"], check=True, capture_output=True)
    return images, shards


def cpu_seconds() -> float:
    """CPU time used so far by this process and its live children (the DataLoader workers)."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(make_iterator, n: int, warmup: int = 3) -> tuple[float, float]:
    """(images/s of wall time, images per CPU-second of all processes) over `n` batches after `warmup`.

    The CPU figure does not move when other programs load the machine (this one is shared); the wall figure
    is what a trainer would see. Both are taken in steady state, after the workers have started.
    """
    it, close = make_iterator()
    for _ in range(warmup):
        next(it)
    cpu0, start, timed = cpu_seconds(), time.perf_counter(), 0
    for _ in range(n):
        timed += next(it)[0].shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    close()
    gc.collect()
    return timed / wall, timed / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=128)
    parser.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="training resolution (RandomResizedCrop)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this (the consuming) process")
    parser.add_argument("--mix", type=float, default=0.0, help="MixUp and CutMix alpha on both sides (0: off)")
    parser.add_argument("--decode", choices=("cpu", "gpu"), default="cpu", help="our data.decode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where our loader normalises the uint8 batches (the trainer passes its device); "
                             "ImageFolder normalises in its workers, as usual")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    with tempfile.TemporaryDirectory(prefix="loader-speed-") as tmp:
        images, shard_dir = make_data(Path(tmp), args.classes, args.per_class, args.size)
        shards = open_shards(str(shard_dir), "train")
        total = args.classes * args.per_class
        print(f"{total} JPEGs of {args.size}px in {len(shards.urls)} shards; transform to {args.image_size}px; "
              f"{args.workers} workers, batch {args.batch}, {args.batches} batches x {args.rounds} rounds; "
              f"our batches normalised on {args.device}, decode {args.decode}, mix {args.mix}")
        from pipeline.data.device_augment import shared_memory_bytes
        print(f"our shared memory bound per rank: {shared_memory_bytes(args.workers, 4, args.batch, args.image_size) / 1e6:.0f} MB "
              f"(uint8; float32 would be 4x)")

        def ours():
            loader = TrainLoader(shards, seed=0, rank=0, world_size=1, num_workers=args.workers,
                                 micro_batch_size=args.batch, image_size=args.image_size, randaugment_layers=2,
                                 randaugment_magnitude=15, num_classes=args.classes, shuffle_buffer=1000,
                                 mixup_alpha=args.mix, cutmix_alpha=args.mix, decode=args.decode,
                                 device=torch.device(args.device), pin_memory=args.device == "cuda")
            return iter(loader), loader.close

        def imagefolder():
            # The standard loose-file pipeline: PIL loader, shuffled sampler, and the same ops with the same
            # parameters placed as torchvision's classification reference presets place them (PIL backend,
            # the default): augment the PIL image, then PILToTensor, ToDtype, Normalize.
            dataset = ImageFolder(str(images), transform=v2.Compose([
                v2.RandomResizedCrop(args.image_size, antialias=True), v2.RandomHorizontalFlip(),
                v2.RandAugment(num_ops=2, magnitude=15), v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]))
            loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                worker_init_fn=worker_init, drop_last=True,
                                prefetch_factor=4 if args.workers else None,
                                # alive across epochs: a small --per-class run would otherwise lose the CPU
                                # time of the workers of a finished epoch from the count (even go negative)
                                persistent_workers=args.workers > 0)
            state = {"it": None}
            mix = batch_mix_transform(args.classes, args.mix, args.mix)

            def forever():
                while True:
                    state["it"] = iter(loader)
                    for batch in state["it"]:
                        yield mix(*batch) if mix is not None else batch

            def close():
                if state["it"] is not None and hasattr(state["it"], "_shutdown_workers"):
                    state["it"]._shutdown_workers()
            return forever(), close

        names = ("shards (ours)", "ImageFolder")
        wall: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name, make in zip(names, (ours, imagefolder)):
                w, c = measure(make, args.batches)
                wall[name].append(w)
                cpu[name].append(c)
                print(f"  round {r + 1}: {name:14s} {w:8.1f} images/s   {c:7.1f} images per CPU-second", flush=True)
        med = {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in names}
        for n in names:
            print(f"{n + ':':15s} {med[n][0]:8.1f} images/s (wall)   {med[n][1]:7.1f} images per CPU-second")
        print(f"ratio (wall):  {med[names[0]][0] / med[names[1]][0]:.2f}x")
        print(f"ratio (CPU):   {med[names[0]][1] / med[names[1]][1]:.2f}x   (target >= 1.3; the CPU figure does not "
              f"depend on other load)")


if __name__ == "__main__":
    main()

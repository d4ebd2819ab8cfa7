"""Training-step throughput of our CoAtNet-0 against timm's `coatnet_0_224`, side by side.

    .venv/bin/pip install timm     # only this benchmark needs it (make bench installs it)
    .venv/bin/python benchmarks/model_speed.py [--batch 16 --steps 4 --rounds 3 --size 224 --dtype bf16]

One training step = forward, loss, backward, AdamW step, under bf16 autocast on CPU (or CUDA if
present). The two models alternate round by round in the same process so that load from other
processes and thermal drift hit both alike; the reported figure per model is the median round, with the
training TFLOP/s it means (pipeline.flops: 3 forward passes of 2 FLOPs per multiply-add) and, on a GPU
of known peak, the MFU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.units import precision_dtype  # noqa: E402
from model import create_model, param_groups  # noqa: E402
from pipeline.flops import device_peak_tflops, tflops_per_device, train_flops_per_image  # noqa: E402


def train_steps(model, optimizer, images, labels, steps, dtype, device) -> float:
    """Seconds for `steps` training steps (after the caller's warm-up)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def forward_macs(model, size: int, device) -> int:
    """Multiply-adds of one image's forward, counted the way model.count_macs counts (any nn.Module)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size, device=device))
    model.train()
    return counter.get_total_flops() // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args()
    try:
        import timm
    except ImportError:
        sys.exit("benchmarks/model_speed.py: timm is not installed; run `.venv/bin/pip install timm` (or `make bench`)")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = precision_dtype(args.dtype)
    torch.manual_seed(0)
    models = {
        "ours coatnet-0": create_model("coatnet-0", num_classes=1000, image_size=args.size),
        f"timm {timm.__version__} coatnet_0_224": timm.create_model("coatnet_0_224", num_classes=1000, img_size=args.size),
    }
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    runs = {}
    for name, model in models.items():
        model.to(device).train()
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
        train_steps(model, optimizer, images, labels, 1, dtype, device)  # warm-up: allocator, kernels
        runs[name] = (model, optimizer, [])
    for _ in range(args.rounds):
        for model, optimizer, seconds in runs.values():
            seconds.append(train_steps(model, optimizer, images, labels, args.steps, dtype, device))

    print(f"device={device} dtype={args.dtype} batch={args.batch} size={args.size} "
          f"threads={torch.get_num_threads()} steps/round={args.steps} rounds={args.rounds}")
    rates = {}
    peak = device_peak_tflops(device)
    for name, (model, _, seconds) in runs.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rates[name] = args.batch * args.steps / statistics.median(seconds)
        tflops = tflops_per_device(rates[name], train_flops_per_image(forward_macs(model, args.size, device)).model, 1)
        mfu = f"  MFU {100 * tflops / peak:.1f}%" if peak else ""
        print(f"{name:32s} {params:6.2f}M params  {rates[name]:8.2f} images/s (training step)  "
              f"{tflops:.3f} TFLOP/s{mfu}")
    ours, theirs = rates.values()
    print(f"ratio ours/timm = {ours / theirs:.3f}  (target >= 1.0)")


if __name__ == "__main__":
    main()

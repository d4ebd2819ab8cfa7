"""Training FLOPs per image, accelerator peaks, and MFU/HFU: the one place for this arithmetic.

The trainer's logs (pipeline.train.metrics.Throughput) and the planner's time estimate (launch.plan) both
count the same way:

- one forward pass costs 2 FLOPs per multiply-add (`model.count_macs`);
- training an image costs 3 forward passes' worth (forward, plus backward = twice the forward);
- activation checkpointing recomputes the forward in backward: one more forward pass of hardware work.

MFU (model FLOPs utilisation) counts the model's FLOPs only, so it does not reward recomputation and
compares across memory settings; HFU (hardware FLOPs utilisation) counts the recomputed forward too.
Without checkpointing the two are equal.

    flops = train_flops_per_image(macs, recompute=True)      # TrainFlops(model=6*macs, hardware=8*macs)
    utilization(images_per_s, flops.model, devices, peak)    # MFU
    train_seconds(images, flops.model, devices, peak, mfu)   # the planner's time estimate
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

FLOPS_PER_MAC = 2
TRAIN_PASSES = 3  # forward + backward (backward = 2 forwards)
RECOMPUTE_PASSES = 1  # activation checkpointing runs the forward again in backward

# Dense 16-bit (bf16) peak TFLOP/s per accelerator, no sparsity (vendor datasheets), matched by name.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "A10G": 125.0, "V100": 125.0, "GH200": 989.0, "B200": 2250.0,
                    # the lower-clocked, lower-power products (NVIDIA's data sheets; names as CUDA reports them)
                    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0}
DEFAULT_GPU = "H100"  # the planner's default when no --gpu-tflops is given (H100 SXM)


@dataclass(frozen=True)
class TrainFlops:
    """FLOPs of training one image: `model` (what MFU counts) and `hardware` (plus recompute; HFU)."""
    model: int
    hardware: int


def train_flops_per_image(macs_per_image: int, recompute: bool | float = False) -> TrainFlops:
    """Training FLOPs per image from the forward multiply-adds (see the module doc). `recompute`: True (every
    block), or the fraction of the forward recomputed (selective recompute: model.recompute_fraction)."""
    forward = FLOPS_PER_MAC * int(macs_per_image)
    passes = TRAIN_PASSES + RECOMPUTE_PASSES * float(recompute)
    return TrainFlops(model=TRAIN_PASSES * forward, hardware=int(passes * forward))


def peak_tflops_for_name(device_name: str) -> Optional[float]:
    """Peak bf16 TFLOP/s of an accelerator by its name ("NVIDIA H100 80GB HBM3"), or None if unknown."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # longest first: "GH200" before "H200"
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def device_peak_tflops(device) -> Optional[float]:
    """Peak bf16 TFLOP/s of a torch device; None on CPU or an accelerator not in the table."""
    if device.type != "cuda":
        return None
    import torch

    return peak_tflops_for_name(torch.cuda.get_device_name(device))


def tflops_per_device(images_per_s: float, flops_per_image: float, devices: int) -> float:
    """Achieved TFLOP/s per device when `devices` together train `images_per_s`."""
    return images_per_s * flops_per_image / 1e12 / max(1, devices)


def utilization(images_per_s: float, flops_per_image: float, devices: int, peak_tflops: float) -> float:
    """Fraction of the peak reached: MFU with model FLOPs per image, HFU with hardware FLOPs."""
    return tflops_per_device(images_per_s, flops_per_image, devices) / peak_tflops


def train_seconds(images: int, flops_per_image: float, devices: int, peak_tflops: float, mfu: float) -> float:
    """Seconds for `devices` to train `images` at utilisation `mfu` (the inverse of `utilization`)."""
    return images * flops_per_image / (devices * peak_tflops * 1e12 * mfu)

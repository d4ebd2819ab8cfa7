"""Precision names and image sizes, spelled one way for every stage.

    image_hw(224) == (224, 224); image_hw([256, 320]) == (256, 320)
    precision_dtype("bf16") is torch.bfloat16
"""
from __future__ import annotations

from typing import Sequence, Union

PRECISIONS = ("bf16", "fp16", "fp32")
ImageSize = Union[int, Sequence[int]]


def image_hw(size: ImageSize) -> tuple[int, int]:
    """(height, width) from an int or an [H, W] pair."""
    if isinstance(size, (int,)) and not isinstance(size, bool):
        return int(size), int(size)
    h, w = size  # type: ignore[misc]
    return int(h), int(w)


def precision_dtype(precision: str):
    """torch dtype of a precision name: bf16 -> bfloat16, fp16 -> float16, fp32 -> float32."""
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision not in table:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return table[precision]


def resolve_precision(name: str, device_type: str) -> str:
    """The precision to train in: "auto" -> "bf16" where the hardware computes bf16 natively, else "fp32".

    Native means a CUDA GPU with bf16 arithmetic (Ampere or newer), or a CPU whose PyTorch kernels run at
    the AVX512 level (`torch.backends.cpu.get_cpu_capability()`, which `ATEN_CPU_CAPABILITY=avx2` lowers
    to "AVX2") on a chip with AVX512-BF16 or AMX-BF16, or an Arm CPU with BF16 instructions. Elsewhere
    bf16 is emulated by conversions and runs slower than fp32. Explicit names pass through.
    """
    if name != "auto":
        precision_dtype(name)  # validates
        return name
    import torch

    if device_type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16" if ok else "fp32"
    if device_type != "cpu":
        return "fp32"
    level = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "SVE256", "DEFAULT", ...
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if level == "AVX512":
        if caps:
            native = bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
        else:  # older torch: oneDNN's own check
            native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return "bf16" if native else "fp32"
    if level.startswith("SVE") or caps.get("architecture") in ("arm64", "aarch64"):
        return "bf16" if (caps.get("bf16") or caps.get("sve_bf16")) else "fp32"
    return "fp32"

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


def dtype_precision(dtype) -> str:
    """The precision name of a torch dtype (inverse of precision_dtype)."""
    for name in PRECISIONS:
        if precision_dtype(name) == dtype:
            return name
    raise ValueError(f"no precision name for {dtype}")

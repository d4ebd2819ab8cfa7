"""Resize relative-position tables so a checkpoint made at one resolution loads at another.

Fine-tuning at 384/512 px from a 224 px checkpoint changes every attention stage's feature map, so
each head's (2H-1) x (2W-1) table is interpolated in 2-D to (2H'-1) x (2W'-1) (bilinear by default, as the paper;
Swin uses bicubic). The stage a table belongs to is read from its key (`stages.<i>.`), which fixes its
stride (16 for S3, 32 for S4), so no model config is needed.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .config import STAGE_STRIDES

TABLE_SUFFIX = "rel_pos.bias_table"
_STAGE = re.compile(r"(?:^|\.)stages\.(\d+)\.")


def resize_rel_pos_tables(state_dict: Mapping[str, torch.Tensor], image_size: int | Sequence[int],
                          mode: str = "bilinear") -> dict[str, torch.Tensor]:
    """A shallow copy of `state_dict` with every relative-position table resized for `image_size`.

    Tables that already have the target shape are returned as they are.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    out = dict(state_dict)
    for key, table in state_dict.items():
        if not key.endswith(TABLE_SUFFIX):
            continue
        match = _STAGE.search(key)
        if match is None:
            raise ValueError(f"cannot tell which stage the table {key!r} belongs to (no 'stages.<i>.' in its name)")
        stride = STAGE_STRIDES[int(match.group(1))]
        target = (2 * (height // stride) - 1, 2 * (width // stride) - 1)
        if tuple(table.shape[-2:]) == target:
            continue
        resized = F.interpolate(table.float().unsqueeze(0), size=target, mode=mode, align_corners=False)
        out[key] = resized.squeeze(0).to(table.dtype)
    return out

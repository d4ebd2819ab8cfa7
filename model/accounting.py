"""Counting a model without building it for real: parameters and multiply-adds on the meta device,
and the optimizer's parameter groups."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .coatnet import create_model


def _meta_model(name_or_model: str | nn.Module, image_size, **overrides) -> nn.Module:
    if isinstance(name_or_model, nn.Module):
        return name_or_model
    with torch.device("meta"):
        return create_model(name_or_model, image_size=image_size, **overrides)


def count_params(name_or_model: str | nn.Module, image_size: int | Sequence[int] = 224, **overrides) -> int:
    return sum(p.numel() for p in _meta_model(name_or_model, image_size, **overrides).parameters())


def count_macs(name_or_model: str | nn.Module, image_size: int | Sequence[int] = 224, **overrides) -> int:
    """Multiply-adds per image (the paper's "FLOPs"): FlopCounterMode's total / 2.

    A model passed in is run as it is (its device, its resolution); a name is built on the meta device.
    """
    model = _meta_model(name_or_model, image_size, **overrides)
    height, width = model.config.image_size
    param = next(model.parameters())
    x = torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: biases, norm weights and relative-position tables get no weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith("bias_table") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

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
    return _count(name_or_model, image_size, **overrides).get_total_flops() // 2


def recompute_fraction(name_or_model: str | nn.Module, stages: Sequence[int], image_size: int | Sequence[int] = 224,
                       **overrides) -> float:
    """The share of the forward's multiply-adds in the blocks of `stages`: what selective activation recompute
    (model.grad_checkpointing = a list of stages) runs again in backward."""
    if not stages:
        return 0.0
    per_stage = stage_fractions(name_or_model, image_size, **overrides)
    return sum(per_stage[i] for i in set(stages))


def stage_fractions(name_or_model: str | nn.Module, image_size: int | Sequence[int] = 224, **overrides) -> list[float]:
    """Per stage S1..S4, the share of the forward's multiply-adds in its blocks (one counted forward for all)."""
    counter = _count(name_or_model, image_size, **overrides)
    total = counter.get_total_flops()
    out = [0.0] * 4
    if not total:
        return out
    # FlopCounterMode counts per module path; a block's own entry (stages.i.blocks.j) already sums its children.
    for path, counts in counter.get_flop_counts().items():
        if path.startswith("CoAtNet.stages.") and ".blocks." in path and path.count(".") == 4:
            out[int(path.split(".")[2])] += sum(counts.values()) / total
    return out


def _count(name_or_model: str | nn.Module, image_size, **overrides) -> FlopCounterMode:
    """One forward of a batch of 1 under FlopCounterMode (no gradients, eval mode)."""
    model = _meta_model(name_or_model, image_size, **overrides)
    height, width = model.config.image_size
    param = next(model.parameters())
    x = torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """AdamW groups: biases, norm weights and relative-position tables get no weight decay.

    `layer_decay` (fine-tuning, timm's `param_groups_layer_decay`): each group also carries an `lr_scale`,
    layer_decay ** (L - layer_id) with the stem at layer 0, block k (0-based, over all stages) at k + 1 and the
    final norm, pre-logits and head at L = num_blocks + 1 (scale 1). Groups are ordered head first, so
    `param_groups[0]` holds the base LR. None or 1.0: the two plain groups (scale 1).
    """
    if layer_decay is None or layer_decay == 1.0:
        groups = {(0, True): [], (0, False): []}
        last = 0
    else:
        groups, last = {}, model.config.num_blocks + 1
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = not (param.ndim <= 1 or name.endswith("bias_table"))
        layer = _layer_id(name, model, last) if last else 0
        groups.setdefault((layer, decayed), []).append(param)
    out = []
    for (layer, decayed), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
        if last:
            group["lr_scale"] = float(layer_decay) ** (last - layer)
        out.append(group)
    return out


def _layer_id(name: str, model: nn.Module, last: int) -> int:
    """The layer of parameter `name` for layer-wise LR decay: stem 0, blocks 1..num_blocks, the rest `last`."""
    if name.startswith("stem."):
        return 0
    if name.startswith("stages."):
        _, stage, _, block = name.split(".")[:4]
        return 1 + sum(len(s.blocks) for s in model.stages[:int(stage)]) + int(block)
    return last

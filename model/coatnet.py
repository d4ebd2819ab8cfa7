"""CoAtNet: conv stem, two MBConv stages, two relative-attention Transformer stages (C-C-T-T).

Dai et al., "CoAtNet: Marrying Convolution and Attention for All Data Sizes" (NeurIPS 2021).
The model reads top to bottom like Table 3: stem (S0), stages S1..S4 built from the config's
segments, global average pooling, a LayerNorm, a pre-logits layer and a linear classifier (no class
token).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import MBConv, Stem, TransformerBlock
from .config import STAGE_STRIDES, CoAtNetConfig, get_config


class Stage(nn.Module):
    """One of S1..S4: its first block downsamples by 2, the rest keep the resolution."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class CoAtNet(nn.Module):
    def __init__(self, config: CoAtNetConfig):
        super().__init__()
        self.config = config
        self.recompute_stages = frozenset(config.recompute_stages)
        self.channels_last = False  # set by prepare_for_speed: convolutions then run NHWC in memory
        self.stem = Stem(3, config.stem_dim)

        drop_rates = [config.drop_path_rate * i / max(config.num_blocks - 1, 1) for i in range(config.num_blocks)]
        height, width = config.image_size
        in_dim, block_index, stages = config.stem_dim, 0, []
        for stage_spec, stride in zip(config.stages, STAGE_STRIDES):
            feat_size = (height // stride, width // stride)
            blocks = []
            for kind, depth, dim in stage_spec:
                for _ in range(depth):
                    block_stride = 2 if not blocks else 1
                    if kind == "C":
                        block = MBConv(in_dim, dim, block_stride, config.expand_ratio, config.se_ratio,
                                       config.stride_on, drop_rates[block_index])
                    else:
                        block = TransformerBlock(in_dim, dim, block_stride, config.head_dim, config.mlp_ratio,
                                                 feat_size, drop_rates[block_index])
                    blocks.append(block)
                    in_dim, block_index = dim, block_index + 1
            stages.append(Stage(blocks))
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(config.num_features)
        self.pre_logits = (nn.Sequential(nn.Linear(config.num_features, config.pre_logits_dim), nn.Tanh())
                           if config.pre_logits_dim else nn.Identity())
        self.head = nn.Linear(self.head_in_dim, config.num_classes) if config.num_classes else nn.Identity()
        self.apply(_init_weights)

    @property
    def head_in_dim(self) -> int:
        return self.config.pre_logits_dim or self.config.num_features

    def set_grad_checkpointing(self, enable: bool | Sequence[int] = True) -> None:
        """Recompute the blocks' activations in backward (memory for compute): every stage (True), none (False),
        or the listed stages (0..3 = S1..S4): selective recompute where the activations are largest."""
        self.config = replace(self.config, grad_checkpointing=enable if isinstance(enable, bool) else tuple(enable))
        self.recompute_stages = frozenset(self.config.recompute_stages)

    @property
    def grad_checkpointing(self) -> bool:
        """Whether any block recomputes its activations."""
        return bool(self.recompute_stages)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for another label set (fine-tuning)."""
        self.config = replace(self.config, num_classes=num_classes)
        device = self.norm.weight.device
        self.head = nn.Linear(self.head_in_dim, num_classes, device=device) if num_classes else nn.Identity()
        self.head.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features after the final norm and pre-logits layer: the classifier's input (B, C)."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # a no-op when the loader already delivers it
        x, layout = self.stem(x), "nchw"
        recompute = self.training and torch.is_grad_enabled()
        for index, stage in enumerate(self.stages):
            for block in stage.blocks:
                if block.layout != layout:  # channels-last NCHW -> NHWC is a free permute (no copy)
                    x = x.permute(0, 2, 3, 1) if block.layout == "nhwc" else x.permute(0, 3, 1, 2)
                    layout = block.layout
                if recompute and index in self.recompute_stages:
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        x = x.mean(dim=(1, 2) if layout == "nhwc" else (2, 3))
        return self.pre_logits(self.norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def prepare_for_speed(model: nn.Module, channels_last: bool = True, weights: bool = True) -> nn.Module:
    """Run the convolution stages in channels-last memory format (NHWC in memory, NCHW to the code).

    Why: cuDNN's and oneDNN's fast convolutions (tensor cores, depthwise) are NHWC kernels, and S2's
    channels-last output becomes S3's NHWC token map by a permute that copies nothing. The model converts
    its input, so it stays channels-last even where ZeRO flattens the conv weights back to contiguous.
    State dict, parameters and outputs are unchanged. Call before wrapping the model (DeepSpeed, DDP).
    `weights=False` leaves the conv weights' layout alone (a convolution follows its input's memory
    format): for DeepSpeed, whose ZeRO flattening views parameters as bytes and needs them contiguous.
    """
    target = model.module if hasattr(model, "module") and isinstance(model.module, CoAtNet) else model
    if not isinstance(target, CoAtNet):
        raise TypeError(f"prepare_for_speed expects a CoAtNet, got {type(model).__name__}")
    target.channels_last = channels_last
    if weights:
        target.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return model


def channels_last_default(device_type: str, precision: str) -> bool:
    """Whether prepare_for_speed should use channels-last: always on CUDA (cuDNN's NHWC tensor-core kernels);
    on CPU for 16-bit training only. Measured on CPU (AVX2, CoAtNet-0, batch 8): channels-last raised the
    speed ratio to timm from 1.27 to 1.50 in bf16 but lowered it from 1.55 to 1.22 in fp32 (oneDNN's
    fp32 NHWC depthwise and BatchNorm backward kernels are slower there)."""
    return device_type == "cuda" or precision in ("bf16", "fp16")


def _init_weights(module: nn.Module) -> None:
    """Common practice of each family: truncated normal (std 0.02) for linear layers and position
    tables (ViT), He normal over fan-out for convolutions (EfficientNet, timm), zero biases.

    A 0.02 std on convolutions would shrink the stem's output ~25x (fan-in 27), and the tiny models
    then barely learn in a demo's few hundred steps.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
    elif hasattr(module, "bias_table"):
        nn.init.trunc_normal_(module.bias_table, std=0.02)
    if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
        nn.init.zeros_(module.bias)


def create_model(name: str, num_classes: int = 1000, image_size: int | Sequence[int] = 224, **overrides) -> CoAtNet:
    """Build a CoAtNet by name ("coatnet-0".."coatnet-7", "coatnet-nano", "coatnet-tiny").

    `overrides` are CoAtNetConfig fields, e.g. drop_path_rate=0.2, stride_on="depthwise",
    grad_checkpointing=True. Works under `torch.device("meta")` for counting without memory.
    """
    overrides.pop("name", None)
    return CoAtNet(get_config(name, num_classes=num_classes, image_size=image_size, **overrides))

"""CoAtNet model sizes as data (the paper's Table 3), not as branches.

Every model has the same C-C-T-T skeleton: a conv stem (S0) and four stages S1..S4 at strides
4, 8, 16 and 32. A stage is a list of segments `(block, depth, dim)` where block is "C" (MBConv
with squeeze-excitation) or "T" (Transformer with relative attention). Only the first block of a
stage downsamples. CoAtNet-6/7 split S3 into an MBConv segment followed by a wider Transformer
segment at the same resolution, which is why stages hold segments rather than one (block, depth, dim).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

Segment = tuple[str, int, int]  # (block kind "C" | "T", number of blocks, channels)

STAGE_STRIDES = (4, 8, 16, 32)  # S1..S4 relative to the input; the stem (S0) is at stride 2


@dataclass(frozen=True)
class CoAtNetConfig:
    """Everything needed to build a CoAtNet; `create_model(**asdict(cfg))` round-trips."""

    name: str
    stem_dim: int
    stages: tuple[tuple[Segment, ...], ...]
    head_dim: int = 32  # channels per attention head
    # Pre-logits layer (Linear + tanh) before the classifier; None = as wide as S4, 0 = none. The paper's
    # text names no such layer, but its parameter counts include one: without it every model is short
    # by exactly width(S4)^2 (0.59M for CoAtNet-0, 9.4M for CoAtNet-7); the official code and timm's
    # `head_hidden_size` have it.
    head_hidden_dim: int | None = None
    num_classes: int = 1000
    image_size: tuple[int, int] = (224, 224)
    expand_ratio: int = 4  # MBConv inverted-bottleneck expansion
    se_ratio: float = 0.25  # squeeze-excitation bottleneck, relative to the MBConv input width
    mlp_ratio: int = 4  # Transformer FFN expansion
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this value over all blocks
    stride_on: str = "pointwise"  # "pointwise": stride on the first 1x1 conv (paper); "depthwise": the dagger rows
    # Recompute blocks' activations in backward to save memory: True (every stage), False, or the stages
    # (0..3 = S1..S4) whose blocks recompute, e.g. (0, 1): the early, high-resolution stages hold most activations.
    grad_checkpointing: bool | tuple[int, ...] = False

    def __post_init__(self):
        size = self.image_size
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "stages", tuple(tuple(tuple(seg) for seg in st) for st in self.stages))
        if len(self.stages) != len(STAGE_STRIDES):
            raise ValueError(f"{self.name}: a CoAtNet has 4 stages (S1..S4), got {len(self.stages)}")
        for h in size:
            if h <= 0 or h % 32:
                raise ValueError(f"image_size {size}: each side must be a positive multiple of 32 (e.g. 224, 384, 512)")
        if not isinstance(self.grad_checkpointing, bool):
            stages = tuple(sorted(set(self.grad_checkpointing)))
            if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(STAGE_STRIDES) for i in stages):
                raise ValueError(f"grad_checkpointing={self.grad_checkpointing!r}: true, false or stages in 0..3")
            object.__setattr__(self, "grad_checkpointing", stages)
        if self.stride_on not in ("pointwise", "depthwise"):
            raise ValueError(f"stride_on={self.stride_on!r}: use 'pointwise' (paper default) or 'depthwise'")
        for stage in self.stages:
            for kind, depth, dim in stage:
                if kind not in ("C", "T") or depth < 1 or dim < 1:
                    raise ValueError(f"{self.name}: bad segment {(kind, depth, dim)}")
                if kind == "T" and dim % self.head_dim:
                    raise ValueError(f"{self.name}: width {dim} is not a multiple of head_dim {self.head_dim}")

    @property
    def num_blocks(self) -> int:
        return sum(depth for stage in self.stages for _, depth, _ in stage)

    @property
    def recompute_stages(self) -> tuple[int, ...]:
        """The stages whose blocks recompute their activations in backward (grad_checkpointing)."""
        if isinstance(self.grad_checkpointing, bool):
            return tuple(range(len(self.stages))) if self.grad_checkpointing else ()
        return self.grad_checkpointing

    @property
    def num_features(self) -> int:
        return self.stages[-1][-1][2]

    @property
    def pre_logits_dim(self) -> int:
        return self.num_features if self.head_hidden_dim is None else self.head_hidden_dim

    def to_dict(self) -> dict:
        """Plain JSON-able kwargs for `create_model(name, **...)` (lists instead of tuples)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["image_size"] = list(self.image_size)
        out["stages"] = [[list(seg) for seg in st] for st in self.stages]
        if not isinstance(self.grad_checkpointing, bool):
            out["grad_checkpointing"] = list(self.grad_checkpointing)
        return out


def _c(depth: int, dim: int) -> tuple[Segment]:
    return (("C", depth, dim),)


def _t(depth: int, dim: int) -> tuple[Segment]:
    return (("T", depth, dim),)


# Table 3 of the paper: (stem width, S1..S4 segments, attention head size).
MODEL_SIZES: dict[str, dict] = {
    "coatnet-0": dict(stem_dim=64, stages=(_c(2, 96), _c(3, 192), _t(5, 384), _t(2, 768)), head_dim=32),
    "coatnet-1": dict(stem_dim=64, stages=(_c(2, 96), _c(6, 192), _t(14, 384), _t(2, 768)), head_dim=32),
    "coatnet-2": dict(stem_dim=128, stages=(_c(2, 128), _c(6, 256), _t(14, 512), _t(2, 1024)), head_dim=32),
    "coatnet-3": dict(stem_dim=192, stages=(_c(2, 192), _c(6, 384), _t(14, 768), _t(2, 1536)), head_dim=32),
    "coatnet-4": dict(stem_dim=192, stages=(_c(2, 192), _c(12, 384), _t(28, 768), _t(2, 1536)), head_dim=32),
    "coatnet-5": dict(stem_dim=192, stages=(_c(2, 256), _c(12, 512), _t(28, 1280), _t(2, 2048)), head_dim=64),
    # Table 3 prints S4 of CoAtNet-6 as 2 x 2048, but that model has 1.35B parameters and 1465B
    # multiply-adds at 512 px, 8% and 4% short of the paper's own 1.47B and 1521B. S4 = 2 x 3072 (as in
    # CoAtNet-7) gives 1.470B and 1495B, the same small FLOP shortfall as every other size, so the
    # printed width is taken to be a typo and the counts are followed.
    "coatnet-6": dict(
        stem_dim=192,
        stages=(_c(2, 192), _c(4, 384), (("C", 8, 768), ("T", 42, 1536)), _t(2, 3072)),
        head_dim=128,
    ),
    "coatnet-7": dict(
        stem_dim=192,
        stages=(_c(2, 256), _c(4, 512), (("C", 8, 1024), ("T", 42, 2048)), _t(2, 3072)),
        head_dim=128,
    ),
    # Tiny sizes for tests and the CPU demo: same block types and layout, a handful of blocks.
    "coatnet-nano": dict(stem_dim=16, stages=(_c(1, 16), _c(1, 24), _t(1, 32), _t(1, 64)), head_dim=16),
    "coatnet-tiny": dict(stem_dim=24, stages=(_c(1, 32), _c(2, 48), _t(2, 96), _t(1, 192)), head_dim=32),
}


def list_models() -> list[str]:
    return list(MODEL_SIZES)


def get_config(name: str, **overrides) -> CoAtNetConfig:
    """The config of a named model with keyword overrides (any CoAtNetConfig field)."""
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_SIZES)}")
    known = {f.name for f in fields(CoAtNetConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; known: {sorted(known - {'name'})}")
    return CoAtNetConfig(name=name, **{**MODEL_SIZES[name], **overrides})


__all__ = ["CoAtNetConfig", "MODEL_SIZES", "STAGE_STRIDES", "get_config", "list_models"]

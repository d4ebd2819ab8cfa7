"""Activation memory per image, measured by running the model on the meta device (no memory, no GPU).

Why measure instead of a formula: the bytes autograd keeps for backward depend on every op's
backward (BatchNorm keeps its input and statistics, GELU its input, SDPA its q/k/v/output and
log-sum-exp, ...). A `saved_tensors_hooks` pack hook sees exactly those tensors, so the count
follows the model as it changes. Tensors are deduplicated by storage (views and a tensor saved by
two ops count once) and parameters are excluded (they are model states, counted by DeepSpeed's
estimators).

Two corrections make the meta run match what a GPU keeps:
- On the meta device PyTorch dispatches `scaled_dot_product_attention` to its math fallback, which
  keeps the fp32 (B, heads, N, N) attention matrix. On CUDA the fused memory-efficient kernel runs
  (it supports the additive relative-position bias) and keeps only q, k, v, the output and a
  (B, heads, N) log-sum-exp. During the measurement SDPA is routed to that kernel's own ATen op
  (`aten._scaled_dot_product_efficient_attention`, which has a meta implementation), so the hooks
  see what CUDA saves.
- Activation checkpointing (the model's per-block `torch.utils.checkpoint`) keeps only each block's
  input, then recomputes one block at a time in backward. Its footprint is therefore
  sum(block inputs) + everything saved outside the blocks + the largest single block's saved
  tensors, all measured per block with forward hooks in the same run.

Each figure is measured at batch 1 and 2: per-image = m(2) - m(1), fixed = m(1) - per-image
(the relative-position bias gathered once per block and broadcast over the batch is fixed).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from core.units import precision_dtype
from model import create_model


@dataclass(frozen=True)
class ActivationMemory:
    """Bytes kept for backward at micro-batch m: `per_image * m + fixed`, plus the transient peak."""

    per_image: int  # without activation checkpointing
    fixed: int
    per_image_checkpointed: int  # with per-block activation checkpointing
    fixed_checkpointed: int
    largest_tensor_per_image: int  # the biggest single saved tensor: its gradient is the backward's transient
    # Selective recompute: the measured tallies at batch 1 and 2 (outside the blocks, and per stage S1..S4 its blocks'
    # inputs, their saved tensors, its largest block), from which `kept` sums any subset of stages.
    tallies: tuple = ()

    def kept(self, stages) -> tuple[int, int]:
        """(per image, fixed) bytes kept for backward when the blocks of `stages` recompute: their inputs, the
        other blocks' saved tensors, what is saved outside the blocks, and one recomputed block at a time."""
        if not self.tallies:  # built by hand (tests): all or nothing
            full = set(stages) >= {0, 1, 2, 3}
            return ((self.per_image_checkpointed, self.fixed_checkpointed) if full else (self.per_image, self.fixed))
        one, two = (t.outside_blocks + sum(t.stage_inputs[s] if s in stages else t.stage_saved[s] for s in range(4))
                    + max([t.stage_largest[s] for s in stages] or [0]) for t in self.tallies)
        per = two - one
        return per, max(one - per, 0)

    def bytes(self, micro_batch: int, checkpointing) -> int:
        """Peak activation bytes of one micro-step: kept tensors plus two transient gradient buffers.
        `checkpointing`: True (every stage), False, or the list of stages that recompute."""
        if isinstance(checkpointing, (list, tuple)):
            per, fixed = self.kept(set(checkpointing))
        else:
            per, fixed = ((self.per_image_checkpointed, self.fixed_checkpointed) if checkpointing
                          else (self.per_image, self.fixed))
        return micro_batch * (per + 2 * self.largest_tensor_per_image) + fixed


def _efficient_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """SDPA through the CUDA memory-efficient kernel's op: saves what the GPU saves (see module doc)."""
    bias = None
    if attn_mask is not None:
        bias = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, True, dropout_p, is_causal, scale=scale)
    return out[0]


@contextlib.contextmanager
def _fused_attention():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _efficient_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _checkpoint_units(model: nn.Module) -> list[nn.Module]:
    """The modules the model wraps in torch.utils.checkpoint: every block of every stage."""
    return [block for stage in model.stages for block in stage.blocks]


@dataclass
class _Tally:
    total: int = 0
    outside_blocks: int = 0
    block_inputs: int = 0
    largest_block: int = 0
    largest_tensor: int = 0
    stage_inputs: list = field(default_factory=lambda: [0] * 4)   # per stage: its blocks' inputs
    stage_saved: list = field(default_factory=lambda: [0] * 4)    # its blocks' saved tensors
    stage_largest: list = field(default_factory=lambda: [0] * 4)  # its largest block's saved tensors


def _tally(model: nn.Module, batch: int, dtype: torch.dtype) -> _Tally:
    exclude = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}
    keep_alive: list[torch.Tensor] = []  # a freed storage's address could be reused and deduplicated wrongly
    tally = _Tally()
    current = {"block": None, "bytes": 0}
    stage_of = {id(block): i for i, stage in enumerate(model.stages) for block in stage.blocks}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in exclude and key not in seen:
            seen[key] = storage.nbytes()
            keep_alive.append(t)
            tally.total += seen[key]
            tally.largest_tensor = max(tally.largest_tensor, seen[key])
            if current["block"] is None:
                tally.outside_blocks += seen[key]
            else:
                current["bytes"] += seen[key]
        return t

    def pre_hook(module, args):
        current["block"], current["bytes"] = module, 0
        tally.block_inputs += args[0].untyped_storage().nbytes()
        tally.stage_inputs[stage_of[id(module)]] += args[0].untyped_storage().nbytes()

    def post_hook(module, args, output):
        tally.largest_block = max(tally.largest_block, current["bytes"])
        stage = stage_of[id(module)]
        tally.stage_saved[stage] += current["bytes"]
        tally.stage_largest[stage] = max(tally.stage_largest[stage], current["bytes"])
        current["block"] = None

    handles = []
    for block in _checkpoint_units(model):
        handles.append(block.register_forward_pre_hook(pre_hook))
        handles.append(block.register_forward_hook(post_hook))
    height, width = model.config.image_size
    x = torch.zeros(batch, 3, height, width, device="meta", dtype=dtype, requires_grad=False)
    try:
        with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(x)
        tally.outside_blocks += logits.untyped_storage().nbytes()  # the loss keeps the logits' softmax
    finally:
        for h in handles:
            h.remove()
    return tally


def measure(model_kwargs: dict, precision: str = "bf16") -> ActivationMemory:
    """Activation bytes per image of the model `create_model(**model_kwargs)` trained in `precision`.

    `model_kwargs` as pipeline.train.model_args.run_model_kwargs gives them; the model is measured without its
    own checkpointing (the checkpointed figures are derived per block, see the module doc).
    """
    dtype = precision_dtype(precision)
    with torch.device("meta"):
        model = create_model(**{**model_kwargs, "grad_checkpointing": False})
    model = model.to(dtype).train()  # DeepSpeed's bf16/fp16 modes run the model itself in 16 bit
    one, two = _tally(model, 1, dtype), _tally(model, 2, dtype)

    def split(f):
        per = f(two) - f(one)
        return per, f(one) - per

    per, fixed = split(lambda t: t.total)
    per_ckpt, fixed_ckpt = split(lambda t: t.outside_blocks + t.block_inputs + t.largest_block)
    return ActivationMemory(per_image=per, fixed=max(fixed, 0), per_image_checkpointed=per_ckpt,
                            fixed_checkpointed=max(fixed_ckpt, 0),
                            largest_tensor_per_image=two.largest_tensor // 2, tallies=(one, two))

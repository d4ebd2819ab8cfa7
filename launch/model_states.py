"""Per-GPU (and per-node CPU) bytes of parameters, gradients and Adam states for a ZeRO setting.

Stages 2 and 3 (with and without offload) come straight from DeepSpeed's own estimators, the
functions behind `estimate_zero2_model_states_mem_needs_all_cold` and
`estimate_zero3_model_states_mem_needs_all_cold` (those two only print a table; the functions called
here return the numbers they print). Their mixed-precision accounting, per parameter:
2 bytes 16-bit weights + 2 bytes 16-bit gradients + 4 fp32 gradients + 4 fp32 master weights +
8 Adam moments = 20 bytes, of which ZeRO-2 partitions the last 18 over all GPUs and ZeRO-3 all 20
(its GPU term is 18/N plus 4 bytes per parameter of the largest layer, gathered whole).

DeepSpeed has no estimator for stages 0 and 1; they follow from the same per-parameter bytes:
stage 0 keeps all 20 bytes on every GPU (the stage-2 formula with one GPU), stage 1 partitions only
the 16 bytes of optimizer state (fp32 weights, fp32 gradients, moments): 4 + 16/N.
In fp32 training there are no 16-bit copies: 4 weights + 4 gradients + 8 moments = 16 bytes, split
by stage the same way (0: nothing, 1: moments, 2: + gradients, 3: + weights).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

# DeepSpeed's logger writes to the stdout it sees at import time; keep stdout for results (plan --json).
with contextlib.redirect_stdout(sys.stderr):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

# DeepSpeed's estimators take a safety factor for the CPU side (pinned buffers, fragmentation).
CPU_BUFFER_FACTOR = 1.5


@dataclass(frozen=True)
class ZeroSetting:
    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False

    @property
    def offload_level(self) -> int:
        """0 none, 1 optimizer on CPU, 2 optimizer and parameters on CPU: slower as it grows."""
        return int(self.offload_optimizer) + int(self.offload_param)

    def describe(self) -> str:
        off = ("optimizer+param" if self.offload_param else "optimizer") if self.offload_optimizer else "none"
        return f"ZeRO-{self.stage}, offload {off}"


def candidate_settings() -> list[ZeroSetting]:
    """Every setting the trainer's config accepts that changes memory (stage-1 offload is never better
    than stage-2 offload, so it is left out)."""
    return [ZeroSetting(0), ZeroSetting(1), ZeroSetting(2), ZeroSetting(3),
            ZeroSetting(2, offload_optimizer=True), ZeroSetting(3, offload_optimizer=True),
            ZeroSetting(3, offload_optimizer=True, offload_param=True)]


def model_states_bytes(setting: ZeroSetting, total_params: int, largest_layer_params: int,
                       nodes: int, gpus_per_node: int, precision: str = "bf16") -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per node) for the model states under `setting`."""
    gpus = nodes * gpus_per_node
    if precision == "fp32":
        return _fp32_states(setting, total_params, largest_layer_params, gpus, gpus_per_node)
    if setting.stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params, largest_layer_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
            cpu_offload=setting.offload_optimizer, cpu_offload_params=setting.offload_param, zero_init=True,
            additional_buffer_factor=CPU_BUFFER_FACTOR)
        return int(gpu), int(cpu)
    if setting.stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=setting.offload_optimizer,
            additional_buffer_factor=CPU_BUFFER_FACTOR)
        return int(gpu), int(cpu)
    # Stage 0/1: no DeepSpeed estimator (see module doc); the CPU side is the stage-2 estimator's
    # non-offload term (model loading), for comparable columns.
    cpu = int(total_params * 4 * gpus_per_node * CPU_BUFFER_FACTOR)
    if setting.stage == 1:
        return 4 * total_params + 16 * total_params // gpus, cpu
    return 20 * total_params, cpu


def _fp32_states(setting: ZeroSetting, total: int, largest: int, gpus: int, gpus_per_node: int) -> tuple[int, int]:
    cpu_load = int(total * 4 * gpus_per_node * CPU_BUFFER_FACTOR)
    weights, grads, moments = 4 * total, 4 * total, 8 * total
    if setting.stage == 0:
        return weights + grads + moments, cpu_load
    if setting.stage == 1:
        return weights + grads + moments // gpus, cpu_load
    if setting.stage == 2:
        if setting.offload_optimizer:
            return weights, int((grads + moments) * CPU_BUFFER_FACTOR * gpus_per_node / gpus) + cpu_load
        return weights + (grads + moments) // gpus, cpu_load
    gathered = 4 * largest
    if setting.offload_param:
        return gathered, int((weights + grads + moments) * CPU_BUFFER_FACTOR * gpus_per_node / gpus)
    if setting.offload_optimizer:
        return gathered + weights // gpus, int((grads + moments) * CPU_BUFFER_FACTOR * gpus_per_node / gpus)
    return gathered + (weights + grads + moments) // gpus, cpu_load


def count_params(model) -> tuple[int, int]:
    """(total parameters, parameters of the largest single module) as DeepSpeed's `model_to_params` counts.

    Not DeepSpeed's function itself: it deduplicates shared parameters by `data_ptr()`, which is 0 for
    every tensor on the meta device (CoAtNet shares none)."""
    total = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def ema_bytes(setting: ZeroSetting, total_params: int, gpus: int, ema_decay: float) -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per GPU) of pipeline.ema.ShardedEMA's fp32 shadow.

    ZeRO-1/2 ranks average only their fragment of every fp32 master weight (4 bytes x params / GPUs), on the
    CPU when the optimizer is offloaded; ZeRO-0 and ZeRO-3 keep a full fp32 copy on every rank.
    """
    if ema_decay <= 0:
        return 0, 0
    full = 4 * total_params
    shadow = full if setting.stage in (0, 3) else full // gpus
    return (0, shadow) if setting.offload_optimizer and setting.stage in (1, 2) else (shadow, 0)

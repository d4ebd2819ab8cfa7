"""Per-GPU (and per-node CPU) bytes of parameters, gradients and Adam states for a ZeRO setting.

Stages 2 and 3 (with and without offload) come straight from DeepSpeed's own estimators, the
functions behind `estimate_zero2_model_states_mem_needs_all_cold` and
`estimate_zero3_model_states_mem_needs_all_cold` (those two only print a table; the functions called
here return the numbers they print). Their mixed-precision accounting, per parameter:
2 bytes 16-bit weights + 2 bytes 16-bit gradients + 4 fp32 gradients + 4 fp32 master weights +
8 Adam moments = 20 bytes, of which ZeRO-2 partitions the last 18 over all GPUs and ZeRO-3 all 20
(its GPU term is 18/N plus 4 bytes per parameter of the largest layer, gathered whole).
Except the CPU side of ZeRO-2 + optimizer offload: DeepSpeed's estimator counts the whole cluster per node there;
the planner uses launch/offload.py's model of each rank's partition, checked against a measurement.

DeepSpeed has no estimator for stages 0 and 1; they follow from the same per-parameter bytes:
stage 0 keeps all 20 bytes on every GPU (the stage-2 formula with one GPU). Stage 1 with 16-bit training and
fp32 gradient accumulation (this trainer's default) is DeepSpeed's BF16_Optimizer: 16-bit weights, a full fp32
gradient buffer, and the fp32 master weights and moments partitioned: 2 + 4 + 12/N (with 16-bit accumulation
2 + 2 + 12/N).
In fp32 training there are no 16-bit copies: 4 weights + 4 gradients + 8 moments = 16 bytes, split
by stage the same way (0: nothing, 1: moments, 2: + gradients, 3: + weights).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

from launch.offload import GIB, offload_note, zero2_offload_rank

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
                       nodes: int, gpus_per_node: int, precision: str = "bf16",
                       grad_accum: str = "fp32") -> tuple[int, int]:
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
        if setting.offload_optimizer:  # the estimator counts the whole cluster per node: launch/offload.py
            cpu = gpus_per_node * zero2_offload_rank(total_params, largest_layer_params, gpus).total
        return int(gpu), int(cpu)
    # Stage 0/1: no DeepSpeed estimator (see module doc); the CPU side is the stage-2 estimator's
    # non-offload term (model loading), for comparable columns.
    cpu = int(total_params * 4 * gpus_per_node * CPU_BUFFER_FACTOR)
    if setting.stage == 1:
        # 16-bit training with fp32 gradient accumulation (the trainer's default, pipeline.train.optim) runs DeepSpeed's
        # BF16_Optimizer: a full fp32 gradient buffer on every rank instead of 16-bit gradients (2 + 4 + 12/N).
        grads = 4 if grad_accum == "fp32" else 2
        return (2 + grads) * total_params + 12 * total_params // gpus, cpu
    return 20 * total_params, cpu


def deepspeed_cpu_estimate(setting: ZeroSetting, total_params: int, nodes: int, gpus_per_node: int) -> int:
    """DeepSpeed's own CPU figure per node for ZeRO-2 (the plan prints it beside the measured model)."""
    cpu, _ = estimate_zero2_model_states_mem_needs(
        total_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=setting.offload_optimizer,
        additional_buffer_factor=CPU_BUFFER_FACTOR)
    return int(cpu)


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
    """(GPU bytes per GPU, CPU bytes per GPU) of pipeline.train.ema.ShardedEMA's fp32 shadow.

    Every ZeRO rank averages only its fragment of every fp32 master weight (4 bytes x params / GPUs), on the
    CPU when the optimizer is offloaded; ZeRO-0 keeps a full fp32 copy.
    """
    if ema_decay <= 0:
        return 0, 0
    full = 4 * total_params
    shadow = full if setting.stage == 0 else full // gpus
    return (0, shadow) if setting.offload_optimizer and setting.stage >= 1 else (shadow, 0)


def staging_bytes(setting: ZeroSetting, total_params: int, gpus: int, precision: str = "bf16",
                  ema_decay: float = 0.0, rank0: bool = True) -> int:
    """Host bytes per rank that checkpoint.async_save copies its checkpointed state into (pinned on GPU hosts; held
    until the background write is done): the rank's fp32 master weights and Adam moments (12 bytes per parameter,
    partitioned from ZeRO-1 on), the module weights the rank writes (the whole 16-bit or fp32 model on rank 0, the
    worst rank; under ZeRO-3 its partition; `rank0=False`: another rank, which writes no module file) and its EMA
    fragment (pipeline.checkpoint.async_save)."""
    low = 4 if precision == "fp32" else 2
    share = 1 if setting.stage == 0 else gpus
    optimizer = 12 * total_params // share
    weights = low * total_params // (gpus if setting.stage == 3 else 1) if rank0 or setting.stage == 3 else 0
    ema = 4 * total_params // share if ema_decay > 0 else 0
    return optimizer + weights + ema


# DeepSpeed's bucket sizes (elements) when the config sets none: DeepSpeedZeroConfig's defaults, and the engine's
# fixed all-reduce buffer for optimizers that do not reduce gradients themselves (BF16_Optimizer, ZeRO-0).
DEFAULT_REDUCE_BUCKET = 500_000_000
DEFAULT_ALLGATHER_BUCKET = 500_000_000
DEFAULT_PREFETCH_BUCKET = 50_000_000
ENGINE_ALLREDUCE_BUCKET = 500_000_000  # deepspeed.runtime.engine.MEMORY_OPT_ALLREDUCE_SIZE


@dataclass(frozen=True)
class RankTerms:
    """What one rank holds, by name (bytes), for a bf16/fp16/fp32 DeepSpeed run of `params` parameters.

    weights: the 16-bit (or fp32) module parameters (ZeRO-3: a partition + the largest layer gathered);
    gradients: what the optimizer accumulates into: ZeRO-0 the module's own .grad, ZeRO-1 with 16-bit training
      and fp32 accumulation (DeepSpeed's BF16_Optimizer) a full fp32 buffer, ZeRO-2/3 an fp32 partition;
    master: fp32 master weights (partitioned from ZeRO-1 on); moments: Adam's two, allocated at the first step;
    ema: pipeline.train.ema's per-rank fp32 fragment (a full copy without ZeRO);
    buckets: DeepSpeed's communication buffers during backward (see `bucket_bytes`).
    """
    weights: int
    gradients: int
    master: int
    moments: int
    ema: int
    buckets: int

    @property
    def states(self) -> int:
        return self.weights + self.gradients + self.master + self.moments + self.ema


def bucket_bytes(stage: int, params: int, precision: str, zero: dict, on_gpu: bool, grad_accum: str = "fp32",
                 communication: str = "fp32") -> int:
    """DeepSpeed's communication buffers during backward, from the DeepSpeed config's `zero_optimization`.

    ZeRO-0/1 (BF16_Optimizer, and the engine's fallback all-reduce): gradients flattened into buffers of
    ENGINE_ALLREDUCE_BUCKET elements in the accumulation dtype (fp32). ZeRO-2: `reduce_bucket_size` 16-bit
    staging buffers, two with `overlap_comm`, and with a wider `communication` dtype (fp32, the default) the
    bucket's cast to it for the reduction. ZeRO-3: a `reduce_bucket_size` bucket in the accumulation dtype
    (allocated and zeroed whole, on the CPU too) + a 16-bit `stage3_prefetch_bucket_size`.
    A CUDA buffer is allocated whole; on the CPU only the touched part (at most the model) becomes resident.
    """
    low = 2 if precision in ("bf16", "fp16") else 4
    reduce = int(zero.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET))
    if stage <= 1:
        size, elem = ENGINE_ALLREDUCE_BUCKET, 4
        return min(size, params) * elem
    if stage == 2:
        copies = 2 if zero.get("overlap_comm") else 1
        elements = reduce if on_gpu else min(reduce, params)
        cast = 4 if communication == "fp32" and low < 4 else 0
        return (copies * low + cast) * elements
    prefetch = int(zero.get("stage3_prefetch_bucket_size", DEFAULT_PREFETCH_BUCKET))
    accum = 4 if grad_accum == "fp32" else low
    return reduce * accum + (prefetch if on_gpu else min(prefetch, params)) * low


def rank_terms(stage: int, params: int, largest_layer: int, ranks: int, precision: str = "bf16",
               grad_accum: str = "fp32", ema: bool = True, zero: dict | None = None,
               on_gpu: bool = True, communication: str = "fp32") -> RankTerms:
    """The named per-rank terms of a setting without offload (what the trainer runs by default)."""
    low = 2 if precision in ("bf16", "fp16") else 4
    parts = ranks if stage >= 1 else 1
    weights = low * params if stage < 3 else low * params // ranks + low * largest_layer
    if stage == 0:
        gradients = low * params
    elif stage == 1:
        gradients = (4 if grad_accum == "fp32" else low) * params
    else:
        gradients = 4 * params // ranks
    master = 4 * params // parts if precision != "fp32" else 0
    return RankTerms(weights=weights, gradients=gradients, master=master, moments=8 * params // parts,
                     ema=4 * params // parts if ema else 0,
                     buckets=bucket_bytes(stage, params, precision, zero or {}, on_gpu, grad_accum, communication))


def plan_offload_note(precision: str, params: int, nodes: int, gpus_per_node: int, options: list[dict]) -> str:
    """The note for plan(): the ZeRO-2 offload row's CPU/node figure (the model above + the EMA fragment) next to
    DeepSpeed's estimate; empty in fp32 (no 16-bit copies: this module counts that case itself)."""
    row = next((o for o in options if o["zero_stage"] == 2 and o["offload_optimizer"]), None)
    if precision == "fp32" or row is None:
        return ""
    estimate = deepspeed_cpu_estimate(ZeroSetting(2, offload_optimizer=True), params, nodes, gpus_per_node)
    return offload_note(int(row["cpu_per_node_gib"] * GIB), estimate, nodes * gpus_per_node)

"""Host memory of ZeRO-2 + optimizer offload per rank and per node: a model of what DeepSpeed allocates, checked
against benchmarks/memory_scale.py --offload (docs/NOTES-off21.md), used instead of DeepSpeed's estimator.

Why not the estimator: DeepSpeed 0.19.8's estimate_zero2_model_states_mem_needs with cpu_offload returns
params x max(4 x total GPUs, 16) x 1.5 per node: 4 bytes per parameter for every GPU of the whole cluster
on each node (904.7 GiB per node for CoAtNet-7 on 8x8, twice that on 16x8), while each rank of ZeRO-2
keeps only its own 1/N partition in host memory (DeepSpeedZeroOptimizer with cpu_offload, stage_1_and_2.py):
  fp32 master weights          4 B x P / N   pinned (single_partition_of_fp32_groups)
  fp32 gradient partition      4 B x P / N   pinned (the master's .grad, the CPU Adam's input)
  Adam moments                 8 B x P / N   (DeepSpeedCPUAdam's exp_avg / exp_avg_sq, first step)
  16-bit copy of the partition 2 B x P / N   pinned (param_buffer_of_bit16_for_cpu_offload_groups: the update
                                             goes back to the GPU through it)
  gradient staging buffer      2 B x largest parameter, pinned (temp_grad_buffer_for_cpu_offload)
= 18 B x P / N + 2 B x largest parameter per rank; the trainer's EMA fragment (4 B x P / N, launch.model_states.
ema_bytes) is on the CPU too and counted beside it. On GPUs, pinned memory comes from PyTorch's
CachingHostAllocator, which rounds every request up to a power of two (pinned_max_round_threshold is unlimited
by default): each pinned tensor is counted at its rounded size. On a CPU run nothing is pinned, which is what
the benchmark measures (the rounding is not shown there). With gradient accumulation > 1 DeepSpeed adds a 16-bit
accumulation buffer per parameter of the partition (~2 B x P / N, not measured here, not counted).
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30


def _pow2ceil(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length() if n > 0 else 0


@dataclass(frozen=True)
class OffloadHost:
    """Per-rank host bytes of ZeRO-2 optimizer offload, by term (see the module doc)."""
    master: int
    gradients: int
    moments: int
    bit16_buffer: int
    staging: int
    pinned_rounding: int  # what the power-of-two rounding of the pinned tensors adds (0 off a GPU)

    @property
    def total(self) -> int:
        return self.master + self.gradients + self.moments + self.bit16_buffer + self.staging + self.pinned_rounding


def zero2_offload_rank(params: int, largest_param: int, ranks: int, pinned: bool = True) -> OffloadHost:
    """Host bytes one rank of ZeRO-2 + offload_optimizer holds (bf16/fp16 training; fp32 master and moments).

    `largest_param` is the largest single parameter tensor (the staging buffer's size in elements);
    `pinned` adds the CachingHostAllocator's power-of-two rounding of the pinned tensors (GPU runs)."""
    part = -(-params // ranks)  # DeepSpeed pads the flat group to a multiple of the ranks
    terms = {"master": 4 * part, "gradients": 4 * part, "moments": 8 * part, "bit16_buffer": 2 * part,
             "staging": 2 * largest_param}
    rounding = 0
    if pinned:
        rounding = sum(_pow2ceil(terms[k]) - terms[k] for k in ("master", "gradients", "bit16_buffer", "staging"))
    return OffloadHost(**terms, pinned_rounding=rounding)


def estimator_counts(gpus: int) -> str:
    """What DeepSpeed's ZeRO-2 offload estimator counts, in words, for the printed plan."""
    return (f"counts 4 bytes per parameter for each of the cluster's {gpus} GPUs on every node, x 1.5, where each "
            f"rank holds only its 1/{gpus} partition")


def offload_note(cpu_model_per_node: int, cpu_estimator_per_node: int, gpus: int) -> str:
    """The plan's one line when the measured model replaces DeepSpeed's estimator."""
    return (f"host memory per node for offload: {cpu_model_per_node / GIB:.1f} GiB (measured model; DeepSpeed's "
            f"estimator says {cpu_estimator_per_node / GIB:.1f} GiB, which {estimator_counts(gpus)})")

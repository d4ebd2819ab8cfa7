"""What `launch.plan` searches besides ZeRO and offload (launch.model_states.candidate_settings): which stages
recompute their activations in backward, and one evaluated setting (`Option`).

Recompute candidates are the first k stages, k = 0..4: false, [0], [0, 1], [0, 1, 2], true. Why only these prefixes:
the early, high-resolution stages keep the most activation memory per multiply-add that recomputing them costs
(CoAtNet-0 at 224 px: recomputing S1+S2 frees 41 of its 62 freeable MiB per image for 27 % of the forward; S3 18 MiB
for 45 %), so for a memory budget the cheapest fitting subset is a prefix, or next to one. Each candidate's memory is
measured (launch.activations.ActivationMemory.bytes with a list) and its compute priced by the share of the forward
its blocks run (model.stage_fractions; `true` counts the whole forward, as the trainer's HFU does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

Recompute = Union[bool, list]


def recompute_choices(stage_shares: list[float]) -> list[tuple[Recompute, float]]:
    """(model.activation_checkpointing value, share of the forward recomputed) for each prefix of the stages."""
    prefixes = [(list(range(k)), sum(stage_shares[:k])) for k in range(1, len(stage_shares))]
    return [(False, 0.0), *prefixes, (True, 1.0)]


def recompute_value(recompute: Recompute) -> str:
    """As a command-line override value: false, true or [0,1] (no space: one shell word)."""
    if isinstance(recompute, list):
        return "[" + ",".join(map(str, recompute)) + "]"
    return str(bool(recompute)).lower()


def recompute_label(recompute: Recompute, short: bool = False) -> str:
    """For the table: no / all / S1-S2; for sentences: off / on (every stage) / stages S1-S2."""
    if isinstance(recompute, list) and recompute:
        ordered = sorted(recompute)
        contiguous = ordered == list(range(ordered[0], ordered[-1] + 1))
        stages = (f"S{ordered[0] + 1}-S{ordered[-1] + 1}" if contiguous and len(ordered) > 1
                  else "+".join(f"S{s + 1}" for s in ordered))
        return stages if short else f"stages {stages}"
    if short:
        return "all" if recompute else "no"
    return "on (every stage)" if recompute else "off"


@dataclass
class Option:
    """One ZeRO x offload x recompute setting at its largest fitting micro-batch, with its memory and step time."""
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    activation_checkpointing: Recompute
    micro_batch_size: int  # 0 => does not fit even at micro-batch 1
    accumulation: int
    states_gib: float
    activations_gib: float
    total_gib: float
    cpu_per_node_gib: float
    fits: bool
    efficient: bool = False
    recompute: float = 0.0  # the share of the forward recomputed in backward (its extra compute: recompute / 3)
    staging_gib: float = 0.0  # checkpoint.async_save: host memory per rank for the save's copy (launch.model_states)
    # communication per GPU per step at this setting (launch/comm.py)
    comm_gb: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    exposed_s: float = 0.0
    exposed_grad_s: float = 0.0
    comm_bound: bool = False  # unoverlapped gradient reduction > COMM_FRACTION of the step
    comm: str = ""

    def describe(self) -> str:
        off = ("optimizer+param" if self.offload_param else "optimizer") if self.offload_optimizer else "none"
        return f"ZeRO-{self.zero_stage}, offload {off}"

    def overrides(self) -> list[str]:
        return [f"deepspeed.zero_stage={self.zero_stage}",
                f"deepspeed.offload_optimizer={str(self.offload_optimizer).lower()}",
                f"deepspeed.offload_param={str(self.offload_param).lower()}",
                f"model.activation_checkpointing={recompute_value(self.activation_checkpointing)}",
                f"train.micro_batch_size={self.micro_batch_size}"]

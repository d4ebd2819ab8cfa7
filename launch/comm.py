"""Communication per training step: the bytes each GPU sends for a ZeRO stage, whether DeepSpeed overlaps them
with compute, and the time they take at a stated interconnect bandwidth.

Why the planner needs it: memory alone prefers the lowest stage that fits, but ZeRO-1 with bf16 and fp32
gradient accumulation runs DeepSpeed's BF16_Optimizer, which all-reduces the whole fp32 gradient after the
last backward with no overlap (CoAtNet-7: 2.44e9 x 4 B = 9.8 GB of gradient, each GPU sending twice that
less 1/N in a ring), comparable to the compute of a step on 64 GPUs. ZeRO-2 reduce-scatters in buckets during
every micro-step's backward (overlap_comm on GPUs), so that traffic hides behind compute.

What each stage sends per GPU and step, with N GPUs, P parameters, ring collectives (an all-reduce sends
2 (N-1)/N of the buffer, a reduce-scatter or all-gather (N-1)/N), g bytes per gradient element
(deepspeed.communication_dtype), w per 16-bit weight, A micro-steps per step:
- ZeRO-1, BF16_Optimizer (bf16 + fp32 accumulation): all-reduce 2 (N-1)/N P g after backward, not overlapped;
  then an all-gather (N-1)/N P w of the updated weights, not overlapped;
- ZeRO-1 otherwise: reduce-scatter (N-1)/N P g in the last backward (overlapped); all-gather as above;
- ZeRO-2: reduce-scatter (N-1)/N P g in every micro-step's backward (overlapped); all-gather as above;
- ZeRO-3: per micro-step an all-gather of the weights for forward and again for backward, and the
  reduce-scatter (2 (N-1)/N P w + (N-1)/N P g), prefetched, so overlapped with forward and backward.
Overlapped traffic is exposed only where it outlasts the compute it overlaps (backward: 2/3 of a micro-step;
ZeRO-3: all of it). The step's compute is its share of the model FLOPs at the planner's MFU.
"""
from __future__ import annotations

from dataclasses import dataclass

# Per GPU, as NCCL's ring reaches it between nodes: 400 Gb/s NDR InfiniBand, one NIC per GPU (H100/H200 HGX
# clusters), at the ~80% bus bandwidth nccl-tests report for large all-reduces. `--net-gbps` overrides it.
NET_GBPS = 320.0
# Within one node (a one-node plan): NVLink 4, 450 GB/s per direction per GPU, at the same 80%.
NVLINK_GBPS = 2880.0
# A stage whose unoverlapped gradient reduction exceeds this fraction of its step is passed over for one that
# overlaps it (ZeRO-2 over ZeRO-1), when both fit. The weights' all-gather after the step is the same for
# ZeRO-1 and ZeRO-2 and decides nothing.
COMM_FRACTION = 0.10
BACKWARD_SHARE = 2 / 3  # backward's part of a micro-step's compute (2 of its 3 forward-pass equivalents)


@dataclass
class StepComm:
    sent_bytes: int        # per GPU per step
    overlapped_bytes: int  # of which DeepSpeed overlaps with compute
    compute_s: float       # the step's compute at the planner's MFU
    comm_s: float          # all traffic at the bandwidth
    exposed_s: float       # the part not hidden behind compute
    what: str              # the collectives, in words
    exposed_grad_s: float = 0.0  # of exposed_s, the gradient reduction's (what the stage choice weighs)

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s

    @property
    def exposed_fraction(self) -> float:
        return self.exposed_s / self.step_s if self.step_s else 0.0


def collectives(stage: int, params: int, gpus: int, accumulation: int, precision: str, grad_accum: str,
                communication: str) -> list[tuple[str, int, bool, bool]]:
    """(what, bytes each GPU sends per step, overlapped, per micro-step) for each collective of a step."""
    if gpus <= 1:
        return []
    ring = (gpus - 1) / gpus
    grad = 4 if precision == "fp32" or communication == "fp32" else 2
    weight = 4 if precision == "fp32" else 2
    gather = ("all-gather of the updated weights", int(ring * params * weight), False, False)
    if stage <= 1:
        if stage == 0 or (precision == "bf16" and grad_accum == "fp32"):  # BF16_Optimizer / plain DDP-like
            return [("all-reduce of the fp32 gradient after backward", int(2 * ring * params * grad), False, False),
                    gather]
        return [("reduce-scatter of the gradient in the last backward", int(ring * params * grad), True, False),
                gather]
    if stage == 2:
        return [("reduce-scatter of the gradient in every backward", int(ring * params * grad) * accumulation,
                 True, True), gather]
    return [("all-gathers of the weights (forward and backward) and reduce-scatter, every micro-step",
             int(ring * params * (2 * weight + grad)) * accumulation, True, True)]


def step_comm(stage: int, params: int, gpus: int, nodes: int, micro: int, accumulation: int, flops_per_image: float,
              gpu_tflops: float, mfu: float, precision: str, grad_accum: str, communication: str,
              net_gbps: float = NET_GBPS, nvlink_gbps: float = NVLINK_GBPS) -> StepComm:
    """The communication of one step at a setting, and how much of it the compute hides."""
    bandwidth = (net_gbps if nodes > 1 else nvlink_gbps) * 1e9 / 8  # bytes/s per GPU
    compute = micro * accumulation * flops_per_image / (gpu_tflops * 1e12 * mfu)
    micro_compute = compute / max(accumulation, 1)
    window = micro_compute * (1.0 if stage == 3 else BACKWARD_SHARE)
    sent = overlapped = 0
    exposed = exposed_grad = 0.0
    for what, nbytes, hidden, per_micro in collectives(stage, params, gpus, accumulation, precision, grad_accum,
                                                       communication):
        sent += nbytes
        seconds = nbytes / bandwidth
        if hidden:
            overlapped += nbytes
            times = accumulation if per_micro else 1  # per micro-step traffic overlaps each micro-step's window
            seconds = times * max(0.0, seconds / times - window)
        exposed += seconds
        if "gradient" in what or stage == 3:
            exposed_grad += seconds
    what = "; ".join(f"{w} ({n / 1e9:.2f} GB{', overlapped' if h else ''})"
                     for w, n, h, _ in collectives(stage, params, gpus, accumulation, precision, grad_accum,
                                                   communication)) or "none (one GPU)"
    return StepComm(sent, overlapped, compute, sent / bandwidth, exposed, what, exposed_grad)


def choice_reason(best, fitting: list, rank) -> str:
    """One sentence on why `best` won, naming communication when it decided against a lower stage."""
    share = best.exposed_s / (best.compute_s + best.exposed_s) if best.compute_s else 0.0
    lower = [o for o in fitting if o.zero_stage < best.zero_stage and o.comm_bound
             and rank(o)[:3] == rank(best)[:3]]
    if lower:
        o = min(lower, key=lambda o: o.zero_stage)
        step = o.compute_s + o.exposed_s
        return (f"ZeRO-{best.zero_stage} over ZeRO-{o.zero_stage}, which also fits: ZeRO-{o.zero_stage}'s "
                f"gradient reduction, not overlapped, takes {o.exposed_grad_s:.2f} s of its {step:.2f} s step "
                f"({o.exposed_grad_s / step:.0%} > {COMM_FRACTION:.0%}); ZeRO-{best.zero_stage} overlaps it with "
                f"backward and exposes {best.exposed_s:.2f} s in all ({share:.0%})")
    return (f"the first fitting setting in the order above (offload, micro-batch, recompute, communication, "
            f"stage); its communication exposes {best.exposed_s:.2f} s of a {best.compute_s + best.exposed_s:.2f} s step ({share:.0%})")

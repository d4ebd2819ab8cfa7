"""AdamW, the LR schedule and the DeepSpeed config generated from the pipeline config.

The optimizer is built by DeepSpeed from its config ("optimizer": AdamW), so ZeRO 1/2/3 partition it as
usual. By default (deepspeed.optimizer=torch) it is torch.optim.AdamW, with torch's fused CUDA kernel on
GPUs: nothing is compiled on compute nodes. deepspeed.optimizer=deepspeed selects DeepSpeed's FusedAdam, a
CUDA extension DeepSpeed JIT-builds on first use (nvcc + ninja on the node, minutes, per cold cache) unless
it was pre-built at install (DS_BUILD_FUSED_ADAM=1). ZeRO-Offload (deepspeed.offload_optimizer) always runs
DeepSpeedCPUAdam, also a JIT build (DS_BUILD_CPU_ADAM=1 pre-builds it): torch's AdamW on CPU-resident
fp32 states is several times slower. Parameter groups come from model.param_groups (no weight decay on
biases, norms and relative-position tables).

LR schedule: warm-up, then cosine / linear decay to min_lr, or constant (the paper's Table 10). It is a
torch LambdaLR handed to deepspeed.initialize (DeepSpeed steps it with the optimizer and checkpoints it)
rather than DeepSpeed's WarmupCosineLR / WarmupDecayLR because those cannot express the recipes: both
refuse or floor a zero-step warm-up (fine-tuning has none), WarmupDecayLR decays to 0 instead of min_lr,
and neither has a constant schedule. `lr_at(step)` is a pure function of the step, which is what lets a
resumed run (same or different world size) continue the schedule exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from core.errors import UserError

# deepspeed.bucket_elements when the config leaves it null. A GPU overlaps each bucket's reduction with the
# backward pass and allocates its buckets whole, so 5e7 (100-200 MB messages) keeps NCCL busy at 10x less
# than DeepSpeed's 5e8. A CPU run has overlap_comm off: the bucket only batches calls, and 1e7 measured the
# same step time as 5e7 (coatnet-2, 2 gloo ranks: 1.19 vs 1.21 s) with RSS 1.75 vs 1.96 GB per rank.
GPU_BUCKET_ELEMENTS = 50_000_000
CPU_BUCKET_ELEMENTS = 10_000_000


@dataclass(frozen=True)
class Schedule:
    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    decay: str = "cosine"  # cosine | linear | constant

    def lr_at(self, step: int) -> float:
        """The LR used by optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return self.lr
        span = max(1, self.total_steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.decay == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0 - progress
        return self.min_lr + (self.lr - self.min_lr) * factor

    def scheduler_factory(self, settings: Optional[dict] = None):
        """A callable deepspeed.initialize(lr_scheduler=...) calls with the optimizer it built; `settings`
        (optimizer_settings(cfg)) are re-applied over a restored optimizer state."""
        def build(optimizer):
            for group in optimizer.param_groups:
                group["lr"] = self.lr
            return ScheduleLR(optimizer, self, settings)
        return build


class ScheduleLR(torch.optim.lr_scheduler.LambdaLR):
    """The LambdaLR of a Schedule that, when restored, follows THIS launch's schedule from the restored step.

    Why: a checkpoint's LambdaLR state holds the old base LRs and last LR (its lambda is not saved), so a
    relaunch with a new optim.lr / min_lr / warm-up / decay / step count would train its next step at the old
    LR and scale the new curve by the old peak. `restart_at(step)` (called by Checkpointer.restore with the
    client state's step) makes the LR exactly `self.schedule.lr_at(step)` from there on.
    """

    def __init__(self, optimizer, schedule: Schedule, settings: Optional[dict] = None):
        self.schedule, self.settings = schedule, settings
        # This launch's per-group LR scales (optim.layer_decay, model.param_groups) and weight decays, re-applied
        # over a restored optimizer state by restart_at.
        self.scales = [float(g.get("lr_scale", 1.0)) for g in optimizer.param_groups]
        self.weight_decays = [g["weight_decay"] for g in optimizer.param_groups]
        super().__init__(optimizer, [_scaled(schedule, scale) for scale in self.scales])

    def state_dict(self) -> dict:
        out = super().state_dict()
        for key in _OWN_KEYS:  # they come from the config of each launch
            out.pop(key, None)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        own = {key: getattr(self, key) for key in _OWN_KEYS}
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in _OWN_KEYS})
        self.__dict__.update(own)
        self.restart_at(self.last_epoch)

    def restart_at(self, step: int) -> None:
        """Continue this schedule at `step`: base LRs, counter and the optimizer's group LRs."""
        self.base_lrs = [self.schedule.lr for _ in self.optimizer.param_groups]
        self.last_epoch = step
        lrs = [base * fn(step) for base, fn in zip(self.base_lrs, self.lr_lambdas)]  # LambdaLR.get_lr's formula
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs
        for group, weight_decay in zip(self.optimizer.param_groups if self.settings else [], self.weight_decays):
            group["betas"], group["eps"] = tuple(self.settings["betas"]), self.settings["eps"]
            group["weight_decay"] = weight_decay  # model.param_groups: this launch's decay or 0 (biases, norms)


_OWN_KEYS = ("schedule", "settings", "scales", "weight_decays")


def _scaled(schedule: Schedule, scale: float):
    """The LambdaLR factor of a group whose LR is `scale` x the schedule's."""
    return lambda step: scale * schedule.lr_at(step) / schedule.lr if schedule.lr > 0 else 0.0


def optimizer_settings(cfg) -> dict:
    """This launch's AdamW betas, eps and weight decay (a restored optimizer state would bring back the old)."""
    return {"betas": list(cfg.optim.betas), "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay}


def make_schedule(cfg, total_steps: int, steps_per_epoch: int) -> Schedule:
    warmup = cfg.optim.warmup_steps + int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    return Schedule(cfg.optim.lr, cfg.optim.min_lr, warmup, total_steps, cfg.optim.decay)


def _deep_update(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def optimizer_choice(ds, on_cpu: bool) -> dict:
    """The DeepSpeed "optimizer.params" entries that pick the AdamW implementation (see the module doc).

    DeepSpeed 0.19.8 builds, for "type": "AdamW": with "torch_adam": true, torch.optim.AdamW (it passes every
    other param through, so "fused": true reaches torch); with ZeRO-Offload, DeepSpeedCPUAdam; otherwise its
    FusedAdam. FusedAdam and DeepSpeedCPUAdam are extensions DeepSpeed compiles with ninja on first use
    (minutes, on every compute node whose cache is cold, needing nvcc there) unless it was installed with
    DS_BUILD_FUSED_ADAM=1 / DS_BUILD_CPU_ADAM=1; torch's fused AdamW is a precompiled kernel in every torch
    wheel, one launch per parameter group per step like FusedAdam's multi-tensor apply.
    """
    if ds.offload_optimizer:
        return {}  # DeepSpeedCPUAdam: nothing else runs an optimizer step fast on CPU-resident fp32 states
    if ds.optimizer == "deepspeed":
        if on_cpu:
            raise UserError("deepspeed.optimizer=deepspeed needs a GPU (DeepSpeed's FusedAdam is a CUDA kernel); "
                            "use deepspeed.optimizer=torch")
        return {}
    # Fused on CPUs too: torch's foreach AdamW materialises temporaries of the rank's whole fp32 shard (sqrt of the
    # second moment and its updates), measured +250 MiB per rank at coatnet-2 on 2 ranks (benchmarks/memory_scale.py)
    return {"torch_adam": True, "fused": True}


def precision_config(cfg) -> dict:
    """DeepSpeed's gradient accumulation and reduction dtypes (`data_types.grad_accum_dtype`,
    `communication_data_type`) from `deepspeed.grad_accum_dtype` / `deepspeed.communication_dtype`.

    Why fp32 by default: DeepSpeed's defaults follow the model dtype, and a bf16 sum of many micro-batch
    gradients (or of many ranks' gradients) rounds at every addition (8 mantissa bits). What DeepSpeed 0.19.8
    accepts, and what this maps each case to:
      * ZeRO 1/2/3 with bf16 or fp16: fp32 or the precision's own dtype. ZeRO-1 + bf16 + fp32 runs DeepSpeed's
        BF16_Optimizer (fp32 gradient buffers), ZeRO-2 an fp32 gradient partition, ZeRO-3 fp32 partitions.
      * ZeRO 0 with bf16/fp16: its FP16_Optimizer accumulates in param.grad, so DeepSpeed refuses any other
        dtype (NotImplementedError "unsupported mix"): the nearest supported, the precision's dtype, is used
        for accumulation; reduction still follows `communication_dtype`.
      * fp32 training: accumulation is fp32.
    Any other mix (bf16 with fp16, or a 16-bit dtype for an fp32 run) is a UserError naming the key.
    No `data_types.buffer_dtype`: DeepSpeed then casts parameters only and BatchNorm keeps fp32 statistics
    (model.blocks.BatchNorm2d keeps them fp32 even when a module cast reaches them).
    """
    ds = cfg.deepspeed
    accum = getattr(ds, "grad_accum_dtype", "fp32")
    comm = getattr(ds, "communication_dtype", "fp32")
    for key, value in (("grad_accum_dtype", accum), ("communication_dtype", comm)):
        if value not in ("fp32", cfg.precision):
            raise UserError(f"deepspeed.{key}={value} does not fit precision={cfg.precision}: "
                            f"use fp32 or {cfg.precision}")
    if cfg.precision == "fp32" or ds.zero_stage == 0:
        accum = cfg.precision
    return {"data_types": {"grad_accum_dtype": accum}, "communication_data_type": comm}


def deepspeed_config(cfg, world_size: int, on_cpu: bool, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON config for this run: batch sizes, ZeRO, precision, clipping, optimizer."""
    t, ds = cfg.train, cfg.deepspeed
    accumulation = t.global_batch_size // (t.micro_batch_size * world_size)
    zero: dict = {"stage": ds.zero_stage}
    bucket = ds.bucket_elements or (CPU_BUCKET_ELEMENTS if on_cpu else GPU_BUCKET_ELEMENTS)
    if ds.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=not on_cpu, reduce_scatter=True,
                    reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not on_cpu}
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_prefetch_bucket_size=bucket)
        if on_cpu:
            # Small CPU models (the demo, the tests) would otherwise keep every parameter persistent and skip
            # partitioning. On GPUs DeepSpeed's default (1e5 elements) stays: with 0 every bias and norm weight
            # is its own all-gather per micro-step.
            zero["stage3_param_persistence_threshold"] = 0
    params = {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
              "weight_decay": cfg.optim.weight_decay}
    params.update(optimizer_choice(ds, on_cpu))
    config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": params},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed's own step prints quiet
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": load_universal},
    }
    config.update(precision_config(cfg))
    if cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    return _deep_update(config, dict(cfg.deepspeed.extra))

"""Will this config fit, and how? A memory and time planner for a training config on a GPU cluster.

    python -m launch.plan --config configs/finetune/jft_coatnet-7_512.yaml --nodes 8 --gpus-per-node 8 --gpu-mem-gb 80
    python -m launch.plan --config configs/pretrain/in1k_coatnet-0.yaml --nodes 1 --gpus-per-node 1 --gpu-mem-gb 80 --json

Per GPU it adds up
- model states (16-bit weights, gradients, fp32 master weights, Adam moments) for every ZeRO stage and
  offload choice, from DeepSpeed's estimators (launch/model_states.py);
- activations kept for backward, measured per image on the meta device, with and without activation
  checkpointing (launch/activations.py), times 1.1 for allocator fragmentation;
- named fixed terms instead of one reserve: the CUDA context with NCCL (CUDA_CONTEXT_GIB, --cuda-context-gb),
  DeepSpeed's communication buckets at the sizes its config gives them (launch/model_states.bucket_bytes), and
  the in-run evaluation with EMA weights (the EMA swapped into the parameters: no second model; activations of
  a no-grad forward at the evaluation batch, 2 x micro), which must fit beside the training states;
  `--reserve-gb` still replaces the CUDA context term with a flat reserve;
then searches micro-batch x gradient accumulation x ZeRO stage x offload x recompute for a setting
that reaches the config's global batch exactly (global = micro x accumulation x GPUs) and fits.

Which fitting setting wins (first difference decides), and why:
1. no offload before optimizer offload before parameter offload: offload moves every step's optimizer
   work to the CPU and its traffic over PCIe, the slowest choice by far;
2. a micro-batch big enough to keep the GPU busy (>= 128 G multiply-adds per micro-step, e.g. 32
   images of CoAtNet-0 at 224 px or 1 image of CoAtNet-7) before one that is not;
3. the least recompute: activation checkpointing runs again the forward of the stages it covers (all: +~33%
   compute); besides none and all, the first k high-resolution stages are tried (launch/search_space.py);
4. a gradient reduction that compute hides: a setting whose unoverlapped gradient reduction costs more than
   COMM_FRACTION (10%) of its step at --net-gbps is passed over, the least exposed first (launch/comm.py: ZeRO-1
   with bf16 + fp32 accumulation all-reduces the fp32 gradient after backward; ZeRO-2 reduce-scatters during it);
5. the lower ZeRO stage: ZeRO-3 gathers the weights again for every micro-step. ZeRO-0 is only
   considered on one GPU: with more, ZeRO-1 moves the same bytes (reduce-scatter + all-gather = one
   all-reduce) and holds less;
6. the larger micro-batch (fewer accumulation steps).
Each setting's communication per step (bytes per GPU, overlapped or not, time at --net-gbps) is printed next to
its compute.

Time per epoch = images x 6 x multiply-adds (forward + backward = 3 forward passes, 2 FLOPs per
multiply-add) / (GPUs x peak TFLOP/s x MFU), counted by pipeline.train.flops as the trainer's MFU log counts it
(model FLOPs only; HFU adds the forward that activation checkpointing recomputes). Exit status 0 when a
setting fits, 1 when none does, 2 on bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import asdict

from core.errors import UserError, cli_main
from launch.comm import COMM_FRACTION, NET_GBPS, choice_reason, step_comm
from launch.plan_report import format_table  # noqa: F401  (the table; callers import it from here)
from launch.search_space import Option, recompute_choices
from pipeline.train.flops import DEFAULT_GPU, PEAK_BF16_TFLOPS, train_flops_per_image, train_seconds

GIB = 2 ** 30
# Per GPU, before any tensor: the CUDA context with cuBLAS/cuDNN workspaces (about 0.5 GiB with CUDA 12's lazy
# module loading on H100/H200, plus cuDNN's autotuning workspaces under cudnn.benchmark) and NCCL's communicators:
# channel buffers, and on 8-GPU NVSwitch nodes its NVLink SHARP (NVLS) buffers, about 1 GiB per communicator.
# Revisited from 0.75 GiB (which counted neither); assumed, not measured here (no GPU): gpu_check's memory part
# reports reserved memory against the plan. `--cuda-context-gb` overrides it.
CUDA_CONTEXT_GIB = 2.0
FRAGMENTATION = 1.10  # PyTorch's caching allocator rarely packs activations tighter than this
MIN_MICRO_MACS = 128e9  # multiply-adds per micro-step below which a GPU idles between small kernels

# Dataset sizes for time estimates when data.train is not a local shard folder with _info.json
# (e.g. planning on a laptop before sharding). Keyed by words in the data.train path.
KNOWN_DATASETS = {
    "imagenet1k": ("ImageNet-1K train", 1_281_167, 1000),
    "in1k": ("ImageNet-1K train", 1_281_167, 1000),
    "imagenet21k": ("ImageNet-21K (about 13M images)", 13_000_000, 21841),
    "in21k": ("ImageNet-21K (about 13M images)", 13_000_000, 21841),
    "jft300m": ("JFT-300M", 300_000_000, 18291),
    "jft3b": ("JFT-3B (about 30K labels)", 3_000_000_000, 30000),
}


def _dataset(cfg, images_per_epoch: int | None) -> tuple[int, int | None, str]:
    """(images per epoch, number of classes or None, where the figures come from)."""
    from pipeline.data.sources import first_path, open_train
    path = first_path(cfg.data.train)  # a mixture: sizes summed over its sources, the first's _info.json decides
    if os.path.isfile(os.path.join(path, "_info.json")):
        shards = open_train(cfg.data.train, cfg.data.train_split)
        classes = len(shards.classes) if shards.classes else None
        return images_per_epoch or shards.num_samples, classes, f"{path}/_info.json"
    key = re.sub(r"[^a-z0-9]", "", os.path.basename(os.path.normpath(path)).lower())
    for word, (label, images, classes) in KNOWN_DATASETS.items():
        if word in key:
            return images_per_epoch or images, classes, f"assumed from data.train={path}: {label}"
    if images_per_epoch:
        return images_per_epoch, None, "--images-per-epoch"
    raise UserError(f"data.train={path} has no _info.json and is not a known dataset name "
                    f"({', '.join(sorted({v[0] for v in KNOWN_DATASETS.values()}))}); pass --images-per-epoch N")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(cfg, nodes: int, gpus_per_node: int, gpu_mem_gb: float, cpu_mem_gb: float | None = None,
         mfu: float = 0.4, gpu_tflops: float = PEAK_BF16_TFLOPS[DEFAULT_GPU], reserve_gb: float | None = None,
         images_per_epoch: int | None = None, cuda_context_gb: float = CUDA_CONTEXT_GIB,
         net_gbps: float = NET_GBPS) -> dict:
    """Everything the CLI prints, as a dict (also the `--json` output)."""
    import torch

    from launch.activations import measure
    from launch.model_states import count_params
    from model import count_macs, create_model, stage_fractions
    from pipeline.train.model_args import run_model_kwargs

    if reserve_gb is None:
        reserve_gb = cuda_context_gb
    for name, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if gpu_mem_gb <= reserve_gb:
        raise UserError(f"--gpu-mem-gb {gpu_mem_gb} leaves nothing after the {reserve_gb} GiB reserve")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    if net_gbps <= 0:
        raise UserError(f"--net-gbps must be > 0, got {net_gbps}")

    images, dataset_classes, dataset_source = _dataset(cfg, images_per_epoch)
    num_classes = cfg.model.num_classes or dataset_classes or 1000
    model_kwargs = run_model_kwargs(cfg, num_classes)
    with torch.device("meta"):
        model = create_model(**{**model_kwargs, "grad_checkpointing": False})
    total_params, largest_layer = count_params(model)
    macs = count_macs(model)
    choices = recompute_choices(stage_fractions(model))
    if cfg.precision == "auto":  # planning for GPUs that compute bf16 natively (Ampere and newer)
        cfg = dataclasses.replace(cfg, precision="bf16")  # a copy: the caller's config stays as written
    act = measure(model_kwargs, cfg.precision)

    gpus = nodes * gpus_per_node
    global_batch = cfg.train.global_batch_size
    usable = gpu_mem_gb * GIB - reserve_gb * GIB
    result = {
        "config": None, "model": cfg.model.name, "image_size": list(cfg.image_hw), "num_classes": num_classes,
        "precision": cfg.precision, "parameters": total_params, "largest_layer_parameters": largest_layer,
        "macs_per_image": macs,
        "activation_gib_per_image": act.per_image / GIB, "activation_gib_per_image_checkpointed":
            act.per_image_checkpointed / GIB, "activation_gib_fixed": act.fixed / GIB,
        "nodes": nodes, "gpus_per_node": gpus_per_node, "gpus": gpus, "gpu_mem_gib": gpu_mem_gb,
        "usable_gib": usable / GIB, "reserve_gib": reserve_gb, "global_batch_size": global_batch,
        "options": [], "chosen": None, "fits": False, "reason": "", "net_gbps": net_gbps,
        "comm_fraction": COMM_FRACTION, "choice": "",
    }
    if global_batch % gpus:
        result["reason"] = (f"global batch {global_batch} is not divisible by {gpus} GPUs: pick a GPU count that "
                            f"divides it (e.g. {_near_divisor(global_batch, gpus)}) or change train.global_batch_size")
    else:
        speed = {"gpu_tflops": gpu_tflops, "mfu": mfu, "net_gbps": net_gbps}
        result.update(_choose(cfg, act, total_params, largest_layer, macs, nodes, gpus_per_node, usable,
                              cpu_mem_gb, speed, choices))
        from launch.model_states import plan_offload_note

        result["offload_note"] = plan_offload_note(cfg.precision, total_params, nodes, gpus_per_node,
                                                   result["options"])
    result["as_written"] = _as_written(cfg, act, total_params, largest_layer, nodes, gpus_per_node, usable)
    result.update(_time(cfg, macs, images, dataset_source, gpus, gpu_tflops, mfu, result["chosen"]))
    return result


def _choose(cfg, act, total_params, largest_layer, macs, nodes, gpus_per_node, usable, cpu_mem_gb, speed,
            choices) -> dict:
    """Every ZeRO x offload x recompute option at its largest fitting micro-batch, and the best one."""
    from launch.model_states import candidate_settings, ema_bytes, model_states_bytes, staging_bytes

    gpus = nodes * gpus_per_node
    per_rank = cfg.train.global_batch_size // gpus
    divisors = _divisors(per_rank)
    wanted = math.ceil(MIN_MICRO_MACS / max(macs, 1))
    efficient_micro = min([d for d in divisors if d >= wanted] or [per_rank])
    options = []
    for setting in candidate_settings():
        if setting.stage == 0 and gpus > 1:
            continue
        states, cpu = model_states_bytes(setting, total_params, largest_layer, nodes, gpus_per_node, cfg.precision,
                                         _grad_accum(cfg))
        ema_gpu, ema_cpu = ema_bytes(setting, total_params, gpus, cfg.train.ema_decay)
        states, cpu = states + ema_gpu, cpu + ema_cpu * gpus_per_node
        states += _buckets(cfg, setting.stage, total_params, gpus)
        staging = [staging_bytes(setting, total_params, gpus, cfg.precision, cfg.train.ema_decay, rank0)
                   if cfg.checkpoint.async_save else 0 for rank0 in (True, False)]
        cpu += staging[0] + staging[1] * (gpus_per_node - 1)  # an async save's pinned copies, rank 0's node
        cpu_ok = cpu_mem_gb is None or cpu <= cpu_mem_gb * GIB
        for ckpt, recompute in choices:
            def need(m):
                return states + max(act.bytes(m, ckpt), _eval_bytes(act, m)) * FRAGMENTATION
            fitting = [m for m in divisors if need(m) <= usable] if cpu_ok else []
            m = max(fitting) if fitting else 0
            option = Option(setting.stage, setting.offload_optimizer, setting.offload_param, ckpt,
                            m, per_rank // m if m else 0, states / GIB,
                            act.bytes(max(m, 1), ckpt) * FRAGMENTATION / GIB, need(max(m, 1)) / GIB,
                            cpu / GIB, bool(m), m >= efficient_micro, recompute, staging[0] / GIB)
            _add_comm(option, cfg, total_params, macs, nodes, gpus, per_rank, speed)
            options.append(option)
    out: dict = {}
    fitting = [o for o in options if o.fits]
    if fitting:
        def rank(o):
            return (o.offload_optimizer + o.offload_param, not o.efficient, o.recompute,
                    o.exposed_grad_s if o.comm_bound else 0.0, o.zero_stage, -o.micro_batch_size)
        best = min(fitting, key=rank)
        out.update(chosen=asdict(best), fits=True, overrides=best.overrides(), choice=choice_reason(best, fitting, rank))
    else:
        smallest = min(options, key=lambda o: o.total_gib)
        why = f"; CPU memory per node is {cpu_mem_gb} GiB" if cpu_mem_gb is not None else ""
        out["reason"] = (f"cannot fit: even {smallest.describe()} with activation checkpointing at "
                         f"micro-batch 1 needs {smallest.total_gib:.1f} GiB per GPU, over the "
                         f"{usable / GIB:.1f} GiB usable{why}; use more GPUs, bigger GPUs or a smaller image size")
    out.update(options=[asdict(o) for o in options], efficient_micro_batch=efficient_micro)
    return out


def _add_comm(option: Option, cfg, params: int, macs: int, nodes: int, gpus: int, per_rank: int, speed) -> None:
    """Fill the option's communication figures at its micro-batch (or at micro-batch 1 when it does not fit)."""
    micro = option.micro_batch_size or 1
    flops = train_flops_per_image(macs, option.recompute).model
    c = step_comm(option.zero_stage, params, gpus, nodes, micro, per_rank // micro, flops, speed["gpu_tflops"],
                  speed["mfu"], cfg.precision, _grad_accum(cfg), cfg.deepspeed.communication_dtype,
                  net_gbps=speed["net_gbps"])
    option.comm_gb, option.compute_s, option.comm_s, option.exposed_s = c.sent_bytes / 1e9, c.compute_s, c.comm_s, \
        c.exposed_s
    option.exposed_grad_s, option.comm = c.exposed_grad_s, c.what
    option.comm_bound = c.exposed_grad_s > COMM_FRACTION * c.step_s


def _grad_accum(cfg) -> str:
    return "fp32" if cfg.precision == "fp32" else getattr(cfg.deepspeed, "grad_accum_dtype", "fp32")


def _zero_config(cfg, stage: int, gpus: int, on_gpu: bool = True) -> dict:
    """The `zero_optimization` block the trainer would hand DeepSpeed at `stage` (bucket sizes, overlap_comm)."""
    from pipeline.train.optim import deepspeed_config

    ds = dataclasses.replace(cfg.deepspeed, zero_stage=stage, offload_optimizer=False, offload_param=False)
    return deepspeed_config(dataclasses.replace(cfg, deepspeed=ds), gpus, on_cpu=not on_gpu)["zero_optimization"]


def _buckets(cfg, stage: int, params: int, gpus: int) -> int:
    from launch.model_states import bucket_bytes
    return bucket_bytes(stage, params, cfg.precision, _zero_config(cfg, stage, gpus), on_gpu=True,
                        grad_accum=_grad_accum(cfg), communication=cfg.deepspeed.communication_dtype)


def _eval_bytes(act, micro_batch: int) -> int:
    """Evaluation's activations: a no-grad forward at twice the micro-batch keeps nothing for backward; its
    peak is a block's input, output and largest intermediate (about three of the largest saved tensor)."""
    return 2 * micro_batch * 3 * act.largest_tensor_per_image + act.fixed


def rank_peak(model: str, image_size: int, micro_batch: int, ranks: int, zero_stage: int, device: str = "cuda",
              num_classes: int = 1000, ema: bool = True, precision: str = "bf16", grad_accum: str = "fp32",
              zero: dict | None = None, checkpointing: bool = False,
              cuda_context_gb: float = CUDA_CONTEXT_GIB, overrides: tuple = ()) -> dict:
    """Per-rank peak bytes of each phase of a run at one setting (no offload), by named term.

    The phases are those benchmarks/memory_scale.py measures: build (model, engine, EMA: the whole 16-bit model
    as built, beside ZeRO-3's partition of it; the fp32 master and EMA fragments; gradients only where
    DeepSpeed allocates them at start-up, the BF16_Optimizer of ZeRO-0/1; ZeRO-2/3 allocate theirs in the first
    backward), step (all states, buckets, activations), eval (the states held between steps, which under ZeRO-2
    lack the gradient partition freed by the step; the 16-bit model once more: the weights rebuilt from the EMA
    go through an all-gather, which gloo stages in a copy and ZeRO-3 keeps gathered; eval activations), save
    (the states held between steps), resume (those, the optimizer shard's file becoming the optimizer's
    state, plus the module file read before it is copied into the parameters), finetune (the larger of a build
    and the main rank consolidating the pretrained run before the engine exists: the 16-bit model, the full
    fp32 weights assembled from the EMA fragments and the fragment file being read, 4 bytes x params / ranks
    when the pretraining ran on as many; the other ranks memory-map the result). On "cpu" the figures
    are what the model adds to a process (no CUDA context; buckets only as far as they are touched); on
    "cuda" they include CUDA_CONTEXT_GIB. `overrides` (KEY=VALUE, as on the trainer's command line) are applied
    to the trainer's defaults: they render its `zero_optimization` block when `zero` is not given
    (deepspeed.bucket_elements, for one) and give the reduction's dtype (deepspeed.communication_dtype).
    Returns {"terms": {...}, "phases": {...}, "peak": bytes, "phase": name}.
    """
    import torch

    from launch.activations import measure
    from launch.model_states import count_params, rank_terms
    from model import create_model

    kwargs = {"name": model, "num_classes": num_classes, "image_size": [image_size, image_size]}
    with torch.device("meta"):
        params, largest = count_params(create_model(**kwargs))
    on_gpu = device != "cpu"
    from pipeline.config import load_config
    cfg = load_config(None, list(overrides))  # the trainer's defaults, and `overrides`
    if zero is None:  # the trainer's zero_optimization block (pipeline.train.optim)
        zero = _zero_config(cfg, zero_stage, ranks, on_gpu)
    t = rank_terms(zero_stage, params, largest, ranks, precision, grad_accum, ema, zero, on_gpu,
                   communication=cfg.deepspeed.communication_dtype)
    act = measure(kwargs, precision)
    frag = FRAGMENTATION if on_gpu else 1.0
    train_act = int(act.bytes(micro_batch, checkpointing) * frag)
    eval_act = int(_eval_bytes(act, micro_batch) * frag)
    context = int(cuda_context_gb * GIB) if on_gpu else 0
    low = 4 if precision == "fp32" else 2
    consolidated = 4 * params
    built = low * params + (t.weights if zero_stage == 3 else 0) + (t.gradients if zero_stage <= 1 else 0) \
        + t.master + t.ema
    # ZeRO-2 frees its fp32 gradient partition at the end of each step (averaged_gradients, the master's .grad):
    # between steps a rank holds the rest. The BF16_Optimizer (ZeRO-0/1) and ZeRO-3 keep theirs allocated.
    between_steps = t.states - (t.gradients if zero_stage == 2 else 0)
    phases = {
        "build": context + built,
        "step": context + t.states + t.buckets + train_act,
        "eval": context + between_steps + low * params + eval_act,
        "save": context + between_steps,
        "resume": context + between_steps + t.weights,
        "finetune": context + max(built, low * params + consolidated + 4 * params // ranks),
    }
    peak_phase = max(phases, key=phases.get)
    terms = {"cuda_context": context, **dataclasses.asdict(t), "train_activations": train_act,
             "eval_activations": eval_act, "parameters": params}
    return {"terms": terms, "phases": phases, "peak": phases[peak_phase], "phase": peak_phase}


def _time(cfg, macs: int, images: int, dataset_source: str, gpus: int, gpu_tflops: float, mfu: float, chosen: dict | None) -> dict:
    """Epoch and run time at `mfu` (model FLOPs), and the HFU that is with the chosen checkpointing."""
    recompute = chosen["recompute"] if chosen else cfg.model.activation_checkpointing  # chosen: its share, counted
    if isinstance(recompute, list):  # selective recompute: the share of the forward its stages run again
        from model import recompute_fraction
        recompute = recompute_fraction(cfg.model.name, recompute, cfg.image_hw)
    flops = train_flops_per_image(macs, recompute)
    global_batch = cfg.train.global_batch_size
    steps_per_epoch = images // global_batch
    steps = cfg.train.steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    return {
        "images_per_epoch": images, "dataset_source": dataset_source, "steps_per_epoch": steps_per_epoch,
        "total_steps": steps, "mfu": mfu, "hfu": mfu * flops.hardware / flops.model, "gpu_tflops": gpu_tflops,
        "train_flops_per_image": flops.model, "train_hardware_flops_per_image": flops.hardware,
        "epoch_hours": train_seconds(images, flops.model, gpus, gpu_tflops, mfu) / 3600,
        "total_hours": train_seconds(steps * global_batch, flops.model, gpus, gpu_tflops, mfu) / 3600,
        # the chosen setting's communication that compute does not hide, at --net-gbps (launch/comm.py)
        "exposed_hours": steps * (chosen or {}).get("exposed_s", 0.0) / 3600,
    }


def _near_divisor(n: int, gpus: int) -> int:
    return min(_divisors(n), key=lambda d: (abs(d - gpus), -d))


def _as_written(cfg, act, total_params, largest_layer, nodes, gpus_per_node, usable) -> dict:
    """Does the config's own DeepSpeed choice fit?"""
    from launch.model_states import ZeroSetting, ema_bytes, model_states_bytes
    ds = cfg.deepspeed
    setting = ZeroSetting(ds.zero_stage, ds.offload_optimizer, ds.offload_param)
    states, _ = model_states_bytes(setting, total_params, largest_layer, nodes, gpus_per_node, cfg.precision,
                                   _grad_accum(cfg))
    states += ema_bytes(setting, total_params, nodes * gpus_per_node, cfg.train.ema_decay)[0]
    states += _buckets(cfg, setting.stage, total_params, nodes * gpus_per_node)
    micro = cfg.train.micro_batch_size
    total = states + max(act.bytes(micro, cfg.model.activation_checkpointing), _eval_bytes(act, micro)) * FRAGMENTATION
    gpus = nodes * gpus_per_node
    per_rank, rest = divmod(cfg.train.global_batch_size, gpus * cfg.train.micro_batch_size)
    return {"setting": setting.describe(), "activation_checkpointing": cfg.model.activation_checkpointing,
            "micro_batch_size": cfg.train.micro_batch_size, "total_gib": total / GIB,
            "accumulation": per_rank if not rest else None, "fits": total <= usable and not rest and per_rank > 0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.plan", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--config", required=True, help="training config YAML (configs/...)")
    p.add_argument("--mode", choices=("pretrain", "finetune"), default="pretrain",
                   help="validate with pipeline.pretrain's or pipeline.finetune's defaults (default pretrain)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, as the trainer takes")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node")
    p.add_argument("--gpu-mem-gb", type=float, required=True,
                   help="memory per GPU in GiB (an 80 GB H100/A100 has 79.6 GiB)")
    p.add_argument("--cpu-mem-gb", type=float, default=None,
                   help="CPU memory per node in GiB; when given, offload settings must fit in it")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time estimate")
    peak = PEAK_BF16_TFLOPS[DEFAULT_GPU]
    p.add_argument("--gpu", choices=sorted(PEAK_BF16_TFLOPS), default=None,
                   help=f"GPU product for the peak TFLOP/s (default {DEFAULT_GPU} SXM, {peak:g}; "
                        "H100 PCIe 756, H100/H200 NVL 835)")
    p.add_argument("--gpu-tflops", type=float, default=None,
                   help="peak 16-bit dense TFLOP/s per GPU (overrides --gpu)")
    p.add_argument("--net-gbps", type=float, default=NET_GBPS,
                   help=f"inter-node bandwidth per GPU in Gbit/s as NCCL reaches it (default {NET_GBPS:g}: "
                        "400 Gb/s NDR InfiniBand, one NIC per GPU, at ~80%%)")
    p.add_argument("--reserve-gb", type=float, default=None,
                   help="a flat GiB per GPU instead of the CUDA context term (buckets and evaluation are counted "
                        "per setting either way)")
    p.add_argument("--cuda-context-gb", type=float, default=CUDA_CONTEXT_GIB,
                   help=f"GiB per GPU for the CUDA context and NCCL (default {CUDA_CONTEXT_GIB:g}, assumed)")
    p.add_argument("--images-per-epoch", type=int, default=None,
                   help="dataset size for the time estimate (default: data.train's _info.json or a known dataset)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides, defaults=args.mode)
    tflops = args.gpu_tflops or PEAK_BF16_TFLOPS[args.gpu or DEFAULT_GPU]
    result = plan(cfg, args.nodes, args.gpus_per_node, args.gpu_mem_gb, args.cpu_mem_gb, args.mfu,
                  tflops, args.reserve_gb, args.images_per_epoch, args.cuda_context_gb, args.net_gbps)
    result["config"] = args.config
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())

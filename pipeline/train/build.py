"""Build what a run trains: the model (initialised once, the same on every rank, or from `pretrained`) and the
DeepSpeed engine around it."""
from __future__ import annotations

import logging
import os

import torch

from core.units import precision_dtype
from pipeline.runtime import distributed as D
from pipeline.config import Config
from pipeline.train.model_args import run_model_kwargs
from pipeline.train.state import seed_rank_streams

log = logging.getLogger("pipeline.train")


def build_model(cfg: Config, plan, info: D.DistInfo, from_pretrained: bool) -> torch.nn.Module:
    """The model on this rank's device in the training dtype: seeded per tensor name (model.init), so the same
    on every rank and for every world size, or cfg.pretrained's weights; then per-rank RNG streams.

    No full fp32 copy is made: the model is built on the meta device and materialised straight on
    `info.device` in the precision's dtype (DeepSpeed's own cast to bf16/fp16 is then a no-op), so a rank's
    peak is the 16-bit model plus one fp32 tensor. Under ZeRO-3 every rank still materialises the whole 16-bit
    model (4.9 GB on the GPU for CoAtNet-7) before deepspeed.initialize partitions it: deepspeed.zero.Init would
    cut that to a partition, but it runs the constructor with parameters already partitioned, so each
    module's initialisation would need its own GatheredParameters all-gather; at 2 bytes per parameter on an
    80 GB GPU the full 16-bit copy is the smaller cost (see README, "Memory per rank, measured").
    """
    from model import build_initialised, channels_last_default, prepare_for_speed, set_attention_impl
    from pipeline.train.loss import initial_head_bias
    from pipeline.weights.adapt import HEAD_KEYS

    D.seed_everything(cfg.seed)
    pretrained = bool(cfg.pretrained and from_pretrained)
    kwargs = run_model_kwargs(cfg, plan.num_classes)
    # From pretrained weights, everything but the head is overwritten: only the head is drawn.
    model = build_initialised(**kwargs, seed=cfg.seed, device=info.device, dtype=precision_dtype(cfg.precision),
                              only=HEAD_KEYS if pretrained else None)
    bias = initial_head_bias(cfg, plan.shards, plan.num_classes)
    if bias is not None:  # before the pretrained weights: rows copied from a pretrained head overwrite it
        with torch.no_grad():
            model.head.bias.copy_(bias)
    set_attention_impl(cfg.train.attention)
    # Activations only: DeepSpeed flattens (and views as bytes) the parameters, which must stay contiguous.
    prepare_for_speed(model, channels_last_default(info.device.type, cfg.precision), weights=False)
    if pretrained:
        from pipeline.weights.files import PretrainedError
        from pipeline.weights.pretrained import init_from_pretrained, require_finished
        from pipeline.weights.shared import load_weights_once

        if not cfg.pretrained_unfinished:
            D.raise_on_every_rank(info.is_main, lambda: require_finished(cfg.pretrained), PretrainedError,
                                  catch=(PretrainedError,))

        # One rank consolidates a DeepSpeed checkpoint; the others memory-map its safetensors copy, and
        # load_state_dict copies it tensor by tensor into the model (pages shared by the node's ranks).
        barrier = torch.distributed.barrier if info.world_size > 1 else None
        weights = load_weights_once(cfg.pretrained, info.is_main, barrier,
                                    os.path.join(cfg.run_dir, "pretrained.fp32.safetensors"),
                                    trust_pickle=cfg.pretrained_trusted)
        report = init_from_pretrained(model, weights, plan.classes)
        del weights
        if info.is_main:
            log.info("initialised from %s: head %s, %d head rows copied, %d tables resized", cfg.pretrained,
                     report.get("head"), report.get("head_rows_copied", 0), len(report.get("resized_tables", {})))
    seed_rank_streams(cfg.seed, info.rank)  # stochastic depth differs per rank
    return model


def build_engine(cfg: Config, plan, info: D.DistInfo, model: torch.nn.Module, universal: bool):
    """deepspeed.initialize with the config's optimizer, schedule, ZeRO stage and precision."""
    import deepspeed
    from model import param_groups
    from pipeline.train.optim import deepspeed_config, make_schedule, optimizer_settings

    schedule = make_schedule(cfg, plan.total_steps, plan.steps_per_epoch)
    ds_config = deepspeed_config(cfg, info.world_size, on_cpu=info.device.type == "cpu", load_universal=universal)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay), config=ds_config,
        lr_scheduler=schedule.scheduler_factory(optimizer_settings(cfg)))
    return engine

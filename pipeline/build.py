"""Build what a run trains: the model (initialised once, the same on every rank, or from `pretrained`) and the
DeepSpeed engine around it."""
from __future__ import annotations

import logging
import os

import torch

from pipeline import distributed as D
from pipeline.config import Config
from pipeline.model_args import run_model_kwargs
from pipeline.train_state import seed_rank_streams

log = logging.getLogger("pipeline.train")


def build_model(cfg: Config, plan, info: D.DistInfo, from_pretrained: bool) -> torch.nn.Module:
    """The same initialisation on every rank (or cfg.pretrained's weights), then per-rank RNG streams."""
    from model import channels_last_default, create_model, prepare_for_speed, set_attention_impl

    D.seed_everything(cfg.seed)
    model = create_model(**run_model_kwargs(cfg, plan.num_classes))
    set_attention_impl(cfg.train.attention)
    # Activations only: DeepSpeed flattens (and views as bytes) the parameters, which must stay contiguous.
    prepare_for_speed(model, channels_last_default(info.device.type, cfg.precision), weights=False)
    if cfg.pretrained and from_pretrained:
        from pipeline.pretrained import init_from_pretrained
        from pipeline.shared_weights import load_weights_once

        # One rank consolidates a DeepSpeed checkpoint; the others read its safetensors copy (one fp32
        # copy per rank instead of every rank unpickling every shard: ~25 GB per rank for CoAtNet-7).
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
    if cfg.model.compile:
        model.compile()  # in place: state-dict keys (and so checkpoints) stay those of the plain model
    return model


def build_engine(cfg: Config, plan, info: D.DistInfo, model: torch.nn.Module, universal: bool):
    """deepspeed.initialize with the config's optimizer, schedule, ZeRO stage and precision."""
    import deepspeed
    from model import param_groups
    from pipeline.optim import deepspeed_config, make_schedule, optimizer_settings

    schedule = make_schedule(cfg, plan.total_steps, plan.steps_per_epoch)
    ds_config = deepspeed_config(cfg, info.world_size, on_cpu=info.device.type == "cpu", load_universal=universal)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config,
        lr_scheduler=schedule.scheduler_factory(optimizer_settings(cfg)))
    return engine

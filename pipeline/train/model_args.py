"""The one place that turns a run config, or a saved model config, into `model.create_model` arguments.

    net = create_model(**run_model_kwargs(cfg, num_classes))          # trainer, planner
    net = create_model(**model_kwargs(saved["model_config"]))          # checkpoints, exports, EMA copies

A saved config (checkpoint client state, `config.json` of an export, `CoAtNet.config.to_dict()`) holds
every CoAtNetConfig field; unknown keys are dropped, and so is the training-time memory knob
`grad_checkpointing`, so a loaded model is a plain one.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from core.units import ImageSize, image_hw


def run_model_kwargs(cfg, num_classes: int, image_size: Optional[ImageSize] = None) -> dict:
    """create_model kwargs for a training run: `cfg` is a pipeline.config.Config."""
    return {"name": cfg.model.name, "num_classes": int(num_classes),
            "image_size": list(image_hw(image_size if image_size is not None else cfg.data.image_size)),
            "drop_path_rate": cfg.model.drop_path_rate, "stride_on": cfg.model.stride_on,
            "grad_checkpointing": cfg.model.activation_checkpointing}


def model_kwargs(saved: dict) -> dict:
    """create_model kwargs from a saved model config (a CoAtNetConfig as a dict, or a subset of one)."""
    from model import CoAtNetConfig

    known = {f.name for f in dataclasses.fields(CoAtNetConfig)}
    out = {k: v for k, v in saved.items() if k in known and k != "grad_checkpointing"}
    if out.get("image_size") is not None:
        out["image_size"] = list(image_hw(out["image_size"]))
    return out

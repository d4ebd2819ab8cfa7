"""Fit a read state dict to a model: resize position tables, transfer the head by class name, check strictly.

Shared by the fine-tune start (pipeline.weights.pretrained.init_from_pretrained), evaluation at another resolution
(load_model) and the export's check against the recorded model, so a mismatch reads the same everywhere:
one line naming the source, the first offending key and the shapes.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

import torch

from model import TABLE_SUFFIX, resize_rel_pos_tables
from pipeline.weights.files import PretrainedError

log = logging.getLogger("pipeline.weights.pretrained")

HEAD_KEYS = ("head.weight", "head.bias")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The CoAtNet inside a DeepSpeed/DDP (`.module`) or torch.compile (`._orig_mod`) wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def resize_tables(state: dict, image_size: Sequence[int], mode: str = "bilinear") -> tuple[dict, dict]:
    """(state with relative-position tables resized for `image_size`, {key: [old shape, new shape]})."""
    resized_state = resize_rel_pos_tables(state, tuple(image_size), mode=mode)
    resized = {k: [list(state[k].shape), list(resized_state[k].shape)]
               for k in state if k.endswith(TABLE_SUFFIX) and state[k].shape != resized_state[k].shape}
    return resized_state, resized


def check_fits(state: dict, reference: dict, where: str, model_name: str, hint: str,
               skip: Iterable[str] = ()) -> None:
    """Same keys and shapes as `reference` (a model's state dict, meta tensors are fine), except `skip`.

    Raises PretrainedError: `<where> does not fit <model_name>: missing N key(s) e.g. K; <hint>`, or the first
    key whose shape differs.
    """
    skip = set(skip)
    missing = sorted(k for k in reference if k not in state and k not in skip)
    unexpected = sorted(k for k in state if k not in reference and k not in skip)
    if missing or unexpected:
        what = (f"missing {len(missing)} key(s) e.g. {missing[0]}" if missing else
                f"{len(unexpected)} unexpected key(s) e.g. {unexpected[0]}")
        raise PretrainedError(f"{where} does not fit {model_name}: {what}; {hint}")
    for key, value in reference.items():
        if key not in skip and tuple(state[key].shape) != tuple(value.shape):
            raise PretrainedError(f"{where}: {key} has shape {list(state[key].shape)} but {model_name} needs "
                                  f"{list(value.shape)}; {hint}")


def _copy_rows_by_name(new_weight, new_bias, src_weight, src_bias, target_classes, src_classes) -> list[list]:
    """Copy the rows of target classes whose name is among the source classes; [[target, source, name], ...]."""
    index: dict = {}
    for j, name in enumerate(src_classes):
        index.setdefault(name, j)  # a duplicated name maps to its first row
    copied = []
    for i, name in enumerate(target_classes):
        j = index.get(name)
        if j is not None:
            new_weight[i], new_bias[i] = src_weight[j], src_bias[j]
            copied.append([i, j, name])
    return copied


def transfer_head(own: dict, state: dict, target_classes: Optional[Sequence[str]],
                  src_classes: Optional[Sequence[str]], origin: str) -> tuple[str, torch.Tensor, torch.Tensor, list]:
    """(head "kept" | "replaced", weight, bias, copied rows) for a model whose state dict is `own`.

    Kept when the pretrained head has the model's shape and no class names say otherwise; else the model's
    fresh head, with the rows of target classes that the pretrained head also names copied over.
    """
    new_weight, new_bias = own["head.weight"].detach().clone(), own["head.bias"].detach().clone()
    src_weight, src_bias = state.get("head.weight"), state.get("head.bias")
    if target_classes is not None and len(target_classes) != new_weight.shape[0]:
        raise ValueError(f"{len(target_classes)} target classes for a {new_weight.shape[0]}-way head")
    head_fits = src_weight is not None and src_weight.shape == new_weight.shape
    if head_fits and (target_classes is None or (src_classes is not None and
                                                  list(target_classes) == list(src_classes))):
        # The same label set (e.g. 1K -> 1K at a higher resolution), or no label set asked for: keep the head.
        copied = [[i, i, target_classes[i] if target_classes is not None else None]
                  for i in range(new_weight.shape[0])]
        return "kept", src_weight.clone(), src_bias.clone(), copied
    if src_weight is not None and src_weight.shape[1:] != new_weight.shape[1:]:
        raise PretrainedError(f"{origin}: head.weight has {src_weight.shape[1]} inputs but the model's head "
                              f"has {new_weight.shape[1]}; build the same model as the pretrained run")
    copied = []
    if target_classes is not None and src_classes is not None and src_weight is not None:
        copied = _copy_rows_by_name(new_weight, new_bias, src_weight, src_bias, target_classes, src_classes)
    elif target_classes is not None and src_weight is not None:
        # Same size or not, unnamed rows cannot be matched to the new labels: start the head fresh.
        log.warning("%s records no class names: the new %d-way head starts fresh", origin, new_weight.shape[0])
    return "replaced", new_weight, new_bias, copied

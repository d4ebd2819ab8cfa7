"""Read trained CoAtNet weights from wherever they live, and start a fine-tune from them.

`load_weights(source)` turns any of these into one fp32 CPU state dict plus what is known about it:
  * a training run folder (run_dir with config.yaml and checkpoints/): its newest complete checkpoint;
  * a DeepSpeed checkpoint of any ZeRO stage: the `checkpoints/` folder (with DeepSpeed's `latest`) or one
    tag folder (pipeline.weights.zero_checkpoint: consolidation, trust checks);
  * a DeepSpeed universal checkpoint folder (`zero/<param>/fp32.pt`, as ds_to_universal writes it);
  * an export of `python -m pipeline.export` (a folder with model.safetensors + config.json, or the file).
EMA weights (the trainer keeps them in the checkpoint's client state) are used when present unless
`ema=False`. DeepSpeed is imported only for the formats that need it.

`init_from_pretrained(model, source, target_classes)` is the fine-tune start: relative-position tables
are resized to the model's resolution, the classifier is replaced for the new label set (rows of classes
shared by name, e.g. ImageNet-21K synsets that are also ImageNet-1K classes, are copied from the
pretrained head), and everything else must load strictly (pipeline.weights.adapt).
pipeline.weights.shared.load_weights_once lets one rank of a multi-rank fine-tune read a DeepSpeed checkpoint
for all of them.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Optional, Sequence

import torch

from pipeline.weights import zero_checkpoint as ds
from pipeline.train.model_args import model_kwargs
from pipeline.weights.adapt import HEAD_KEYS, check_fits, resize_tables, transfer_head, unwrap
from pipeline.weights.files import (EXPORT_CONFIG, EXPORT_INDEX, EXPORT_WEIGHTS, WHAT_TO_PASS, PretrainedError,  # noqa: F401
                                   export_weights_in, read_safetensors)

log = logging.getLogger("pipeline.weights.pretrained")

newest_checkpoint = ds.newest_checkpoint


def resolve(source: str) -> tuple[str, str, Optional[str]]:
    """(kind, path, run_dir) for a user-given source; kind is "safetensors" or "deepspeed" (a tag folder)."""
    path = os.path.expanduser(str(source))
    if not os.path.exists(path):
        raise PretrainedError(f"pretrained weights {source} not found; {WHAT_TO_PASS}")
    if os.path.isfile(path):
        if path.endswith((".safetensors", EXPORT_INDEX)):
            return "safetensors", path, None
        beside = export_weights_in(os.path.dirname(path))
        if os.path.basename(path) == EXPORT_CONFIG and beside:
            return "safetensors", beside, None
        raise PretrainedError(f"{path} is not a weights format this tool reads; {WHAT_TO_PASS}")
    if export_weights_in(path):
        return "safetensors", export_weights_in(path), None
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "deepspeed", ds.newest_checkpoint(os.path.join(path, "checkpoints")), path
    if ds.is_deepspeed_tag(path):
        return "deepspeed", path, ds.find_run_dir(path)
    if any(os.path.isfile(os.path.join(path, n)) for n in ("latest", "latest_universal")) or any(
            ds.is_deepspeed_tag(d) for d in glob.glob(os.path.join(glob.escape(path), "*"))):
        tag = ds.newest_checkpoint(path)
        return "deepspeed", tag, ds.find_run_dir(tag)
    raise PretrainedError(f"{path} is neither a run folder, a DeepSpeed or universal checkpoint nor an export; "
                          f"{WHAT_TO_PASS}")


def require_finished(source: str) -> None:
    """Refuse `pretrained=RUN` while RUN has not finished training: its newest checkpoint may be a few hundred
    steps into the schedule, and a fine-tune would start from it without a word. A named checkpoint
    (RUN/checkpoints/step_N), an export, or pretrained_unfinished=true say the user means it."""
    from pipeline.checkpoint.layout import FINISHED

    path = os.path.expanduser(str(source)).rstrip("/")
    if os.path.basename(path) == "checkpoints":  # RUN/checkpoints names the run's checkpoints, not one of them
        path = os.path.dirname(path) or "."
    checkpoints = os.path.join(path, "checkpoints")
    if os.path.isdir(checkpoints) and not os.path.isfile(os.path.join(path, FINISHED)):
        tag = ds.newest_checkpoint(checkpoints)
        raise PretrainedError(f"{source} has not finished training (no {FINISHED}; its newest complete checkpoint is "
                              f"{tag}): wait for it, or fine-tune from that checkpoint with pretrained={tag} (or "
                              f"pretrained_unfinished=true)")


def _complete_meta(meta: dict, state: dict, source, path: str) -> dict:
    """Fill every meta key; the head's rows are the truth about num_classes."""
    meta["source"] = str(source)
    for key in ("classes", "step", "center_crop", "crop_ratio"):
        meta.setdefault(key, None)
    head = state.get("head.weight")
    meta["num_classes"] = int(head.shape[0]) if head is not None else 0
    config = meta.get("model_config")
    if isinstance(config, dict):
        config = model_kwargs(config)
        config["num_classes"] = meta["num_classes"]
        meta["model_config"] = config
        meta["image_size"] = list(config["image_size"]) if config.get("image_size") else None
    else:
        meta["model_config"], meta["image_size"] = None, None
    if meta["classes"] is not None and len(meta["classes"]) != meta["num_classes"]:
        log.warning("%s: %d class names for a %d-way head; ignoring the names", path, len(meta["classes"]),
                    meta["num_classes"])
        meta["classes"] = None
    return meta


def load_weights(source: str, ema: bool = True, trust_pickle: bool = False) -> tuple[dict, dict]:
    """(state dict of fp32 CPU tensors, meta) from any supported source (see the module docstring).

    meta: {"source", "format" ("safetensors" | "deepspeed" | "universal"), "checkpoint" (the file/folder
    read), "ema" (EMA weights used), "step", "model_config" (create_model kwargs or None), "image_size"
    ([H, W] or None), "classes" (list or None), "num_classes", "center_crop", "crop_ratio"}.
    """
    kind, path, run_dir = resolve(source)
    if kind == "safetensors":
        state, meta = read_safetensors(path)
    else:
        state, meta = ds.read_tag(path, ema, trust_pickle)
        for key, value in ds.run_meta(run_dir).items():
            if meta.get(key) is None and value is not None:
                meta[key] = value
        meta["run_dir"] = run_dir
    if not state:
        raise PretrainedError(f"{path} holds no tensors; {WHAT_TO_PASS}")
    return state, _complete_meta(meta, state, source, path)


def init_from_pretrained(model: torch.nn.Module, source, target_classes: Optional[Sequence[str]] = None,
                         ema: bool = True, mode: str = "bilinear", trust_pickle: bool = False) -> dict:
    """Load pretrained weights into `model` (built at the fine-tune resolution and class count).

    * relative-position tables are resized to `model.config.image_size` (`mode`: bilinear as the paper, or bicubic);
    * the head: kept when it has the model's shape and no class names say otherwise; else the model's
      freshly initialised head stays, except rows of `target_classes` whose NAME is among the pretrained
      classes, which are copied from the pretrained head (weight row and bias);
    * everything else loads strictly: a missing, unexpected or mis-shaped key raises PretrainedError.
    `source` is anything `load_weights` reads, or a (state_dict, meta) pair already loaded (`load_weights_once`).
    Returns a report: {"source", "format", "checkpoint", "ema", "step", "resized_tables" {key: [old, new]},
    "head" ("kept" | "replaced"), "copied_rows" [[target, source, name], ...], "head_rows_copied",
    "missing_keys", "unexpected_keys"}.
    """
    net = unwrap(model)
    if isinstance(source, tuple):
        state, meta = source
        state, origin = dict(state), meta.get("source", "<state dict>")
    else:
        state, meta = load_weights(source, ema=ema, trust_pickle=trust_pickle)
        origin = meta.get("checkpoint") or str(source)
    resized_state, resized = resize_tables(state, net.config.image_size, mode=mode)
    own = net.state_dict()
    trained_as = (meta.get("model_config") or {}).get("name", "another model")
    check_fits(resized_state, own, origin, net.config.name, skip=HEAD_KEYS,
               hint=f"was it trained as {trained_as}? build the same model (model.name and options) as the "
                    f"pretrained run")
    head, weight, bias, copied = transfer_head(own, resized_state, target_classes, meta.get("classes"), origin)
    full = {k: v for k, v in resized_state.items() if k not in HEAD_KEYS}
    full["head.weight"], full["head.bias"] = weight, bias
    result = net.load_state_dict(full, strict=True)
    return {
        "source": str(meta.get("source", source if not isinstance(source, tuple) else origin)),
        "format": meta.get("format"),
        "checkpoint": meta.get("checkpoint"),
        "ema": meta.get("ema"),
        "step": meta.get("step"),
        "resized_tables": resized,
        "head": head,
        "head_rows_copied": len(copied),
        "copied_rows": copied,
        "missing_keys": list(result.missing_keys),
        "unexpected_keys": list(result.unexpected_keys),
    }


def load_model(source: str, ema: bool = True, image_size=None, trust_pickle: bool = False,
               **overrides) -> tuple[torch.nn.Module, dict]:
    """A ready model (eval mode, CPU) from any source that records its model config; used by evaluate."""
    from model import create_model

    state, meta = load_weights(source, ema=ema, trust_pickle=trust_pickle)
    if not meta.get("model_config"):
        raise PretrainedError(f"{meta.get('checkpoint') or source} records no model config (no client-state "
                              f"model_config, no run config.yaml, no config.json); {WHAT_TO_PASS}")
    kwargs = dict(meta["model_config"], **overrides)
    if image_size is not None:
        kwargs["image_size"] = image_size
    try:
        net = create_model(**kwargs)
    except (TypeError, ValueError) as e:
        raise PretrainedError(f"{meta.get('checkpoint') or source}: cannot build the recorded model ({e})") from None
    report = init_from_pretrained(net, (state, meta), target_classes=None)
    meta = dict(meta, image_size=list(net.config.image_size), resized_tables=report["resized_tables"])
    return net.eval(), meta

"""What every weights reader shares: the error type, the export file names, and the fp32 CPU normal form.

Readers (pipeline.deepspeed_weights for DeepSpeed/universal checkpoints, `read_safetensors` here for exports)
all return `(state, meta)` with `state` in one form: fp32 floating tensors on CPU, contiguous, no shared
storage, no wrapper prefixes; so an export, a strict load and a head transfer never see a bf16 copy or a
`module.` key.
"""
from __future__ import annotations

import json
import os

import torch

from core.errors import UserError

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
WHAT_TO_PASS = ("pass a run folder, a DeepSpeed checkpoint folder, a universal checkpoint folder or an exported "
                "model.safetensors")
# Wrappers that prefix parameter names: DeepSpeed/DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class PretrainedError(UserError):
    """The weights cannot be read or do not fit the model; the message is one line naming the file."""


def strip_prefixes(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def to_fp32_cpu(state_dict: dict) -> dict:
    """Floating tensors to fp32, everything on CPU, no shared storage (safetensors and strict loads want that)."""
    out = {}
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            continue
        value = value.detach().to("cpu")
        out[key] = (value.float() if value.is_floating_point() else value).clone().contiguous()
    return strip_prefixes(out)


def first_line(err: BaseException) -> str:
    """`Type: first line of the message`, for wrapping a library error into our one-line errors."""
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def load_safetensors_file(path: str) -> tuple[dict, dict]:
    """(tensors on CPU, the file's string metadata); an unreadable file is a PretrainedError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedError(f"{path} is not a readable safetensors file ({e}); export it again with "
                              f"`python -m pipeline.export RUN OUT`") from None


def _export_config_path(path: str) -> str:
    """OUT/config.json beside OUT/model.safetensors, or NAME.json beside NAME.safetensors."""
    folder = os.path.dirname(os.path.abspath(path))
    config_path = os.path.join(folder, EXPORT_CONFIG)
    stem_config = os.path.splitext(os.path.abspath(path))[0] + ".json"
    if not os.path.isfile(config_path) and os.path.isfile(stem_config):
        return stem_config
    return config_path


def read_safetensors(path: str) -> tuple[dict, dict]:
    """An export of `python -m pipeline.export` (or any safetensors file): weights plus its config.json."""
    state, _ = load_safetensors_file(path)
    config_path = _export_config_path(path)
    meta: dict = {"format": "safetensors", "checkpoint": path, "ema": None}
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise PretrainedError(f"{config_path} is not readable JSON ({e}); export again with "
                                  f"`python -m pipeline.export RUN OUT`") from None
        meta["model_config"] = config.get("model")
        meta["classes"] = config.get("classes")
        meta["ema"] = config.get("ema")
        meta["step"] = config.get("step")
        meta.update({k: config[k] for k in ("center_crop", "crop_ratio") if k in config})
    return to_fp32_cpu(state), meta

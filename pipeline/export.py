"""Export trained weights as one safetensors file plus a JSON model config, loadable without DeepSpeed.

    python -m pipeline.export runs/demo/finetune exports/demo          # EMA weights when the run has them
    python -m pipeline.export runs/demo/finetune exports/demo --no-ema

Layout (OUT is a folder):
    OUT/model.safetensors   the state dict (fp32 unless --dtype), keys exactly as model.create_model names them;
                            above --max-shard-size (5GB: CoAtNet-6/7 in fp32) instead
                            OUT/model-00001-of-0000N.safetensors ... + OUT/model.safetensors.index.json, the
                            layout Hugging Face shards checkpoints in (huggingface_hub's splitter writes it)
    OUT/config.json         {"model": create_model kwargs, "classes": [...] | null, "image_size": [H, W],
                             "num_classes", "mean", "std", "center_crop", "crop_ratio", "ema", "step", "source"}

Loading needs only torch, safetensors and this repository's `model` package:
    cfg = json.load(open("OUT/config.json"))
    net = model.create_model(**cfg["model"])
    net.load_state_dict(safetensors.torch.load_file("OUT/model.safetensors"), strict=True)
(a sharded export: each file the index lists), which is what `load_exported(OUT)` does. Importing this module does not import DeepSpeed (reading a DeepSpeed
run for the export does, inside `main`).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

import model as coatnet
from core.errors import cli_main
from core.files import atomic_path, atomic_write_json
from core.units import PRECISIONS, precision_dtype
from pipeline.weights.adapt import check_fits as check_state
from pipeline.weights.files import EXPORT_CONFIG as CONFIG_NAME
from pipeline.weights.files import EXPORT_INDEX as INDEX_NAME
from pipeline.weights.files import EXPORT_WEIGHTS as WEIGHTS_NAME
from pipeline.weights.files import PretrainedError, export_weights_in, load_export_weights

FORMAT = "coatnet-export/1"


def _paths(path: str) -> tuple[str, str]:
    """(weights, config) for an export folder, its model.safetensors (or index), or its config.json."""
    path = os.path.expanduser(str(path))
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    weights = path if path.endswith((".safetensors", INDEX_NAME)) else (
        export_weights_in(folder) or os.path.join(folder, WEIGHTS_NAME))
    return weights, os.path.join(folder, CONFIG_NAME)


def load_exported(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, the export's config dict) from an export folder; torch + safetensors + model only."""
    weights, config_path = _paths(path)
    for needed in (weights, config_path):
        if not os.path.isfile(needed):
            raise FileNotFoundError(f"{needed} not found: make the export with `python -m pipeline.export RUN OUT`")
    with open(config_path) as f:
        config = json.load(f)
    net = coatnet.create_model(**config["model"])
    net.load_state_dict(load_export_weights(weights), strict=True)
    return net.to(device).eval(), config


# ----------------------------------------------------------------------------------------------- export
def check_fits(state: dict, model_config: dict, where: str) -> None:
    """Build the model on the meta device (no memory) and compare every key and shape with `state`."""
    with torch.device("meta"):
        reference = coatnet.create_model(**model_config).state_dict()
    check_state(state, reference, where, f"the recorded model {model_config.get('name')}",
                hint="the checkpoint and its recorded model config disagree; export another checkpoint")


def write_weights(state: dict, out: str, metadata: dict, max_shard_size: int | str = "5GB") -> str:
    """OUT/model.safetensors, or shards + index when the state passes `max_shard_size`; returns the file to load.

    Each file is written beside its target and renamed, the index last: a killed export never leaves a
    half-written file under a final name, nor an index naming a shard that is not complete.
    """
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for stale in glob.glob(os.path.join(glob.escape(out), "model*.safetensors*")):  # an earlier export (--force)
        os.unlink(stale)
    for filename, keys in split.filename_to_tensors.items():
        with atomic_path(os.path.join(out, filename)) as tmp:
            save_file({k: state[k] for k in keys}, str(tmp), metadata=metadata)
    if not split.is_sharded:
        return os.path.join(out, WEIGHTS_NAME)
    index = os.path.join(out, INDEX_NAME)
    atomic_write_json(index, {"metadata": {**split.metadata, **metadata}, "weight_map": split.tensor_to_filename},
                      indent=2)
    return index


def export(source: str, out: str, ema: bool | None = None, dtype: str = "fp32", force: bool = False,
           trust_pickle: bool = False, max_shard_size: int | str = "5GB") -> dict:
    """Write OUT/model.safetensors and OUT/config.json from anything pipeline.weights.pretrained.load_weights reads."""
    from pipeline.weights.pretrained import load_weights
    from pipeline.data.transforms import MEAN, STD

    config_path = os.path.join(out, CONFIG_NAME)
    if os.path.exists(out) and not os.path.isdir(out):
        raise PretrainedError(f"{out} exists and is not a folder; choose another OUT")
    if not force and export_weights_in(out):
        raise PretrainedError(f"{export_weights_in(out)} already exists; choose another OUT or pass --force to "
                              f"replace it")
    state, meta = load_weights(source, ema=ema is not False, trust_pickle=trust_pickle)
    if ema is True and not meta.get("ema"):
        raise PretrainedError(f"{meta.get('checkpoint') or source} has no EMA weights (train.ema_decay was 0); "
                              f"drop --ema")
    if not meta.get("model_config"):
        raise PretrainedError(f"{meta.get('checkpoint') or source} records no model config; export from a run "
                              f"folder (with config.yaml) or a checkpoint written by pipeline.train.trainer")
    model_config = dict(meta["model_config"], grad_checkpointing=False)
    check_fits(state, model_config, meta.get("checkpoint") or source)
    target = precision_dtype(dtype)
    state = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    config = {
        "format": FORMAT,
        "model": model_config,
        "classes": meta.get("classes"),
        "num_classes": meta["num_classes"],
        "image_size": meta.get("image_size"),
        "mean": list(MEAN),
        "std": list(STD),
        "center_crop": meta.get("center_crop"),
        "crop_ratio": meta.get("crop_ratio"),
        "dtype": dtype,
        "ema": bool(meta.get("ema")),
        "step": meta.get("step"),
        "source": os.path.abspath(meta.get("checkpoint") or source),
    }
    os.makedirs(out, exist_ok=True)
    weights_path = write_weights(state, out, {"format": "pt", "model": model_config["name"]}, max_shard_size)
    atomic_write_json(config_path, config, indent=2)
    return {"weights": weights_path, "config": config_path, "tensors": len(state),
            "parameters": sum(v.numel() for v in state.values()), **config}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.export",
        description="Export a run's weights as OUT/model.safetensors + OUT/config.json, loadable with "
                    "model.create_model(**config['model']) + load_state_dict(strict=True) and no DeepSpeed "
                    "(see pipeline.export.load_exported).",
    )
    parser.add_argument("run", metavar="RUN", help="run folder (newest complete checkpoint), DeepSpeed checkpoint "
                        "folder (any ZeRO stage), universal checkpoint folder, or an export to convert")
    parser.add_argument("out", metavar="OUT", help="output folder; receives model.safetensors and config.json")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="export the EMA weights (default: EMA when the checkpoint has them; --ema fails "
                             "without them, --no-ema takes the trained weights)")
    parser.add_argument("--dtype", choices=sorted(PRECISIONS), default="fp32",
                        help="dtype of the stored tensors (default: fp32)")
    parser.add_argument("--force", action="store_true", help="replace an existing export in OUT")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest weights file (default 5GB, as Hugging Face shards): a larger state is "
                             "written as model-0000K-of-0000N.safetensors + model.safetensors.index.json "
                             "(CoAtNet-6/7 in fp32); any form huggingface_hub reads, e.g. 500MB or 2000000000")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="read a DeepSpeed checkpoint your key did not sign (it is a pickle: only if you trust "
                             "its origin)")
    return parser


_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as huggingface_hub counts


def _shard_size(text: str) -> int:
    """--max-shard-size in bytes: an integer, or one with a unit (5GB, 500MB). Parsed here, before the weights
    are read, so a typo costs no load (huggingface_hub's own parser is private)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise PretrainedError(f"--max-shard-size {text!r} is not a size; give bytes or a unit, e.g. 5GB or 500MB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = export(args.run, args.out, ema=args.ema, dtype=args.dtype, force=args.force,
                    trust_pickle=args.trust_checkpoint, max_shard_size=_shard_size(args.max_shard_size))
    print(f"exported {result['model']['name']} ({result['parameters'] / 1e6:.2f}M values, {result['num_classes']} "
          f"classes, {result['image_size']} px, {'EMA' if result['ema'] else 'trained'} weights, step "
          f"{result['step']}) from {result['source']}\n  {result['weights']}\n  {result['config']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

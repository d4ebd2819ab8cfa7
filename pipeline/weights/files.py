"""What every weights reader shares: the error type, the export file names, and the fp32 CPU normal form.

Readers (pipeline.weights.zero_checkpoint for DeepSpeed/universal checkpoints, `read_safetensors` here for exports)
all return `(state, meta)` with `state` in one form: fp32 floating tensors on CPU, contiguous, no shared
storage, no wrapper prefixes; so an export, a strict load and a head transfer never see a bf16 copy or a
`module.` key. The trainer's EMA is kept as one fragment file per rank (pipeline.train.ema); `read_ema_fragments`
assembles it here, the only place besides a resume that reads those files.
"""
from __future__ import annotations

import json
import os

import torch

from core.errors import UserError

EXPORT_WEIGHTS = "model.safetensors"
# Above --max-shard-size (5 GB: CoAtNet-6/7 in fp32) an export is several files and this index, named and laid
# out as Hugging Face shards a checkpoint ({"metadata": {"total_size"}, "weight_map": {key: file}}).
EXPORT_INDEX = "model.safetensors.index.json"
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
    """Floating tensors to fp32, everything on CPU, no shared storage (safetensors and strict loads want that).

    A tensor that already is fp32 (or integer), on the CPU, contiguous and the only user of its storage is
    kept as it is, not copied: a mapped safetensors file or checkpoint stays in the page cache, shared by the
    node's ranks, instead of every reader holding a second full fp32 copy.
    """
    out, seen = {}, set()
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            continue
        value = value.detach().to("cpu")
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.float()  # a new tensor of its own
        storage = value.untyped_storage().data_ptr()
        whole = value.storage_offset() == 0 and value.untyped_storage().nbytes() == value.numel() * value.element_size()
        if not value.is_contiguous() or storage in seen or not whole:
            value = value.clone(memory_format=torch.contiguous_format)
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
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


def load_safetensors_index(path: str) -> dict:
    """Every tensor of a sharded export, from its index file; the shard names must be plain files beside it
    (an index is input like any other: a name with a folder in it could point anywhere)."""
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        if not all(isinstance(k, str) for k in weight_map) or not all(isinstance(n, str) for n in files):
            raise TypeError("weight_map must map names to file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PretrainedError(f"{path} is not a safetensors index ({first_line(e)}); export it again with "
                              f"`python -m pipeline.export RUN OUT`") from None
    folder, state = os.path.dirname(os.path.abspath(path)), {}
    for name in files:
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise PretrainedError(f"{path} names the shard {name!r}, which is not a file beside it; export again")
        part, _ = load_safetensors_file(os.path.join(folder, name))
        state.update(part)
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise PretrainedError(f"{path} lists {len(missing)} tensor(s) its shards lack (first: {missing[0]}); "
                              f"export again")
    return state


def load_export_weights(path: str) -> dict:
    """The tensors of an export: one model.safetensors, or the shards its model.safetensors.index.json lists."""
    if path.endswith(".index.json"):
        return load_safetensors_index(path)
    return load_safetensors_file(path)[0]


def export_weights_in(folder: str) -> str | None:
    """The weights file of an export folder (the single file or the index of a sharded one), or None."""
    for name in (EXPORT_WEIGHTS, EXPORT_INDEX):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _export_config_path(path: str) -> str:
    """OUT/config.json beside OUT/model.safetensors, or NAME.json beside NAME.safetensors."""
    folder = os.path.dirname(os.path.abspath(path))
    config_path = os.path.join(folder, EXPORT_CONFIG)
    stem_config = os.path.splitext(os.path.abspath(path))[0] + ".json"
    if not os.path.isfile(config_path) and os.path.isfile(stem_config):
        return stem_config
    return config_path


def read_safetensors(path: str) -> tuple[dict, dict]:
    """An export of `python -m pipeline.export` (or any safetensors file, or a sharded export's index): weights
    plus its config.json."""
    state = load_export_weights(path)
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


# ------------------------------------------------------------------------------ EMA fragment files
EMA_FRAGMENTS = "ema_rank*.safetensors"  # pipeline.train.ema.ShardedEMA.save_fragments, one per rank of the run


def ema_fragment_files(folder: str) -> list[dict]:
    """The EMA fragment files of a checkpoint tag folder, rank order: {path, rank, world_size, updates, index}
    with index [[parameter, start, numel, shape, offset], ...]; [] when there are none. Headers only."""
    import glob

    from safetensors import SafetensorError, safe_open

    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), EMA_FRAGMENTS))):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
            out.append({"path": path, "rank": int(meta["rank"]), "world_size": int(meta["world_size"]),
                        "updates": int(meta["updates"]), "index": json.loads(meta["index"])})
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise PretrainedError(f"{path} is not a readable EMA fragment file ({first_line(e)}); the checkpoint "
                                  f"is damaged: use an earlier one or export with --no-ema") from None
    worlds = {f["world_size"] for f in out}
    if out and (len(worlds) != 1 or sorted(f["rank"] for f in out) != list(range(worlds.pop()))):
        raise PretrainedError(f"{folder} holds EMA fragment files of ranks {[f['rank'] for f in out]} but they "
                              f"were written by {out[0]['world_size']} ranks; the checkpoint is incomplete")
    return out


def read_ema_fragments(folder: str) -> dict:
    """The full EMA (fp32 CPU state dict) assembled from every rank's fragment file in `folder`: parameters
    from their fragments (each value exactly once), float buffers averaged over ranks, integer ones rank 0's."""
    from safetensors import safe_open

    params: dict = {}   # name -> (flat fp32 values, shape, values filled)
    buffers: dict = {}  # name -> every rank's values
    out: dict = {}
    for file in ema_fragment_files(folder):
        with safe_open(file["path"], framework="pt", device="cpu") as f:
            flat = f.get_tensor("fragments")
            for name, start, numel, shape, offset in file["index"]:
                if name not in params:
                    params[name] = [torch.zeros(torch.Size(shape).numel(), dtype=torch.float32), shape, 0]
                params[name][0].narrow(0, start, numel).copy_(flat.narrow(0, offset, numel))
                params[name][2] += numel
            for key in f.keys():
                if key.startswith("buffer/"):
                    buffers.setdefault(key[len("buffer/"):], []).append(f.get_tensor(key).float())
                elif key.startswith("int/"):
                    out[key[len("int/"):]] = f.get_tensor(key)
    for name, (values, shape, filled) in params.items():
        if filled != values.numel():
            raise PretrainedError(f"{folder}: the EMA fragment files hold {filled} values of {name}, which has "
                                  f"{values.numel()}; the checkpoint is incomplete or mixes runs")
        out[name] = values.view(shape)
    for name, values in buffers.items():
        out[name] = torch.stack(values).mean(0)
    return out

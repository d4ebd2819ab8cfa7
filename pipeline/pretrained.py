"""Read trained CoAtNet weights from wherever they live, and start a fine-tune from them.

`load_weights(source)` turns any of these into one fp32 CPU state dict plus what is known about it:
  * a training run folder (run_dir with config.yaml and checkpoints/): its newest complete checkpoint;
  * a DeepSpeed checkpoint of any ZeRO stage: the `checkpoints/` folder (with DeepSpeed's `latest`) or one
    tag folder; ZeRO 1-3 are consolidated with DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`
    (the fp32 master weights, not the bf16 copies), ZeRO-0 reads the module weights;
  * a DeepSpeed universal checkpoint folder (`zero/<param>/fp32.pt`, as ds_to_universal writes it);
  * an export of `python -m pipeline.export` (a folder with model.safetensors + config.json, or the file).
EMA weights (the trainer keeps them in the checkpoint's client state) are used when present unless
`ema=False`. DeepSpeed is imported only for the formats that need it.

`init_from_pretrained(model, source, target_classes)` is the fine-tune start: relative-position tables
are resized to the model's resolution, the classifier is replaced for the new label set (rows of classes
shared by name, e.g. ImageNet-21K synsets that are also ImageNet-1K classes, are copied from the
pretrained head), and everything else must load strictly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import re
import sys
from typing import Any, Optional, Sequence

import torch

from model import CoAtNetConfig, TABLE_SUFFIX, resize_rel_pos_tables
from pipeline.checkpoint import MARKER
from pipeline.config import UserError

log = logging.getLogger("pipeline.pretrained")

HEAD_KEYS = ("head.weight", "head.bias")
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
# Wrappers that prefix parameter names: DeepSpeed/DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
WHAT_TO_PASS = ("pass a run folder, a DeepSpeed checkpoint folder, a universal checkpoint folder or an exported "
                "model.safetensors")


class PretrainedError(UserError):
    """The weights cannot be read or do not fit the model; the message is one line naming the file."""


# ------------------------------------------------------------------------------------------- small helpers
def _strip_prefixes(state_dict: dict) -> dict:
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


def _to_fp32_cpu(state_dict: dict) -> dict:
    """Floating tensors to fp32, everything on CPU, no shared storage (safetensors and strict loads want that)."""
    out = {}
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            continue
        value = value.detach().to("cpu")
        out[key] = (value.float() if value.is_floating_point() else value).clone().contiguous()
    return _strip_prefixes(out)


def _written_by_this_tool(tag_dir: str) -> bool:
    """A checkpoint tag this tool's trainer wrote: it carries the trainer's completion marker (a universal
    conversion counts through the tag it was converted from)."""
    tag_dir = os.path.abspath(tag_dir)
    if os.path.exists(os.path.join(tag_dir, MARKER)):
        return True
    parent = os.path.dirname(tag_dir)
    return (os.path.basename(parent) == "universal"
            and os.path.exists(os.path.join(os.path.dirname(parent), os.path.basename(tag_dir), MARKER)))


def _require_trust(tag_dir: str, trust_pickle: bool) -> None:
    """DeepSpeed checkpoints are pickles (and DeepSpeed's zero_to_fp32 unpickles them): read one only when
    this tool wrote it or the user says they trust its origin."""
    if not trust_pickle and not _written_by_this_tool(tag_dir):
        raise PretrainedError(
            f"{tag_dir} is a DeepSpeed checkpoint this tool did not write (no {MARKER}); reading it unpickles "
            f"Python objects, which can run code. If you trust where it came from, pass --trust-checkpoint "
            f"(pipeline.evaluate / pipeline.export) or pretrained_trusted=true (fine-tuning); or export it with "
            f"python -m pipeline.export where it was trained")


def _trusted_load(path: str) -> Any:
    """torch.load a model-states file of a checkpoint that passed `_require_trust`.

    weights_only=True first. A client state with non-tensor objects (e.g. numpy RNG state) needs the full
    unpickler; that is acceptable only for checkpoints this tool wrote or the user trusts (`_require_trust`
    runs before any file of a tag is read). Plain weight files never take this path.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - any failure of the restricted unpickler
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise PretrainedError(f"{path} is not a readable DeepSpeed checkpoint file ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else first}); {WHAT_TO_PASS}") from None


def _step_of(tag: str) -> int:
    numbers = re.findall(r"\d+", os.path.basename(tag.rstrip("/")))
    return int(numbers[-1]) if numbers else -1


def _model_state_files(tag_dir: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(glob.escape(tag_dir), "*model_states.pt")))
    # mp_rank_00_model_states.pt (ZeRO 0-2) or zero_pp_rank_0_mp_rank_00_model_states.pt (ZeRO-3) first.
    files.sort(key=lambda f: (not os.path.basename(f).startswith(("mp_rank_00", "zero_pp_rank_0_")), f))
    return files


def _is_universal(tag_dir: str) -> bool:
    return os.path.isdir(os.path.join(tag_dir, "zero")) and bool(
        glob.glob(os.path.join(glob.escape(tag_dir), "zero", "*", "fp32.pt")))


def _is_deepspeed_tag(tag_dir: str) -> bool:
    return os.path.isdir(tag_dir) and (bool(_model_state_files(tag_dir)) or _is_universal(tag_dir))


def _complete(tag_dir: str) -> bool:
    """Every file a reader needs exists and is non-empty (a save killed half-way leaves some missing)."""
    if not _is_deepspeed_tag(tag_dir):
        return False
    files = _model_state_files(tag_dir) + glob.glob(os.path.join(glob.escape(tag_dir), "*optim_states.pt"))
    return all(os.path.getsize(f) > 0 for f in files)


def _read_tag_file(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def newest_checkpoint(checkpoints_dir: str) -> str:
    """The newest complete checkpoint tag folder under a DeepSpeed save_dir.

    The trainer marks a checkpoint complete (pipeline.checkpoint's `complete.json`) only after every rank
    saved it; DeepSpeed's `latest` may name a half-written tag, so marked tags win. A save_dir written by
    other code has no markers: then the tags named by `latest` / `latest_universal` (newest step wins),
    and failing those the complete-looking tag folder with the highest step.
    """
    from pipeline.checkpoint import latest_complete

    marked = latest_complete(checkpoints_dir)
    if marked is not None:
        return marked.path
    named = [_read_tag_file(os.path.join(checkpoints_dir, n)) for n in ("latest", "latest_universal")]
    candidates = [os.path.join(checkpoints_dir, t) for t in named if t]
    candidates = [c for c in candidates if _complete(c)]
    if not candidates:
        candidates = [d for d in glob.glob(os.path.join(glob.escape(checkpoints_dir), "*")) if _complete(d)]
    if not candidates:
        raise PretrainedError(f"{checkpoints_dir} holds no complete DeepSpeed checkpoint (no tag folder with "
                              f"*model_states.pt); train longer or point at another checkpoint")
    return max(candidates, key=lambda d: (_step_of(d), "universal" not in os.path.basename(d),
                                          os.path.getmtime(d)))


def _find_run_dir(tag_dir: str) -> Optional[str]:
    """The trainer's run_dir (with config.yaml) above a checkpoint tag folder, if there is one."""
    candidate = os.path.abspath(tag_dir)
    for _ in range(3):  # run_dir/checkpoints/<tag> or run_dir/checkpoints/universal/<tag>
        candidate = os.path.dirname(candidate)
        if os.path.isfile(os.path.join(candidate, "config.yaml")):
            return candidate
    return None


def model_kwargs(config: dict) -> dict:
    """Only the CoAtNetConfig fields of a saved model config: `model.create_model(**model_kwargs(c))` works."""
    known = {f.name for f in dataclasses.fields(CoAtNetConfig)}
    out = {k: v for k, v in config.items() if k in known}
    out.pop("grad_checkpointing", None)  # a training-time memory knob, not part of the model
    if isinstance(out.get("image_size"), (list, tuple)):
        out["image_size"] = [int(s) for s in out["image_size"]]
    return out


def _meta_from_run(run_dir: Optional[str]) -> dict:
    """Model config, classes and eval preprocessing from the trainer's config.yaml / classes.json."""
    meta: dict = {}
    if run_dir is None:
        return meta
    import yaml  # the resolved config is plain YAML; pipeline.config.load_config would re-validate paths

    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PretrainedError(f"{run_dir}/config.yaml is not readable YAML ({e}); is this a training run folder?")
    model_cfg, data_cfg = cfg.get("model") or {}, cfg.get("data") or {}
    if model_cfg.get("name"):
        size = data_cfg.get("image_size", 224)
        meta["model_config"] = {
            "name": model_cfg["name"], "image_size": [size, size] if isinstance(size, int) else list(size),
            **{k: model_cfg[k] for k in ("drop_path_rate", "stride_on") if k in model_cfg}}
    meta["center_crop"] = data_cfg.get("center_crop")
    meta["crop_ratio"] = data_cfg.get("crop_ratio")
    classes_path = os.path.join(run_dir, "classes.json")
    if os.path.isfile(classes_path):
        try:
            with open(classes_path) as f:
                meta["classes"] = (json.load(f) or {}).get("classes")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise PretrainedError(f"{classes_path} is not readable JSON ({e}); delete it or re-run training")
    return meta


# ------------------------------------------------------------------------------------------------ readers
def _load_universal_params(tag_dir: str, states: Optional[dict]) -> dict:
    """Parameters from `zero/<name>/fp32.pt` (weights_only), buffers from the model-states file."""
    zero = os.path.join(tag_dir, "zero")

    def read(name: str) -> torch.Tensor:
        path = os.path.join(zero, name, "fp32.pt")
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise PretrainedError(f"{path} is missing: the universal checkpoint {tag_dir} is incomplete; "
                                  f"convert it again with ds_to_universal") from None
        except Exception as e:  # noqa: BLE001
            raise PretrainedError(f"{path} is not readable ({type(e).__name__}); convert the checkpoint again "
                                  f"with ds_to_universal") from None
        return entry["param"] if isinstance(entry, dict) else entry

    state: dict = {}
    shapes = {}
    if states and states.get("param_shapes"):
        for group in states["param_shapes"]:
            shapes.update(group)
    names = list(shapes) or sorted(os.path.basename(os.path.dirname(p))
                                   for p in glob.glob(os.path.join(glob.escape(zero), "*", "fp32.pt")))
    for name in names:
        tensor = read(name)
        if name in shapes and tensor.numel() == torch.Size(shapes[name]).numel():
            tensor = tensor.reshape(shapes[name])
        state[name] = tensor
    if states:
        module = states.get("module") or {}
        for name in states.get("buffer_names") or []:
            if name in module:
                state[name] = module[name]
    return state


def _load_zero(tag_dir: str) -> dict:
    """ZeRO 1-3: DeepSpeed's consolidation of the fp32 master weights (+ buffers); ZeRO-0: module weights."""
    if not glob.glob(os.path.join(glob.escape(tag_dir), "*optim_states.pt")):
        return {}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    parent, tag = os.path.split(os.path.abspath(tag_dir))
    try:
        # DeepSpeed prints progress to stdout; keep stdout for our results (e.g. the evaluate JSON).
        with contextlib.redirect_stdout(sys.stderr):
            return get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag)
    except ValueError as e:
        if "is not a zero checkpoint" in str(e):
            return {}  # ZeRO-0: the optimizer file holds no partitioned fp32 groups; use the module weights
        raise PretrainedError(f"{tag_dir}: DeepSpeed cannot consolidate this checkpoint ({e})") from None
    except (FileNotFoundError, KeyError, RuntimeError) as e:
        raise PretrainedError(f"{tag_dir}: DeepSpeed cannot consolidate this checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); it may be incomplete") from None


def _stage0_master_weights(states: dict) -> Optional[dict]:
    """ZeRO-0 with bf16/fp16: the fp32 master copies, named.

    DeepSpeed keeps them in the model-states file as `optimizer.fp32_groups` (lists per optimizer param group,
    in the group's parameter order) without names, and zero_to_fp32 does not read stage 0. Each master tensor
    rounds to exactly its module copy (DeepSpeed copies master -> module after every step), so walking the
    groups against the named module parameters in order names them; anything ambiguous or unmatched => None.
    """
    module, optimizer = states.get("module") or {}, states.get("optimizer")
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    buffers = set(states.get("buffer_names") or [])
    names = [k for k, v in module.items() if k not in buffers and torch.is_tensor(v)]
    if not groups or not any(module[n].dtype in (torch.bfloat16, torch.float16) for n in names):
        return None
    remaining, out = list(names), dict(module)
    for group in groups:
        for master in group:
            for i, name in enumerate(remaining):
                low = module[name]
                if low.shape == master.shape and torch.equal(master.to(low.dtype), low):
                    out[name] = master
                    del remaining[i]
                    break
            else:
                return None
    return out if not remaining else None


def _load_deepspeed_tag(tag_dir: str, ema: bool, trust_pickle: bool = False) -> tuple[dict, dict]:
    _require_trust(tag_dir, trust_pickle)
    universal = _is_universal(tag_dir)
    files = _model_state_files(tag_dir)
    states = _trusted_load(files[0]) if files else None
    if files and not isinstance(states, dict):
        raise PretrainedError(f"{files[0]} is not a DeepSpeed model-states file; {WHAT_TO_PASS}")
    meta: dict = {"format": "universal" if universal else "deepspeed", "checkpoint": tag_dir, "ema": False}
    if states:
        meta["step"] = states.get("step", states.get("global_steps"))
        if isinstance(states.get("model_config"), dict):
            meta["model_config"] = dict(states["model_config"])
        if states.get("classes"):
            meta["classes"] = list(states["classes"])
        meta["zero_stage"] = ((states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage")
    state = None
    if ema and states and isinstance(states.get("ema"), dict) and states["ema"]:
        state, meta["ema"] = states["ema"], True
    elif universal:
        state = _load_universal_params(tag_dir, states)
    else:
        state = _load_zero(tag_dir)
        if not state:
            module = states.get("module") if states else None
            if not module:
                raise PretrainedError(f"{tag_dir} holds no model weights; {WHAT_TO_PASS}")
            state = _stage0_master_weights(states)
            if state is None:
                state = module
                low = {str(v.dtype) for v in module.values() if v.dtype in (torch.bfloat16, torch.float16)}
                if low:
                    log.warning("%s: no fp32 master weights found; using the module's %s copies", tag_dir,
                                "/".join(sorted(low)))
    return _to_fp32_cpu(state), meta


def _load_safetensors(path: str) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = os.path.dirname(os.path.abspath(path))
    config_path = os.path.join(folder, EXPORT_CONFIG)
    stem_config = os.path.splitext(os.path.abspath(path))[0] + ".json"
    if not os.path.isfile(config_path) and os.path.isfile(stem_config):
        config_path = stem_config
    try:
        state = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedError(f"{path} is not a readable safetensors file ({e}); export it again with "
                              f"`python -m pipeline.export RUN OUT`") from None
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
    return _to_fp32_cpu(state), meta


def _resolve(source: str) -> tuple[str, str, Optional[str]]:
    """(kind, path, run_dir) for a user-given source; kind is "safetensors" or "deepspeed" (a tag folder)."""
    path = os.path.expanduser(str(source))
    if not os.path.exists(path):
        raise PretrainedError(f"pretrained weights {source} not found; {WHAT_TO_PASS}")
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "safetensors", path, None
        if os.path.basename(path) == EXPORT_CONFIG and os.path.isfile(os.path.join(os.path.dirname(path),
                                                                                   EXPORT_WEIGHTS)):
            return "safetensors", os.path.join(os.path.dirname(path), EXPORT_WEIGHTS), None
        raise PretrainedError(f"{path} is not a weights format this tool reads; {WHAT_TO_PASS}")
    if os.path.isfile(os.path.join(path, EXPORT_WEIGHTS)):
        return "safetensors", os.path.join(path, EXPORT_WEIGHTS), None
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "deepspeed", newest_checkpoint(os.path.join(path, "checkpoints")), path
    if _is_deepspeed_tag(path):
        return "deepspeed", path, _find_run_dir(path)
    if any(os.path.isfile(os.path.join(path, n)) for n in ("latest", "latest_universal")) or any(
            _is_deepspeed_tag(d) for d in glob.glob(os.path.join(glob.escape(path), "*"))):
        tag = newest_checkpoint(path)
        return "deepspeed", tag, _find_run_dir(tag)
    raise PretrainedError(f"{path} is neither a run folder, a DeepSpeed or universal checkpoint nor an export; "
                          f"{WHAT_TO_PASS}")


def load_weights(source: str, ema: bool = True, trust_pickle: bool = False) -> tuple[dict, dict]:
    """(state dict of fp32 CPU tensors, meta) from any supported source (see the module docstring).

    meta: {"source", "format" ("safetensors" | "deepspeed" | "universal"), "checkpoint" (the file/folder
    read), "ema" (EMA weights used), "step", "model_config" (create_model kwargs or None), "image_size"
    ([H, W] or None), "classes" (list or None), "num_classes", "center_crop", "crop_ratio"}.
    """
    kind, path, run_dir = _resolve(source)
    if kind == "safetensors":
        state, meta = _load_safetensors(path)
    else:
        state, meta = _load_deepspeed_tag(path, ema, trust_pickle)
        run_meta = _meta_from_run(run_dir)
        for key, value in run_meta.items():
            if meta.get(key) is None and value is not None:
                meta[key] = value
        meta["run_dir"] = run_dir
    if not state:
        raise PretrainedError(f"{path} holds no tensors; {WHAT_TO_PASS}")
    meta["source"] = str(source)
    meta.setdefault("classes", None)
    meta.setdefault("step", None)
    meta.setdefault("center_crop", None)
    meta.setdefault("crop_ratio", None)
    head = state.get("head.weight")
    meta["num_classes"] = int(head.shape[0]) if head is not None else 0
    config = meta.get("model_config")
    if isinstance(config, dict):
        config = model_kwargs(config)
        config["num_classes"] = meta["num_classes"]  # the weights are the truth about the head
        meta["model_config"] = config
        meta["image_size"] = list(config["image_size"]) if config.get("image_size") else None
    else:
        meta["model_config"], meta["image_size"] = None, None
    if meta["classes"] is not None and len(meta["classes"]) != meta["num_classes"]:
        log.warning("%s: %d class names for a %d-way head; ignoring the names", path, len(meta["classes"]),
                    meta["num_classes"])
        meta["classes"] = None
    return state, meta


# --------------------------------------------------------------------------------------- fine-tune start
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def init_from_pretrained(model: torch.nn.Module, source, target_classes: Optional[Sequence[str]] = None,
                         ema: bool = True, mode: str = "bilinear", trust_pickle: bool = False) -> dict:
    """Load pretrained weights into `model` (built at the fine-tune resolution and class count).

    * relative-position tables are resized to `model.config.image_size` (`mode`: bilinear as the paper, or bicubic);
    * the head: kept when it has the model's shape and no class names say otherwise; else the model's
      freshly initialised head stays, except rows of `target_classes` whose NAME is among the pretrained
      classes, which are copied from the pretrained head (weight row and bias);
    * everything else loads strictly: a missing, unexpected or mis-shaped key raises PretrainedError.
    `source` is anything `load_weights` reads, or a (state_dict, meta) pair already loaded.
    Returns a report: {"source", "format", "checkpoint", "ema", "step", "resized_tables" {key: [old, new]},
    "head" ("kept" | "replaced"), "copied_rows" [[target, source, name], ...], "head_rows_copied",
    "missing_keys", "unexpected_keys"}.
    """
    net = _unwrap(model)
    if isinstance(source, tuple):
        state, meta = source
        state, origin = dict(state), meta.get("source", "<state dict>")
    else:
        state, meta = load_weights(source, ema=ema, trust_pickle=trust_pickle)
        origin = meta.get("checkpoint") or str(source)
    image_size = tuple(net.config.image_size)
    resized_state = resize_rel_pos_tables(state, image_size, mode=mode)
    resized = {k: [list(state[k].shape), list(resized_state[k].shape)]
               for k in state if k.endswith(TABLE_SUFFIX) and state[k].shape != resized_state[k].shape}

    own = net.state_dict()
    missing = sorted(k for k in own if k not in resized_state and k not in HEAD_KEYS)
    unexpected = sorted(k for k in resized_state if k not in own and k not in HEAD_KEYS)
    if missing or unexpected:
        what = (f"missing {len(missing)} key(s) e.g. {missing[0]}" if missing else
                f"{len(unexpected)} unexpected key(s) e.g. {unexpected[0]}")
        raise PretrainedError(f"{origin} does not fit {net.config.name}: {what} (was it trained as "
                              f"{(meta.get('model_config') or {}).get('name', 'another model')}?); build the "
                              f"same model.name as the pretrained run")
    for key, value in resized_state.items():
        if key in own and key not in HEAD_KEYS and value.shape != own[key].shape:
            raise PretrainedError(f"{origin}: {key} has shape {list(value.shape)} but {net.config.name} needs "
                                  f"{list(own[key].shape)}; build the same model (size and options) as the "
                                  f"pretrained run")

    new_weight, new_bias = own["head.weight"].detach().clone(), own["head.bias"].detach().clone()
    src_weight, src_bias = resized_state.get("head.weight"), resized_state.get("head.bias")
    src_classes = meta.get("classes")
    copied: list[list] = []
    head_fits = src_weight is not None and src_weight.shape == new_weight.shape
    if target_classes is not None and len(target_classes) != new_weight.shape[0]:
        raise ValueError(f"{len(target_classes)} target classes for a {new_weight.shape[0]}-way head")
    if head_fits and (target_classes is None or (src_classes is not None and
                                                  list(target_classes) == list(src_classes))):
        # The same label set (e.g. 1K -> 1K at a higher resolution), or no label set asked for: keep the head.
        head = "kept"
        new_weight, new_bias = src_weight.clone(), src_bias.clone()
        copied = [[i, i, target_classes[i] if target_classes is not None else None]
                  for i in range(new_weight.shape[0])]
    else:
        head = "replaced"
        if src_weight is not None and src_weight.shape[1:] != new_weight.shape[1:]:
            raise PretrainedError(f"{origin}: head.weight has {src_weight.shape[1]} inputs but the model's head "
                                  f"has {new_weight.shape[1]}; build the same model as the pretrained run")
        if target_classes is not None and src_classes is not None and src_weight is not None:
            index = {}
            for j, name in enumerate(src_classes):
                index.setdefault(name, j)  # a duplicated name maps to its first row
            for i, name in enumerate(target_classes):
                j = index.get(name)
                if j is not None:
                    new_weight[i], new_bias[i] = src_weight[j], src_bias[j]
                    copied.append([i, j, name])
        elif target_classes is not None and src_weight is not None:
            # Same size or not, unnamed rows cannot be matched to the new labels: start the head fresh.
            log.warning("%s records no class names: the new %d-way head starts fresh", origin,
                        new_weight.shape[0])
    full = {k: v for k, v in resized_state.items() if k not in HEAD_KEYS}
    full["head.weight"], full["head.bias"] = new_weight, new_bias
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

"""DeepSpeed checkpoints of this tool's trainer (or trusted others): find the newest complete one, read its weights.

* a run folder's `checkpoints/` (or any DeepSpeed save_dir): the newest tag the trainer marked complete;
* one tag folder of any ZeRO stage: ZeRO 1-3 are consolidated with DeepSpeed's own
  `get_fp32_state_dict_from_zero_checkpoint` (the fp32 master weights, not the bf16 copies); ZeRO-1 with bf16
  and fp32 gradient accumulation (DeepSpeed's BF16_Optimizer, which zero_to_fp32 refuses) is assembled here
  from its fp32 partitions (`_load_bf16_optimizer`); ZeRO-0 reads the fp32 master copies from the
  model-states file, else the module weights;
* a universal checkpoint folder (`zero/<param>/fp32.pt`, as ds_to_universal writes it).
EMA weights win when present and asked for: assembled from the trainer's per-rank fragment files
(`ema_rank*.safetensors` in the tag folder, pipeline.train.ema), or the full copy older checkpoints kept in the client
state. These files are
pickles: `read_tag` refuses a tag this user's key did not sign (pipeline.checkpoint.trust) unless the user says
they trust it. DeepSpeed is
imported only to consolidate ZeRO partitions.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import sys
from typing import Any, Optional

import torch

from core.units import image_hw
from pipeline.weights.files import WHAT_TO_PASS, PretrainedError, first_line, to_fp32_cpu

log = logging.getLogger("pipeline.weights.pretrained")


def _require_trust(tag_dir: str, trust_pickle: bool) -> None:
    """DeepSpeed checkpoints are pickles (and DeepSpeed's zero_to_fp32 unpickles them): read one only when this
    user's key signed its marker over the files about to be read (pipeline.checkpoint.trust), or the user says they
    trust its origin. A universal conversion carries its own signed marker."""
    from pipeline.checkpoint.layout import read_marker
    from pipeline.checkpoint.trust import require_trusted

    require_trusted(tag_dir, read_marker(tag_dir), trust_pickle)


def _trusted_load(path: str, mmap: bool = False) -> Any:
    """torch.load a model-states (or optimizer-states) file of a checkpoint that passed `_require_trust`.

    weights_only=True first (torch's restricted unpickler). A client state with other objects (DeepSpeed's
    optimizer records) needs the full unpickler; that is acceptable only for checkpoints this user signed or
    trusts (`_require_trust` runs before any file of a tag is read). Plain weight files never take this path.
    `mmap`: optimizer files, of which only the fp32 partition is read (the Adam moments are never paged in).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # noqa: BLE001 - any failure of the restricted unpickler
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as e:  # noqa: BLE001
            raise PretrainedError(f"{path} is not a readable DeepSpeed checkpoint file ({first_line(e)}); "
                                  f"{WHAT_TO_PASS}") from None


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


def is_deepspeed_tag(tag_dir: str) -> bool:
    return os.path.isdir(tag_dir) and (bool(_model_state_files(tag_dir)) or _is_universal(tag_dir))


def _complete(tag_dir: str) -> bool:
    """Every file a reader needs exists and is non-empty (a save killed half-way leaves some missing)."""
    if not is_deepspeed_tag(tag_dir):
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

    The trainer marks a checkpoint complete (pipeline.checkpoint.checkpointer's `complete.json`) only after every rank
    saved it; DeepSpeed's `latest` may name a half-written tag, so marked tags win. A save_dir written by
    other code has no markers: then the tags named by `latest` / `latest_universal` (newest step wins),
    and failing those the complete-looking tag folder with the highest step.
    """
    from pipeline.checkpoint.layout import latest_complete

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


def find_run_dir(tag_dir: str) -> Optional[str]:
    """The trainer's run_dir (with config.yaml) above a checkpoint tag folder, if there is one."""
    candidate = os.path.abspath(tag_dir)
    for _ in range(3):  # run_dir/checkpoints/<tag> or run_dir/checkpoints/universal/<tag>
        candidate = os.path.dirname(candidate)
        if os.path.isfile(os.path.join(candidate, "config.yaml")):
            return candidate
    return None


def run_meta(run_dir: Optional[str]) -> dict:
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
        meta["model_config"] = {
            "name": model_cfg["name"], "image_size": list(image_hw(data_cfg.get("image_size", 224))),
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


def _optim_files(tag_dir: str) -> list[str]:
    """`[bf16_|fp16_]zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt` in data-parallel rank order."""
    def rank(path: str) -> tuple[int, ...]:
        found = re.search(r"zero_pp_rank_(\d+)_mp_rank_(\d+)", os.path.basename(path))
        return (int(found.group(2)), int(found.group(1))) if found else (-1, -1)

    return sorted(glob.glob(os.path.join(glob.escape(tag_dir), "*optim_states.pt")), key=rank)


def _is_bf16_optimizer(optimizer_state: dict) -> bool:
    """DeepSpeed's BF16_Optimizer (ZeRO-1 + bf16 + fp32 gradient accumulation): flat fp32 partitions with
    per-parameter slice mappings, and no `zero_stage` key (which is why zero_to_fp32 refuses it)."""
    from deepspeed.checkpoint.constants import PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE

    return (ZERO_STAGE not in optimizer_state and SINGLE_PARTITION_OF_FP32_GROUPS in optimizer_state
            and PARAM_SLICE_MAPPINGS in optimizer_state)


def _load_bf16_optimizer(tag_dir: str, files: list[str], states: Optional[dict]) -> dict:
    """The fp32 master weights of a BF16_Optimizer checkpoint (+ buffers), as zero_to_fp32 gives for ZeRO 1/2.

    Each rank's file holds, per parameter group, one flat fp32 partition and `param_slice_mappings`
    {name: (start, numel)} for the parameters (or parts of them) in it. Partitions are consecutive slices of
    the group's flat buffer in rank order, so a parameter's fragments, read rank by rank, are the parameter
    in order; `param_shapes` in the model-states file gives its shape. The same walk as DeepSpeed's
    ds_to_universal, without writing the Adam moments out. Frozen parameters (not in the optimizer) and
    buffers come from the module copies.
    """
    from deepspeed.checkpoint.constants import (OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS, PARTITION_COUNT,
                                                SINGLE_PARTITION_OF_FP32_GROUPS)

    ranks = [re.search(r"_mp_rank_(\d+)", os.path.basename(f)) for f in files]
    if any(r is None or int(r.group(1)) != 0 for r in ranks):
        raise PretrainedError(f"{tag_dir}: tensor-parallel BF16_Optimizer checkpoints are not supported; "
                              f"convert it with DeepSpeed's ds_to_universal and pass the universal folder")
    pieces: dict[str, list[torch.Tensor]] = {}
    for path in files:
        loaded = _trusted_load(path, mmap=True)
        optimizer_state = (loaded.get(OPTIMIZER_STATE_DICT) if isinstance(loaded, dict) else None) or {}
        if not _is_bf16_optimizer(optimizer_state):
            raise PretrainedError(f"{path} is not a BF16_Optimizer partition like its rank-0 file; the "
                                  f"checkpoint {tag_dir} mixes runs")
        world = max(optimizer_state.get(PARTITION_COUNT) or [len(files)])
        if world != len(files):
            raise PretrainedError(f"{tag_dir} holds {len(files)} optimizer files of the {world} ranks that wrote "
                                  f"it; the checkpoint is incomplete")
        for flat, mapping in zip(optimizer_state[SINGLE_PARTITION_OF_FP32_GROUPS],
                                 optimizer_state[PARAM_SLICE_MAPPINGS]):
            for name, address in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, address.start, address.numel).clone())
    shapes: dict = {}
    for group in (states or {}).get("param_shapes") or []:
        shapes.update(group)
    state: dict = {}
    for name, shape in shapes.items():
        flat = torch.cat(pieces.pop(name)) if name in pieces else torch.empty(0)
        if flat.numel() != torch.Size(shape).numel():
            raise PretrainedError(f"{tag_dir}: {name} has {flat.numel()} of its {torch.Size(shape).numel()} "
                                  f"values in the optimizer files; the checkpoint is incomplete")
        state[name] = flat.view(shape)
    if pieces:
        raise PretrainedError(f"{tag_dir}: optimizer partitions hold {sorted(pieces)[:3]}, which the model-states "
                              f"file does not name; the files are from different runs")
    module = (states or {}).get("module") or {}
    for name, value in module.items():  # buffers and frozen parameters
        state.setdefault(name, value)
    for alias, name in ((states or {}).get("shared_params") or {}).items():  # tied weights: stored once
        if name in state:
            state[alias] = state[name]
    return state


def _load_zero(tag_dir: str, states: Optional[dict]) -> dict:
    """ZeRO 1-3: the fp32 master weights (+ buffers), by DeepSpeed's consolidation or, for its
    BF16_Optimizer, `_load_bf16_optimizer`; {} for ZeRO-0 (its optimizer files hold no partitions)."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, ZERO_STAGE

    files = _optim_files(tag_dir)
    if not files:
        return {}
    first = _trusted_load(files[0], mmap=True)
    optimizer_state = first.get(OPTIMIZER_STATE_DICT) if isinstance(first, dict) else None
    if not isinstance(optimizer_state, dict):
        raise PretrainedError(f"{files[0]} is not a DeepSpeed optimizer-states file; {WHAT_TO_PASS}")
    if _is_bf16_optimizer(optimizer_state):
        return _load_bf16_optimizer(tag_dir, files, states)
    if ZERO_STAGE not in optimizer_state:
        return {}  # ZeRO-0: no partitioned fp32 groups; the model-states file has what there is
    del first, optimizer_state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    parent, tag = os.path.split(os.path.abspath(tag_dir))
    try:
        # DeepSpeed prints progress to stdout; keep stdout for our results (e.g. the evaluate JSON).
        with contextlib.redirect_stdout(sys.stderr):
            return get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        raise PretrainedError(f"{tag_dir}: DeepSpeed cannot consolidate this checkpoint ({first_line(e)}); "
                              f"it may be incomplete") from None


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


def _ema_folder(tag_dir: str) -> str:
    """Where a tag's EMA fragment files are: the tag itself, or for a universal conversion
    (`checkpoints/universal/<tag>`) the tag it was converted from (ds_to_universal copies only DeepSpeed's files)."""
    from pipeline.weights.files import ema_fragment_files

    tag_dir = os.path.abspath(tag_dir)
    parent = os.path.dirname(tag_dir)
    source = os.path.join(os.path.dirname(parent), os.path.basename(tag_dir))
    if os.path.basename(parent) == "universal" and not ema_fragment_files(tag_dir) and os.path.isdir(source):
        return source
    return tag_dir


def _read_ema(tag_dir: str, states: Optional[dict]) -> Optional[dict]:
    """The checkpoint's full EMA, or None without one: assembled from the per-rank fragment files
    (pipeline.train.ema), or, from checkpoints written before them, the full copy in the client state."""
    from pipeline.train.ema import FORMAT
    from pipeline.weights.files import read_ema_fragments

    recorded = (states or {}).get("ema")
    folder = _ema_folder(tag_dir)
    state = read_ema_fragments(folder)
    if state:
        return state
    if isinstance(recorded, dict) and recorded.get("format") == FORMAT:
        raise PretrainedError(f"{folder} has no EMA fragment files (ema_rank*.safetensors) although its client state "
                              f"records an EMA; the checkpoint is incomplete: use an earlier one or pass --no-ema")
    if isinstance(recorded, dict) and recorded and all(torch.is_tensor(v) for v in recorded.values()):
        return recorded  # written before the fragment files: a full fp32 copy in the client state
    return None


def read_tag(tag_dir: str, ema: bool, trust_pickle: bool = False) -> tuple[dict, dict]:
    _require_trust(tag_dir, trust_pickle)
    universal = _is_universal(tag_dir)
    files = _model_state_files(tag_dir)
    # Mapped: only the tensors a reader takes are paged in (the module, or nothing when the EMA files are read).
    states = _trusted_load(files[0], mmap=True) if files else None
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
    state = _read_ema(tag_dir, states) if ema else None
    if state:
        meta["ema"] = True
    elif universal:
        state = _load_universal_params(tag_dir, states)
    else:
        state = _load_zero(tag_dir, states)
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
    return to_fp32_cpu(state), meta

"""The training config: one YAML file plus dotted `key=value` overrides, validated into nested dataclasses.

Why one module for every section: the CLIs must reject a bad key or type in milliseconds with a one-line
error, before torch or DeepSpeed are imported, and the evaluation/export engineers import `load_config`
without pulling in the trainer. Each section is still its own dataclass (ModelConfig, DataConfig, ...),
owned by the component that reads it.

    cfg = load_config("configs/demo/pretrain.yaml", ["train.steps=20", "optim.lr=3e-4"])
    cfg.model.name, cfg.data.image_size, cfg.to_dict()

Values are checked against the dataclass annotations: an unknown key, a wrong type, or a value outside
a fixed set of choices raises ConfigError with a one-line message naming the file, the key and the value.

How values are checked, and why by hand: pipeline/config_values.py.
The paper's recipes, including FINETUNE_DEFAULTS, live in pipeline.recipes.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Optional, Union

import yaml

from core import storage
from core.errors import UserError
from core.units import PRECISIONS, image_hw
from pipeline.data.sources import train_sources
from pipeline.config_values import ConfigError, build, deep_merge, set_dotted
from pipeline.recipes import FINETUNE_DEFAULTS

__all__ = ["Config", "ConfigError", "FINETUNE_DEFAULTS", "UserError", "format_help", "load_config", "save_config"]


def _f(default, help: str, choices: tuple | None = None):
    """A dataclass field with its help text (shown by `--help`) and optional allowed values."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = _f("coatnet-tiny", "model name from model.list_models(): coatnet-0..7, coatnet-nano, coatnet-tiny")
    num_classes: Optional[int] = _f(None, "null => number of classes in the train split's _info.json")
    drop_path_rate: float = _f(0.0, "stochastic depth rate (paper: C-0..3 0.2/0.3/0.5/0.7 on ImageNet-1K)")
    stride_on: str = _f("pointwise", "MBConv downsampling stride on the first 1x1 conv (paper) or the depthwise conv",
                        ("pointwise", "depthwise"))
    activation_checkpointing: Union[bool, list] = _f(False, "recompute block activations in backward to save memory: "
                                                     "true (every stage), false, or the stages 0..3 (S1..S4) to "
                                                     "recompute, e.g. [0, 1] (the high-resolution ones)")
    compile: bool = _f(False, "torch.compile the model through DeepSpeed (engine.compile, after deepspeed.initialize; "
                              "checkpoint keys stay the plain model's)")
    compile_backend: str = _f("inductor", "torch.compile backend when model.compile is true: inductor (GPU speed), "
                                          "aot_eager or eager (debug a capture problem; no code generation)",
                              ("inductor", "aot_eager", "eager"))


@dataclass
class DataConfig:
    train: Union[str, list] = _f("shards", "shard folder with _info.json, or a webdataset URL pattern "
                                 "(a-{000000..000009}.tar), or a weighted mixture: a list of {path, weight, name} "
                                 "(weight > 0, default 1; name: the folder's by default), drawn in proportion to the "
                                 "weights; every source must have the same classes (docs/training.md#data-mixtures)")
    train_split: str = _f("train", "split name inside the shard folder")
    val: Optional[str] = _f(None, "shard folder or URL pattern for evaluation; null => no evaluation")
    val_split: str = _f("val", "split name inside the val shard folder")
    image_size: Union[int, list] = _f(64, "training resolution: int or [H, W], each divisible by 32")
    num_workers: int = _f(2, "DataLoader worker processes per rank (0 = load in the training process)")
    worker_start: str = _f("auto", "how the training loader's workers start: forkserver (from a clean single-threaded "
                                   "process, ~2 s once per launch), fork (a copy of the trainer, threads and all: a "
                                   "child can deadlock in CPython's after-fork clean-up), or auto: forkserver on "
                                   "GPUs, fork on CPUs", ("auto", "fork", "forkserver"))
    prefetch_factor: int = _f(4, "batches each worker keeps ready; shared memory per rank is about (num_workers x "
                                 "prefetch_factor + 2) x micro_batch_size x 3 x H x W bytes (uint8 images)")
    decode: str = _f("cpu", "where JPEGs are decoded and augmented: cpu (in the workers) or gpu (workers ship JPEG "
                            "bytes; nvJPEG decode, crop, flip and RandAugment on the training GPU)", ("cpu", "gpu"))
    shuffle_buffer: int = _f(1000, "samples in the shuffle buffer (0 or 1 disables sample shuffling)")
    max_sample_bytes: int = _f(64 << 20, "a shard member larger than this (tar header) is skipped unread and counted "
                                         "as corrupt")
    max_pixels: int = _f(89_478_485, "an image with more pixels (JPEG header) is skipped and counted as corrupt")
    max_corrupt_fraction: float = _f(0.5, "stop the run (one line) once more than this fraction of the samples "
                                          "this launch read (all ranks) were skipped as corrupt or over the limits "
                                          "(from 16 skipped on)")
    min_crop_scale: float = _f(0.08, "RandomResizedCrop's smallest crop, as a fraction of the image area "
                                     "(Inception: 0.08)")
    multi_label_min_crop_scale: float = _f(1.0, "RandomResizedCrop's smallest crop on a multi-label split (used "
                                                "instead of min_crop_scale): its labels name every object in the "
                                                "image and a crop that cuts one out keeps its label, so the "
                                                "default keeps the whole image (measured, 10 classes, 2-4 objects "
                                                "per image, 400 steps: 0.35 left the loss at 4.29 and mAP 73.9, "
                                                "1.0 at 3.61 and 77.4); lower it where labels describe a scene")
    randaugment_layers: int = _f(2, "RandAugment ops per image; 0 disables RandAugment")
    randaugment_magnitude: int = _f(15, "RandAugment magnitude (0..30)")
    mixup_alpha: float = _f(0.0, "MixUp alpha; 0 disables MixUp")
    cutmix_alpha: float = _f(0.0, "CutMix alpha; 0 disables CutMix")
    first_label_only: bool = _f(False, "multi-label splits: train softmax on each image's first label (without "
                                       "it softmax on a multi-label split is refused; sigmoid: multi-hot targets)")
    center_crop: bool = _f(True, "eval transform: resize + center crop (pretrain) vs resize to full size (fine-tune)")
    crop_ratio: float = _f(0.875, "eval center-crop ratio (image_size / resize size)")


@dataclass
class TrainConfig:
    global_batch_size: int = _f(32, "images per optimizer step over all ranks")
    micro_batch_size: int = _f(8, "images per forward pass per rank; accumulation = global / (micro * world)")
    steps: int = _f(0, "optimizer steps; > 0 wins over epochs")
    epochs: float = _f(1.0, "epochs (an epoch is num_samples // global_batch_size steps)")
    log_every: int = _f(10, "log loss/lr/throughput every N steps (TensorBoard, console, metrics.jsonl)")
    eval_every: int = _f(0, "evaluate on data.val every N steps; 0 => at the end only")
    grad_clip: float = _f(1.0, "gradient norm clipping; 0 disables")
    ema_decay: float = _f(0.0, "weight EMA decay per step (paper fine-tune: 0.9999); 0 disables EMA")
    ema_warmup: bool = _f(False, "EMA decay warm-up min(decay, (1+t)/(10+t)) (TensorFlow's num_updates); for short "
                                 "runs only: a 30-epoch fine-tune with it never reaches 0.9999")
    deterministic: bool = _f(True, "deterministic kernels and fixed CPU threads: bit-exact resume (the CPU tests); "
                                   "false on GPU clusters for speed (cuDNN autotuning, non-deterministic kernels)")
    attention: str = _f("auto", "relative attention kernel (model/attention.py): auto picks by device and precision",
                        ("auto", "sdpa", "math", "flex"))
    max_bad_steps: int = _f(5, "steps in a row whose loss or gradient is not finite (each is skipped: no update, "
                               "no EMA) before the run rolls back to the previous checkpoint and skips their batches")
    spike_factor: float = _f(10.0, "a step whose loss (mean over ranks) exceeds this x the mean of the last 50 applied "
                                   "steps is skipped and the run rolls back as for max_bad_steps; 0 disables")
    hang_timeout_s: float = _f(1800.0, "a rank without progress this long (a step, or a save or evaluation, each with "
                                       "its own allowance; a frozen peer) dumps its stacks to run_dir/hang/ and exits "
                                       "non-zero so the launcher ends the job; also the collective timeout (+60 s)")
    sigterm_grace_s: float = _f(25.0, "on SIGTERM: save if the last save took less than this (SLURM KillWait 30 s; "
                                      "no save yet: try one), else stop at once; every rank exits within it")
    stop_check_s: float = _f(5.0, "the ranks agree whether to stop (SIGTERM, run_dir/.save_now) about this often: every "
                                  "K steps, K re-measured from the step time (and at every log step); keep it well "
                                  "under sigterm_grace_s, since a SIGTERM can wait this long to be noticed")


@dataclass
class OptimConfig:
    lr: float = _f(1.0e-3, "peak learning rate (AdamW)")
    min_lr: float = _f(1.0e-5, "learning rate at the end of the decay")
    weight_decay: float = _f(0.05, "AdamW weight decay (biases, norms and position tables get none)")
    betas: list = _f([0.9, 0.999], "AdamW betas [beta1, beta2]")
    eps: float = _f(1.0e-8, "AdamW epsilon")
    warmup_steps: int = _f(0, "linear warm-up steps")
    warmup_epochs: float = _f(0.0, "warm-up in epochs, added to warmup_steps")
    decay: str = _f("cosine", "LR decay after warm-up to min_lr", ("cosine", "linear", "constant"))
    layer_decay: Optional[float] = _f(None, "layer-wise LR decay for fine-tuning (timm --layer-decay): block k of n gets "
                                            "LR x layer_decay^(n + 1 - k), the stem ^(n + 1), the head 1; null = off")


@dataclass
class LossConfig:
    type: str = _f("softmax", "softmax cross-entropy, or sigmoid BCE (the paper's 21K/JFT choice)",
                   ("softmax", "sigmoid"))
    label_smoothing: Optional[float] = _f(0.1, "label smoothing (paper: 0.1 on 1K, 0.0001 for sigmoid pretraining); "
                                                "null => the loss's own: softmax 0.1, sigmoid 0.0001 (0.1 under "
                                                "sigmoid moves every negative's target to 0.1/C and keeps the "
                                                "loss above ~1.3 on 10 classes with 3 labels per image)")
    head_bias: Optional[float] = _f(None, "initial bias of a newly drawn classifier; null => sigmoid: the logit of "
                                          "each class's share of the train split's images (-log(C-1) without "
                                          "counts), so the label prior sits in the bias from step 0 and not in the "
                                          "features (big_vision's JFT head: -10); softmax: 0")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _f(2, "ZeRO stage 0..3", (0, 1, 2, 3))
    offload_optimizer: bool = _f(False, "ZeRO-Offload: optimizer states on CPU (stage >= 1)")
    offload_param: bool = _f(False, "ZeRO-Infinity: parameters on CPU (stage 3 only)")
    grad_accum_dtype: str = _f("fp32", "dtype gradients are accumulated in over micro-batches (DeepSpeed "
                               "data_types.grad_accum_dtype); fp32 is exact over many micro-steps",
                               ("fp32", "bf16", "fp16"))
    communication_dtype: str = _f("fp32", "dtype of the gradient reduce-scatter/all-reduce (DeepSpeed "
                                  "communication_data_type)", ("fp32", "bf16", "fp16"))
    optimizer: str = _f("torch", "AdamW implementation: torch (torch.optim.AdamW, its fused CUDA kernel on GPUs; nothing "
                                 "to build) or deepspeed (DeepSpeed's FusedAdam: a CUDA extension JIT-built on first use "
                                 "unless DeepSpeed was installed with DS_BUILD_FUSED_ADAM=1). offload_optimizer always "
                                 "uses DeepSpeedCPUAdam (JIT-built C++ unless DS_BUILD_CPU_ADAM=1)", ("torch", "deepspeed"))
    bucket_elements: Optional[int] = _f(None, "elements per gradient reduce / parameter all-gather bucket (DeepSpeed "
                                        "reduce_bucket_size, allgather_bucket_size, stage3_prefetch_bucket_size); "
                                        "null => 5e7 on GPUs, 1e7 on CPUs. A GPU holds these buffers whole: "
                                        "DeepSpeed's 5e8 default costs 1-3 GB per GPU in bf16/fp32; 5e7 (Megatron-LM "
                                        "uses 4e7) still sends 100-200 MB messages, enough to saturate NCCL. On a CPU "
                                        "there is no overlap to feed, so a bucket only costs memory (1e7: the same "
                                        "step time as 5e7 at coatnet-2, RSS 1.75 vs 1.96 GB per rank)")
    extra: dict = _f({}, "merged last into the generated DeepSpeed config (expert knobs)")


@dataclass
class CheckpointConfig:
    every_steps: int = _f(100, "save a checkpoint every N steps (and always at the end); 0 => at the end only")
    keep: int = _f(3, "keep the newest N checkpoints")
    trust: bool = _f(False, "resume from a checkpoint your key did not sign (another user's, or written before "
                            "checkpoints were signed): its files are pickles, which can run code when read")
    async_save: bool = _f(False, "asynchronous save: training is blocked only while each rank copies its state off "
                                 "the training tensors (to pinned host memory on GPUs; costs a host copy of the "
                                 "rank's checkpointed state); files are written, checksummed and marked complete in "
                                 "the background, at most one save in flight")


@dataclass
class Config:
    run_dir: str = _f("runs/demo/pretrain", "output folder: config, metrics.jsonl, tb/, checkpoints/")
    seed: int = _f(0, "seed of the data order, augmentation and initialisation")
    precision: str = _f("auto", "mixed precision: auto = bf16 where the hardware computes it natively (Ampere+ GPUs, "
                                "CPUs with AVX512-BF16/AMX), else fp32; or bf16, fp16 (dynamic loss scaling), fp32",
                        ("auto",) + PRECISIONS)
    pretrained: Optional[str] = _f(None, "fine-tune from: run folder | DeepSpeed checkpoint | universal "
                                         "checkpoint | exported .safetensors")
    pretrained_trusted: bool = _f(False, "`pretrained` is a DeepSpeed checkpoint your key did not sign and you "
                                         "trust its origin (reading it unpickles Python objects)")
    pretrained_unfinished: bool = _f(False, "allow `pretrained` = a run folder whose run has not finished (no "
                                            "finished.json): its newest complete checkpoint; or name one, "
                                            "pretrained=RUN/checkpoints/step_N")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def image_hw(self) -> tuple[int, int]:
        return image_hw(self.data.image_size)


# ---------------------------------------------------------------------------------------------- validation
# Range checks as data: (dotted key, allowed?, what the message says it must be).
_RANGES = [(key, lambda v: v > 0, "> 0") for key in ("train.global_batch_size", "train.micro_batch_size",
                                                      "train.log_every")]
_RANGES += [(key, lambda v: v >= 0, ">= 0") for key in (
    "train.steps", "train.epochs", "train.eval_every", "data.num_workers", "data.shuffle_buffer",
    "data.randaugment_layers", "optim.warmup_steps", "optim.warmup_epochs", "checkpoint.every_steps", "optim.lr",
    "optim.min_lr", "train.grad_clip", "data.mixup_alpha", "data.cutmix_alpha")]
_RANGES += [(key, lambda v: v >= 1, ">= 1") for key in ("checkpoint.keep", "data.prefetch_factor",
                                                      "train.max_bad_steps")]
_RANGES += [(key, lambda v: 0 <= v < 1, "in [0, 1)") for key in ("train.ema_decay", "model.drop_path_rate")]
_RANGES += [("loss.label_smoothing", lambda v: v is None or 0 <= v < 1, "in [0, 1) or null")]
_RANGES += [("data.randaugment_magnitude", lambda v: 0 <= v <= 30, "in 0..30")]
_RANGES += [("train.spike_factor", lambda v: v == 0 or v > 1, "0 (off) or > 1")]
_RANGES += [(key, lambda v: 0 < v <= 1, "in (0, 1]") for key in ("data.min_crop_scale", "data.crop_ratio",
                                                                  "data.multi_label_min_crop_scale")]
_RANGES += [("model.activation_checkpointing", lambda v: isinstance(v, bool) or all(
    type(i) is int and 0 <= i <= 3 for i in v), "true, false or a list of stages 0..3")]
_RANGES += [("optim.layer_decay", lambda v: v is None or 0 < v <= 1, "in (0, 1] or null")]
_RANGES += [(key, lambda v: v is None or v >= 1, ">= 1 or null") for key in ("model.num_classes",
                                                                            "deepspeed.bucket_elements")]
_RANGES += [("train.hang_timeout_s", lambda v: v > 0, "> 0"), ("train.sigterm_grace_s", lambda v: v >= 0, ">= 0"),
            ("train.stop_check_s", lambda v: v > 0, "> 0")]


def _get(cfg: Config, dotted: str):
    section, _, key = dotted.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, key)


def _validate_semantics(cfg: Config, where: str) -> None:
    """Checks that need more than one key or a range (world-size dependent checks live in the trainer)."""
    size = cfg.data.image_size
    hw = [size, size] if isinstance(size, int) else size
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 32 for v in hw):
        raise ConfigError(f"{where}: data.image_size must be a positive int or [H, W] divisible by 32, got {size!r}")
    if len(cfg.optim.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"{where}: optim.betas must be two numbers in [0, 1), got {cfg.optim.betas!r}")
    for key, allowed, must in _RANGES:
        if not allowed(_get(cfg, key)):
            raise ConfigError(f"{where}: {key} must be {must}, got {_get(cfg, key)}")
    try:
        for source in train_sources(cfg.data.train):
            storage.check_read_location(source.path, "data.train")
        storage.check_read_location(cfg.data.val, "data.val")
    except UserError as err:
        raise ConfigError(f"{where}: {err}") from None
    if cfg.train.steps == 0 and cfg.train.epochs <= 0:
        raise ConfigError(f"{where}: set train.steps > 0 or train.epochs > 0")
    if cfg.deepspeed.offload_param and cfg.deepspeed.zero_stage != 3:
        raise ConfigError(f"{where}: deepspeed.offload_param needs deepspeed.zero_stage=3 "
                          f"(got {cfg.deepspeed.zero_stage})")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        raise ConfigError(f"{where}: deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")


def load_config(path: str | os.PathLike | None, overrides: typing.Iterable[str] = (),
                defaults: dict | str | None = None) -> Config:
    """Read YAML `path` (None => defaults only), apply `key=value` overrides, validate, return a Config.

    `defaults` is a partial mapping applied under the file ("finetune" selects FINETUNE_DEFAULTS).
    """
    tree: dict = {}
    if defaults == "finetune":
        defaults = FINETUNE_DEFAULTS
    elif defaults == "pretrain":
        defaults = None
    if defaults:
        tree = deep_merge(tree, defaults)
    where = str(path) if path is not None else "config"
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} not found")
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}:{line} is not valid YAML ({problem})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        tree = deep_merge(tree, loaded)
    sources: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        set_dotted(tree, key, value, f"override {item}", Config)
        sources[key] = f"override {item}"
    cfg = build(Config, tree, "", where, sources)
    _validate_semantics(cfg, where)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (run_dir/config.yaml); load_config reads it back unchanged."""
    from core.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def format_help(defaults: dict | str | None = None) -> str:
    """Every key with its default and what it does, as YAML with comments (printed by `--help`)."""
    cfg = load_config(None, (), defaults=defaults)
    lines: list[str] = []

    def walk(obj, indent: str):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:")
                walk(value, indent + "  ")
                continue
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            if text.endswith("\n..."):
                text = text[:-4].strip()
            text = text.removesuffix("...").strip()
            comment = f.metadata.get("help", "")
            if "choices" in f.metadata:
                comment += f" [{' | '.join(map(str, f.metadata['choices']))}]"
            lines.append(f"{indent}{f.name}: {text}".ljust(36) + f" # {comment}")

    walk(cfg, "")
    return "\n".join(lines)

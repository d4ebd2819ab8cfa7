"""The paper's training recipes as data, and the YAML files under configs/ rendered from them.

Why: Table 10 used to be copied into 28 YAML files, the tests and the fine-tune defaults; a 384/512
pair differed only in image size and run folder. Here it is written once (big_vision style: a
`get_config(arg)` renders one variant), and the checked-in YAML files are its output.

    python -m pipeline.recipes --write     # regenerate configs/pretrain/*.yaml and configs/finetune/*.yaml
    python -m pipeline.recipes --check     # exit 1 naming every file that differs from its rendering
    get_config("finetune/jft_coatnet-5_384")   # the config dict of configs/finetune/jft_coatnet-5_384.yaml

The paper's values and the choices made where it is silent are explained in configs/PAPER.md.
Imports only the standard library, so pipeline.config can take FINETUNE_DEFAULTS from here cheaply.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError, cli_main

# Table 10 (the paper's appendix), one entry per column. A per-model row is a {model: value} mapping;
# randaugment None is the paper's "none"; in21k-ft's None for randaugment/drop_path is "same as pretrain".
TABLE10: dict = {
    "in1k": dict(epochs=300, batch_size=4096, lr=1e-3, min_lr=1e-5, warmup_steps=10000, warmup_epochs=0.0,
                 decay="cosine", weight_decay=0.05, loss="softmax", label_smoothing=0.1, randaugment=(2, 15),
                 mixup=0.8, ema_decay=0.0, center_crop=True,
                 drop_path={"coatnet-0": 0.2, "coatnet-1": 0.3, "coatnet-2": 0.5, "coatnet-3": 0.7}),
    "in1k-ft": dict(epochs=30, batch_size=512, lr=5e-5, min_lr=5e-5, warmup_steps=0, warmup_epochs=0.0,
                    decay="constant", weight_decay=1e-8, loss="softmax", label_smoothing=0.1, randaugment=(2, 15),
                    mixup=0.8, ema_decay=0.9999, center_crop=False, drop_path=None),
    "in21k": dict(epochs=90, batch_size=4096, lr=1e-3, min_lr=1e-5, warmup_steps=0, warmup_epochs=5.0,
                  decay="linear", weight_decay=0.01, loss="sigmoid", label_smoothing=1e-4, randaugment=None,
                  mixup=0.0, ema_decay=0.0, center_crop=True,
                  drop_path={"coatnet-2": 0.3, "coatnet-3": 0.5, "coatnet-4": 0.7}),
    "in21k-ft": dict(epochs=30, batch_size=1024, lr=5e-5, min_lr=5e-5, warmup_steps=0, warmup_epochs=0.0,
                     decay="constant", weight_decay=1e-8, loss="softmax", label_smoothing=0.1, randaugment=None,
                     mixup=0.0, ema_decay=0.9999, center_crop=False, drop_path=None),
    "jft": dict(epochs=14, batch_size=4096, lr={"coatnet-3": 1e-3, "coatnet-4": 5e-4, "coatnet-5": 5e-4},
                min_lr=1e-5, warmup_steps=20000, warmup_epochs=0.0, decay="linear", weight_decay=0.01,
                loss="sigmoid", label_smoothing=1e-4, randaugment=(2, 5), mixup=0.0, ema_decay=0.0,
                center_crop=True, drop_path={"coatnet-3": 0.0, "coatnet-4": 0.1, "coatnet-5": 0.0}),
    "jft-ft": dict(epochs=30, batch_size=512, lr=5e-5, min_lr=5e-5, warmup_steps=0, warmup_epochs=0.0,
                   decay="constant", weight_decay=1e-8, loss="softmax", label_smoothing=0.1, randaugment=(2, 5),
                   mixup=0.0, ema_decay=0.9999, center_crop=False,
                   drop_path={"coatnet-3": 0.1, "coatnet-4": 0.3, "coatnet-5": 0.2}),
}
# "PT-RA, E150" (Section 4.2, the 88.56% CoAtNet-4): RandAugment (2, 5) in 21K pretraining for 150 epochs.
PT_RA = dict(randaugment=(2, 5), epochs=150)
# Where a per-model row has no entry for a model, the paper is silent: the nearest model's value is kept.
BORROWED = {("in1k", "coatnet-4"): "coatnet-3", ("jft", "coatnet-6"): "coatnet-5",
            ("jft", "coatnet-7"): "coatnet-5", ("jft-ft", "coatnet-6"): "coatnet-5",
            ("jft-ft", "coatnet-7"): "coatnet-5"}
RA_OFF = (0, 15)  # "none": no layers; the magnitude stays the config default (unused)

# Not the paper's: where the data lives, the cluster `launch.plan` sized each recipe for (8 GPUs of 80 GB
# per node) and its choice of micro-batch per GPU (every recipe: ZeRO stage 1, no offload, no activation
# checkpointing), how often to evaluate and save.
DATASETS: dict = {
    "in1k": dict(title="ImageNet-1K", train="shards/imagenet-1k", val="shards/imagenet-1k", num_classes=1000,
                 nodes=1, eval_every=5000, checkpoint_every=1000),
    "in21k": dict(title="ImageNet-21K", train="shards/imagenet-21k", val=None, num_classes=None, nodes=4,
                  eval_every=0, checkpoint_every=2000),
    "jft": dict(title="JFT", train={"coatnet-5": "shards/jft-300m", "coatnet-6": "shards/jft-3b",
                                    "coatnet-7": "shards/jft-3b"}, val=None, num_classes=None, nodes=8,
                eval_every=0, checkpoint_every=2000),
}
FINETUNE_DATA = dict(train="shards/imagenet-1k", val="shards/imagenet-1k", num_classes=1000, eval_every=2500,
                     checkpoint_every=1000)
MICRO_BATCH: dict = {
    "in1k": {"coatnet-0": 512, "coatnet-1": 512, "coatnet-2": 256, "coatnet-3": 128, "coatnet-4": 128},
    "in21k": 128, "jft": 64,
    "in21k-ft": {"coatnet-2": 32, "coatnet-3": 32, "coatnet-4": {384: 32, 512: 16}},
    "jft-ft": 8,
}
RUNTIME = dict(seed=0, precision="bf16", stride_on="pointwise", num_workers=8, shuffle_buffer=2000,
               crop_ratio=0.875, log_every=50, grad_clip=1.0, deterministic=False)


def zero_stage(nodes: int) -> int:
    """The planner's choice (launch/comm.py): ZeRO-1 on one node; across nodes ZeRO-2, whose gradient reduce-scatter
    overlaps the backward where ZeRO-1's fp32 all-reduce after it is exposed (CoAtNet-7 on 8 x 8 H100s: 0.50 s of a
    0.85 s step). tests/test_configs.py plans the CoAtNet-7 recipes: the files must say what the planner says."""
    return 1 if nodes == 1 else 2

# Every pretraining run that has a file (dataset, model, tag); 21K and JFT runs are also fine-tuned.
PRETRAINING = ([("in1k", f"coatnet-{i}", "") for i in range(5)]
               + [("in21k", f"coatnet-{i}", "") for i in (2, 3, 4)] + [("in21k", "coatnet-4", "pt-ra")]
               + [("jft", f"coatnet-{i}", "") for i in (5, 6, 7)])
FINETUNED = ("in21k", "jft")
RESOLUTIONS = (384, 512)

FINETUNE_DEFAULTS: dict = {
    "run_dir": "runs/demo/finetune",
    "optim": {k: TABLE10["in1k-ft"][k] for k in ("lr", "min_lr", "weight_decay", "warmup_steps", "warmup_epochs",
                                                   "decay")},
    "train": {"ema_decay": TABLE10["in1k-ft"]["ema_decay"]},
    "loss": {"type": TABLE10["in1k-ft"]["loss"], "label_smoothing": TABLE10["in1k-ft"]["label_smoothing"]},
    "data": {"center_crop": TABLE10["in1k-ft"]["center_crop"]},
}
"""`load_config(defaults="finetune")`: the paper's fine-tune schedule (Table 10 "1K fine-tune" column)."""


@dataclass(frozen=True)
class Variant:
    """One YAML file: a pretraining run, or the fine-tune of one at `resolution`."""
    dataset: str
    model: str
    tag: str = ""
    resolution: int = 0  # 0 => pretraining at 224 px

    @property
    def finetune(self) -> bool:
        return self.resolution > 0

    @property
    def column(self) -> str:
        return f"{self.dataset}-ft" if self.finetune else self.dataset

    @property
    def name(self) -> str:
        """The file stem under configs/: pretrain/in21k_coatnet-4_pt-ra, finetune/jft_coatnet-5_384."""
        parts = [f"{self.dataset}_{self.model}"] + [self.tag] * bool(self.tag) + [str(self.resolution)] * self.finetune
        return ("finetune/" if self.finetune else "pretrain/") + "_".join(parts)

    @property
    def pretraining(self) -> "Variant":
        return Variant(self.dataset, self.model, self.tag)

    @property
    def run_dir(self) -> str:
        run = "-".join([self.model] + [self.tag] * bool(self.tag) + [str(self.resolution)] * self.finetune)
        return f"runs/{self.dataset}{'-ft' * self.finetune}/{run}"


def variants() -> list[Variant]:
    """Every recipe that has a YAML file, pretraining first."""
    runs = [Variant(d, m, t) for d, m, t in PRETRAINING]
    return runs + [Variant(v.dataset, v.model, v.tag, r) for v in runs if v.dataset in FINETUNED for r in RESOLUTIONS]


def _per_model(value, column: str, model: str):
    """A table cell: a scalar, or a {model: value} row where BORROWED fills what the paper leaves out."""
    if not isinstance(value, dict):
        return value
    return value[model] if model in value else value[BORROWED[(column, model)]]


def _paper(v: Variant, key: str):
    """Table 10's value of `key` for variant `v`, with PT-RA and "same as pretrain" resolved."""
    if v.tag == "pt-ra" and key in PT_RA and not v.finetune:
        return PT_RA[key]
    value = TABLE10[v.column][key]
    if value is None and v.column == "in21k-ft" and key in ("randaugment", "drop_path"):
        return _paper(v.pretraining, key)
    return _per_model(value, v.column, v.model)


def get_config(arg: str) -> dict:
    """The full config dict of one recipe, e.g. "pretrain/in1k_coatnet-0" (a configs/ path also works)."""
    return _render_parts(find(arg))[0]


def find(arg: str) -> Variant:
    """The variant named by a file stem ("pretrain/jft_coatnet-7") or a configs/ path."""
    stem = arg.removeprefix("configs/").removesuffix(".yaml")
    for v in variants():
        if v.name == stem:
            return v
    raise UserError(f"no recipe {arg!r}: name one of {', '.join(v.name for v in variants())}")


def _render_parts(v: Variant) -> tuple[dict, dict, list]:
    """(config dict, {dotted key: inline comment}, header comment lines) of variant `v`."""
    site = DATASETS[v.dataset] if not v.finetune else {**FINETUNE_DATA, "nodes": DATASETS[v.dataset]["nodes"]}
    ra = _paper(v, "randaugment") or RA_OFF
    micro = _per_model(MICRO_BATCH[v.column], v.column, v.model)
    config = {
        "run_dir": v.run_dir, "seed": RUNTIME["seed"], "precision": RUNTIME["precision"],
        "pretrained": v.pretraining.run_dir if v.finetune else None,
        "model": {"name": v.model, "num_classes": site["num_classes"], "drop_path_rate": _paper(v, "drop_path"),
                  "stride_on": RUNTIME["stride_on"], "activation_checkpointing": False},
        "data": {"train": _per_model(site["train"], v.dataset, v.model), "val": site["val"],
                 "image_size": v.resolution or 224, "num_workers": RUNTIME["num_workers"],
                 "shuffle_buffer": RUNTIME["shuffle_buffer"], "randaugment_layers": ra[0],
                 "randaugment_magnitude": ra[1], "mixup_alpha": _paper(v, "mixup"),
                 "center_crop": _paper(v, "center_crop"), "crop_ratio": RUNTIME["crop_ratio"]},
        "train": {"global_batch_size": _paper(v, "batch_size"),
                  "micro_batch_size": micro[v.resolution] if isinstance(micro, dict) else micro,
                  "epochs": _paper(v, "epochs"), "log_every": RUNTIME["log_every"], "eval_every": site["eval_every"],
                  "grad_clip": RUNTIME["grad_clip"], "ema_decay": _paper(v, "ema_decay"),
                  "deterministic": RUNTIME["deterministic"]},
        "optim": {k: _paper(v, k) for k in ("lr", "min_lr", "weight_decay", "warmup_steps", "warmup_epochs",
                                             "decay")},
        "loss": {"type": _paper(v, "loss"), "label_smoothing": _paper(v, "label_smoothing")},
        "deepspeed": {"zero_stage": zero_stage(site["nodes"]), "offload_optimizer": False,
                      "offload_param": False},
        "checkpoint": {"every_steps": site["checkpoint_every"]},
    }
    return config, _notes(v), _header(v, site["nodes"])


# ---------------------------------------------------------------------------------------------- comments
# Inline comments: (dotted key, when) -> text; `when` is a predicate on the variant. The ones that say which
# value was borrowed from where mark the places the paper is silent (configs/PAPER.md lists them).
_C6_7 = ("coatnet-6", "coatnet-7")
NOTES = [
    ("model.num_classes", lambda v: v.column == "in21k",
     "from the shards: 21,841 for the full ImageNet-21K, 10,450 / 11,221 for the processed variants"),
    ("model.num_classes", lambda v: v.column == "jft", "from the shards' _info.json (JFT-300M has 18,291 labels)"),
    ("model.drop_path_rate", lambda v: v.column == "in1k" and v.model == "coatnet-4",
     "Table 10 lists C-0..3 only; C-3's rate is kept for the deeper C-4"),
    ("model.drop_path_rate", lambda v: v.column == "jft" and v.model in _C6_7, "Table 10: 0.0 for C-5; kept for C-6/7"),
    ("model.drop_path_rate", lambda v: v.column == "in21k-ft", "Table 10: same as pretraining"),
    ("model.drop_path_rate", lambda v: v.column == "jft-ft",
     lambda v: "Table 10: 0.1/0.3/0.2 for C-3/4/5" + "; C-5's kept for C-6/7" * (v.model in _C6_7)),
    ("data.shuffle_buffer", lambda v: True, "raw samples per loader worker (~110 KB each for ImageNet)"),
    ("data.randaugment_layers", lambda v: v.column == "in21k",
     lambda v: "PT-RA: RandAugment (2, 5) in pretraining" if v.tag else "Table 10: no RandAugment in 21K pretraining"),
    ("data.randaugment_layers", lambda v: v.column == "in21k-ft",
     lambda v: f"Table 10: RandAugment as in pretraining ({'PT-RA: 2, 5' if v.tag else 'none'})"),
    ("train.epochs", lambda v: v.column == "in21k" and v.tag == "pt-ra", "PT-RA trains 150 epochs instead of 90"),
    ("train.deterministic", lambda v: True, "GPU speed (cuDNN autotuning); exact resume is the CPU tests' job"),
    ("optim.lr", lambda v: v.column == "jft",
     lambda v: "Table 10: 5e-4 for C-4/C-5; kept for C-6/7" if v.model in _C6_7 else
     "Table 10: 1e-3 (C-3), 5e-4 (C-4, C-5)"),
]
_FINETUNE_TITLES = {"in21k": ("ImageNet-21K", '"21K->1K fine-tune"'), "jft": ("JFT", '"JFT->1K fine-tune"')}


def _notes(v: Variant) -> dict:
    return {key: text(v) if callable(text) else text for key, when, text in NOTES if when(v)}


def _describe(v: Variant) -> list[str]:
    """What the run is and which Table 10 column it follows, plus where the paper is silent about it."""
    if v.finetune:
        source, column = _FINETUNE_TITLES[v.dataset]
        what = f"{source} {v.model.replace('coatnet', 'CoAtNet')}" + " PT-RA" * bool(v.tag)
        return [f"Fine-tune the {what} ({v.pretraining.run_dir}) on ImageNet-1K at {v.resolution} px: "
                f"Table 10 {column}."]
    model = v.model.replace("coatnet", "CoAtNet")
    if v.dataset == "in1k":
        lines = [f"{model} pretrained on ImageNet-1K at 224 px: the paper's Table 10 \"1K pretrain\" column."]
        if v.model == "coatnet-4":
            lines.append("The paper reports CoAtNet-4 only with ImageNet-21K/JFT pretraining; this 1K recipe is C-3's.")
        return lines
    if v.dataset == "in21k":
        first = (f"{model} \"PT-RA\": RandAugment (2, 5) during ImageNet-21K pretraining for 150 epochs, the "
                 "paper's 88.56% model." if v.tag else
                 f"{model} pretrained on ImageNet-21K (21,841 classes) at 224 px: Table 10 \"21K pretrain\".")
        return [first, "ImageNet-21K has no standard validation split: evaluate after fine-tuning on 1K."]
    jft = "JFT-300M" if v.model == "coatnet-5" else "JFT-3B"
    lines = [f"{model} pretrained on {jft} (any JFT-scale set) at 224 px: Table 10 \"JFT pretrain\"."]
    if v.model in _C6_7:
        lines += ["Table 10 gives JFT values for C-3..5; C-6/7 keep C-5's (LR 5e-4, no stochastic depth).",
                  "The paper does not print the JFT-3B schedule; 14 epochs is Table 10's JFT-300M length:",
                  "set train.epochs or train.steps to your compute budget (launch.plan prints the time)."]
    return lines


def _header(v: Variant, nodes: int) -> list[str]:
    path = f"configs/{v.name}.yaml"
    module = " --module pipeline.finetune" * v.finetune
    return ([f"sbatch --nodes {nodes} launch/slurm/pretrain.sbatch{module} --config {path}"] + _describe(v)
            + [f"DeepSpeed settings below were chosen by the planner for {nodes} node{'s' * (nodes > 1)} x 8 GPUs "
               "of 80 GB:",
               f"  python -m launch.plan --config {path} --nodes {nodes} --gpus-per-node 8 --gpu-mem-gb 80",
               "On another cluster run the planner and pass its overrides (key=value) after the config."])


# ---------------------------------------------------------------------------------------------- YAML files
def _scalar(key: str, value) -> str:
    """One YAML scalar as the files spell it: learning rates and tiny values as 1.0e-3 (YAML 1.1 needs the dot)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value and (key.endswith("lr") or abs(value) < 1e-4):
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return repr(value) if isinstance(value, float) else str(value)


def render(arg: str | Variant) -> str:
    """The YAML text of one recipe: the command line, the header comments, then every key."""
    v = arg if isinstance(arg, Variant) else find(arg)
    config, notes, header = _render_parts(v)
    lines = [f"# {line}".rstrip() for line in header] + [""]

    def emit(mapping: dict, prefix: str, indent: str) -> None:
        for key, value in mapping.items():
            if isinstance(value, dict):
                lines.extend(["", f"{key}:"])
                emit(value, f"{key}.", "  ")
                continue
            line = f"{indent}{key}: {_scalar(key, value)}"
            note = notes.get(prefix + key)
            lines.append(f"{line.ljust(31)} # {note}" if note else line)

    emit(config, "", "")
    return "\n".join(lines) + "\n"


def sync(root: Path, write: bool) -> list[Path]:
    """Compare (or with `write`, rewrite) every recipe file under root/configs; return the files that differed."""
    differ = []
    for v in variants():
        path = root / "configs" / f"{v.name}.yaml"
        text = render(v)
        if not path.is_file() or path.read_text() != text:
            differ.append(path)
            if write:
                from core.files import atomic_write_text

                atomic_write_text(path, text)
    return differ


@cli_main
def main(argv: list[str] | None = None) -> int:
    import argparse  # here, not at the top: pipeline.config imports this module on every CLI start

    parser = argparse.ArgumentParser(prog="python -m pipeline.recipes", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="regenerate every file under configs/pretrain, finetune")
    group.add_argument("--check", action="store_true", help="exit 1 naming the files that differ from the tables")
    group.add_argument("--print", metavar="NAME", help="print one recipe, e.g. finetune/jft_coatnet-5_384")
    args = parser.parse_args(argv)
    if args.print:
        sys.stdout.write(render(args.print))
        return 0
    root = Path(__file__).resolve().parents[1]
    differ = sync(root, write=args.write)
    verb = "wrote" if args.write else "differs (run `python -m pipeline.recipes --write`)"
    print("".join(f"{path.relative_to(root)}: {verb}\n" for path in differ), end="")
    return int(bool(args.check and differ))


if __name__ == "__main__":
    sys.exit(main())

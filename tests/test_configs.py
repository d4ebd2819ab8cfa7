"""The paper-scale recipes in configs/pretrain and configs/finetune: valid, runnable as written, the paper's models.

Every file must load with pipeline.config (so a renamed key breaks this test, not a cluster job), say
on its first line the command that runs it, build a model of the paper's size on the meta device, and
carry Table 10's values for its column. Table 10 itself is checked once: pipeline/recipes.py against the
table configs/PAPER.md writes out,
and every file must be exactly what `python -m pipeline.recipes --write` renders from it.
"""
import re
from pathlib import Path

import pytest
import torch

from model import create_model
from pipeline import recipes
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").glob("*/*.yaml") if p.parent.name != "demo")

# The paper's parameter counts (Table 3 / headline tables) for the ImageNet-1K models at 224 px.
PAPER_PARAMS = {"coatnet-0": 25e6, "coatnet-1": 42e6, "coatnet-2": 75e6, "coatnet-3": 168e6, "coatnet-4": 275e6,
                "coatnet-5": 688e6, "coatnet-6": 1.47e9, "coatnet-7": 2.44e9}


def test_the_recipe_set_is_complete():
    names = {p.name for p in CONFIGS}
    expected = {f"in1k_coatnet-{i}.yaml" for i in range(5)}
    expected |= {f"in21k_coatnet-{i}.yaml" for i in (2, 3, 4)} | {"in21k_coatnet-4_pt-ra.yaml"}
    expected |= {f"jft_coatnet-{i}.yaml" for i in (5, 6, 7)}
    expected |= {f"in21k_coatnet-{i}_{r}.yaml" for i in (2, 3, 4) for r in (384, 512)}
    expected |= {f"in21k_coatnet-4_pt-ra_{r}.yaml" for r in (384, 512)}
    expected |= {f"jft_coatnet-{i}_{r}.yaml" for i in (5, 6, 7) for r in (384, 512)}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_loads_and_names_its_command(path):
    cfg = load_config(REPO / path)
    first = (REPO / path).read_text().splitlines()[0]
    # The first line is a command that runs this very file with the right entry point.
    assert first.startswith("# sbatch ") and f"--config {path}" in first, first
    finetune = path.parts[1] == "finetune"
    assert ("--module pipeline.finetune" in first) == finetune
    # The node count in the command matches the cluster the planner sized the DeepSpeed settings for.
    nodes = re.search(r"--nodes (\d+)", first).group(1)
    assert f"--nodes {nodes} --gpus-per-node 8 --gpu-mem-gb 80" in (REPO / path).read_text()
    world = int(nodes) * 8
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * world) == 0, "micro x world must divide global"
    if finetune:
        assert cfg.pretrained and cfg.pretrained.startswith("runs/")
        pre = REPO / "configs" / "pretrain" / (path.name.rsplit("_", 1)[0] + ".yaml")
        assert load_config(pre).run_dir == cfg.pretrained, "fine-tune reads the run folder its pretraining writes"
    else:
        assert cfg.pretrained is None


def _paper_size_params(cfg) -> int:
    """The config's backbone (at its resolution) plus a 1000-class head: what the paper counts."""
    with torch.device("meta"):
        model = create_model(cfg.model.name, num_classes=1000, image_size=cfg.image_hw,
                             stride_on=cfg.model.stride_on)
    return sum(p.numel() for p in model.parameters())


def test_models_have_the_papers_size():
    seen = {}
    for path in CONFIGS:
        cfg = load_config(REPO / path)
        key = (cfg.model.name, cfg.image_hw)
        if key not in seen:
            seen[key] = _paper_size_params(cfg)
        paper = PAPER_PARAMS[cfg.model.name]
        # 1.5%: the paper rounds (25M, 1.47B); larger position tables at 384/512 px add < 0.2%.
        assert abs(seen[key] - paper) / paper < 0.015, (path, seen[key], paper)
    assert {name for name, _ in seen} == set(PAPER_PARAMS)


# Table 10 of the paper is written out once, in configs/PAPER.md; pipeline/recipes.py must hold exactly its values.
COLUMN_KEYS = ("epochs", "batch_size", "lr", "min_lr", "warmup_steps", "warmup_epochs", "decay", "weight_decay",
               "loss", "label_smoothing", "randaugment", "mixup", "ema_decay", "center_crop", "drop_path")
_NUMBER = r"[0-9.]+(?:e-?[0-9]+)?"


def _per_model(text: str):
    """'1e-3 (C-3), 5e-4 (C-4, C-5)' or 'C-0..3: 0.2/0.3/0.5/0.7' -> {model: value}; 'same as pretrain' -> None."""
    if text.startswith("same as"):
        return None
    if m := re.fullmatch(r"C-(\d)\.\.(\d): (.+)", text):
        values = [float(v) for v in m.group(3).split("/")]
        return {f"coatnet-{i}": v for i, v in zip(range(int(m.group(1)), int(m.group(2)) + 1), values, strict=True)}
    pairs = re.findall(rf"({_NUMBER}) \(([^)]+)\)", text)
    if pairs:
        return {f"coatnet-{c.strip()[2:]}": float(v) for v, models in pairs for c in models.split(",")}
    return float(text)


def _paper_md_table10() -> dict:
    """configs/PAPER.md's Table 10, column -> recipes.TABLE10's fields (the cells as the page writes them)."""
    rows = {}
    for line in (REPO / "configs" / "PAPER.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7:
            rows[cells[0]] = cells[1:]
    columns = [c.strip("`") for c in rows["recipes.py column"]]
    table = {}
    for i, column in enumerate(columns):
        cell = {name: values[i] for name, values in rows.items()}
        warm = cell["warm-up"]
        ra = re.match(r"(\d+), (\d+)", cell["RandAugment (layers, magnitude)"])  # a per-model note after it: text
        table[column] = dict(
            epochs=int(cell["epochs"]), batch_size=int(cell["batch size"]), lr=_per_model(cell["peak LR"]),
            min_lr=float(cell["min LR"].split()[0]),
            warmup_steps=int(warm.split("K")[0]) * 1000 if warm.endswith("K steps") else 0,
            warmup_epochs=float(warm.split()[0]) if warm.endswith("epochs") else 0.0,
            decay={"none": "constant"}.get(cell["LR decay"], cell["LR decay"]),
            weight_decay=float(cell["weight decay"]), loss=cell["loss"], label_smoothing=float(cell["label smoothing"]),
            randaugment=(int(ra.group(1)), int(ra.group(2))) if ra else None,
            mixup=0.0 if cell["MixUp alpha"] == "none" else float(cell["MixUp alpha"]),
            ema_decay=0.0 if cell["EMA decay"] == "none" else float(cell["EMA decay"]),
            center_crop={"yes": True, "no": False}[cell["center crop"]], drop_path=_per_model(cell["stochastic depth"]))
    return table


def test_table10_is_the_papers():
    """recipes.TABLE10 equals the table configs/PAPER.md writes out (so the page and the code cannot drift)."""
    paper = _paper_md_table10()
    assert set(recipes.TABLE10) == set(paper)
    for column, values in paper.items():
        assert dict(recipes.TABLE10[column]) == values, column
    assert recipes.PT_RA == {"randaugment": (2, 5), "epochs": 150}  # Section 4.2: C-4 PT-RA, 88.56%


def test_recipe_files_are_rendered_from_the_tables():
    assert recipes.sync(REPO, write=False) == [], "run `python -m pipeline.recipes --write`"
    assert {f"configs/{v.name}.yaml" for v in recipes.variants()} == {str(p) for p in CONFIGS}
    assert recipes.get_config("configs/finetune/jft_coatnet-5_384.yaml")["data"]["image_size"] == 384


@pytest.mark.parametrize("variant", recipes.variants(), ids=lambda v: v.name)
def test_each_file_carries_its_table10_column(variant):
    """The rendering puts each table cell where the trainer reads it (the values themselves: the test above)."""
    cfg = load_config(REPO / "configs" / f"{variant.name}.yaml")
    column = dict(recipes.TABLE10[variant.column])
    if variant.tag == "pt-ra" and not variant.finetune:
        column.update(recipes.PT_RA)
    pretrain = recipes.Variant(variant.dataset, variant.model, variant.tag)
    same_as_pretrain = load_config(REPO / "configs" / f"{pretrain.name}.yaml")
    borrowed = recipes.BORROWED.get((variant.column, variant.model), variant.model)  # where the paper is silent

    def pick(cell):
        return cell[borrowed] if isinstance(cell, dict) else cell

    t, o, d, loss = cfg.train, cfg.optim, cfg.data, cfg.loss
    assert (t.epochs, t.global_batch_size, o.lr, o.min_lr) == tuple(pick(column[k]) for k in COLUMN_KEYS[:4])
    assert (o.warmup_steps, o.warmup_epochs, o.decay, o.weight_decay) == tuple(column[k] for k in COLUMN_KEYS[4:8])
    assert (loss.type, loss.label_smoothing, d.mixup_alpha, t.ema_decay, d.center_crop) == (
        column["loss"], column["label_smoothing"], column["mixup"], column["ema_decay"], column["center_crop"])
    if column["drop_path"] is None:  # "same as pretrain"
        assert cfg.model.drop_path_rate == same_as_pretrain.model.drop_path_rate
    else:
        assert cfg.model.drop_path_rate == pick(column["drop_path"])
    if variant.column == "in21k-ft":  # "same as pretrain"
        ra = (same_as_pretrain.data.randaugment_layers, same_as_pretrain.data.randaugment_magnitude)
    else:
        ra = column["randaugment"] or recipes.RA_OFF  # None: "none"
    assert (d.randaugment_layers, d.randaugment_magnitude) == ra
    assert d.image_size == (variant.resolution or 224)
    assert cfg.precision == "bf16" and t.grad_clip == 1.0 and cfg.model.stride_on == "pointwise"
    assert cfg.model.num_classes == (1000 if variant.dataset == "in1k" or variant.finetune else None)


def test_where_the_paper_is_silent_the_nearest_model_is_borrowed():
    dp = {v.name: load_config(REPO / "configs" / f"{v.name}.yaml").model.drop_path_rate for v in recipes.variants()}
    assert dp["pretrain/in1k_coatnet-4"] == dp["pretrain/in1k_coatnet-3"] == 0.7
    assert dp["pretrain/jft_coatnet-6"] == dp["pretrain/jft_coatnet-7"] == 0.0
    assert dp["finetune/jft_coatnet-7_512"] == dp["finetune/jft_coatnet-5_512"] == 0.2
    assert load_config(REPO / "configs/pretrain/jft_coatnet-7.yaml").optim.lr == 5e-4


def test_finetune_defaults_come_from_the_table():
    ft = recipes.TABLE10["in1k-ft"]
    cfg = load_config(None, defaults="finetune")
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay, cfg.optim.decay) == (
        ft["lr"], ft["min_lr"], ft["weight_decay"], ft["decay"])
    assert (cfg.train.ema_decay, cfg.loss.type, cfg.data.center_crop) == (ft["ema_decay"], ft["loss"], False)


@pytest.mark.parametrize("name,mode", [("pretrain/jft_coatnet-7", "pretrain"), ("pretrain/in1k_coatnet-0", "pretrain"),
                                       ("finetune/jft_coatnet-7_512", "finetune")])
def test_deepspeed_settings_are_the_planners_for_the_cluster_in_the_header(name, mode):
    """Each file says its DeepSpeed settings were chosen by the planner for the nodes its command names: planned
    there, the choice must be what the file writes (a researcher's first CoAtNet-7 run starts from the file)."""
    from launch.plan import plan

    path = REPO / "configs" / f"{name}.yaml"
    nodes = int(re.search(r"--nodes (\d+)", path.read_text().splitlines()[0]).group(1))
    cfg = load_config(str(path), [], defaults=mode)
    chosen = plan(cfg, nodes, 8, 80)["chosen"]
    written = (cfg.deepspeed.zero_stage, cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_param,
               cfg.model.activation_checkpointing, cfg.train.micro_batch_size)
    assert (chosen["zero_stage"], chosen["offload_optimizer"], chosen["offload_param"],
            chosen["activation_checkpointing"], chosen["micro_batch_size"]) == written, name

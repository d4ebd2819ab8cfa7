"""Multi-label demo data: 2-3 shapes of different classes per image, labels = the shapes present.

Why: multi-label training (JFT/OpenImages style) needs images whose labels are a *set*, with the answer
known exactly, and an input the shard job reads like a real multi-label collection. One image cannot live
in several ImageFolder class folders, so this writes a flat folder plus a JSONL manifest:

    OUT/images/multi_00000.jpg ...
    OUT/labels.jsonl   {"path": "images/multi_00000.jpg", "labels": ["circle", "star"]} per image
    OUT/classes.txt    the shape classes in their fixed order (pass it to `shard --classes`)

Each object sits in its own cell of a 2x2 grid (random scale, position and rotation inside it, random
palette colour), so no shape hides another and every label is visible. Labels are listed in class order.
Every image is a pure function of (seed, index): the same arguments give byte-identical files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import UserError
from core.files import atomic_write_text

from data_prep.demo_data import COLOURS, SHAPES, DemoDataConfig, _background, _draw_mask, _looks_like_demo_tree, paint, prepare_out

MANIFEST_NAME = "labels.jsonl"
CLASSES_NAME = "classes.txt"
IMAGES_DIR = "images"
_SET_ID = 2          # after demo_data.LABEL_SETS ("shapes" 0, "shape-color" 1): a seed stream of its own
_CELLS_SET_ID = 3    # the single-object 'cells' set
_CELLS = 2           # a 2x2 grid: at most 4 objects, one per cell


def render_multi(shapes: list[str], size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image with each of `shapes` in its own grid cell, on a textured background."""
    img = _background(size, rng)
    cell = size // _CELLS
    cells = rng.choice(_CELLS * _CELLS, size=len(shapes), replace=False)
    for shape, where in zip(shapes, cells):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        rgb = np.asarray(COLOURS[colour], dtype=np.float32) + rng.uniform(-18, 18, size=3)
        mask = Image.new("L", (size, size), 0)
        mask.paste(_draw_mask(shape, cell, rng), (int(where % _CELLS) * cell, int(where // _CELLS) * cell))
        img = paint(img, np.asarray(mask, dtype=np.float32)[..., None] / 255.0, rgb, rng)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _looks_like_multi_demo(out: Path) -> bool:
    for entry in out.iterdir():
        if entry.name in (MANIFEST_NAME, CLASSES_NAME) and entry.is_file():
            continue
        if entry.name != IMAGES_DIR or not entry.is_dir():
            return False
        if any(not f.is_file() or f.suffix != ".jpg" for f in entry.iterdir()):
            return False
    return True


def _prepare(cfg: DemoDataConfig) -> Path:
    if not 1 <= cfg.classes <= len(SHAPES):
        raise UserError(f"--classes {cfg.classes}: the 'multi' label set has 1..{len(SHAPES)} classes")
    out = prepare_out(cfg, 16, _looks_like_multi_demo, "demo-data --label-set multi (4 cells of 8 px)")
    (out / IMAGES_DIR).mkdir(parents=True)
    return out


def generate_multi(cfg: DemoDataConfig) -> tuple[int, dict[str, int]]:
    """Write classes x per_class images, the manifest and the class list; return (images, images per class)."""
    out = _prepare(cfg)
    classes = list(SHAPES[:cfg.classes])
    counts = dict.fromkeys(classes, 0)
    lines = []
    for i in range(cfg.classes * cfg.per_class):
        rng = np.random.default_rng([cfg.seed, _SET_ID, i])
        k = min(cfg.classes, int(rng.integers(2, 4)))
        shapes = [classes[c] for c in sorted(rng.choice(cfg.classes, size=k, replace=False))]
        rel = f"{IMAGES_DIR}/multi_{i:05d}.jpg"
        render_multi(shapes, cfg.size, rng).save(out / rel, format="JPEG", quality=cfg.quality)
        lines.append(json.dumps({"path": rel, "labels": shapes}))
        for name in shapes:
            counts[name] += 1
    atomic_write_text(out / CLASSES_NAME, "".join(f"{name}\n" for name in classes))
    atomic_write_text(out / MANIFEST_NAME, "".join(f"{line}\n" for line in lines))  # last: marks it complete
    return len(lines), counts


def generate_cells(cfg: DemoDataConfig) -> dict[str, int]:
    """Single-label images drawn exactly as the multi-label ones, with one object: OUT/<shape>/cells_<i>.jpg.

    Why: a transfer task at the scale pretraining saw (an object fills one cell of the 2x2 grid) isolates what
    the multi-label pretraining learned; the `shapes` set draws one large object per image, a different task.
    """
    if not 1 <= cfg.classes <= len(SHAPES):
        raise UserError(f"--classes {cfg.classes}: the 'cells' label set has 1..{len(SHAPES)} classes")
    out = prepare_out(cfg, 16, _looks_like_demo_tree, "demo-data --label-set cells (4 cells of 8 px)")
    counts = {}
    for c, shape in enumerate(SHAPES[:cfg.classes]):
        folder = out / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(cfg.per_class):
            rng = np.random.default_rng([cfg.seed, _CELLS_SET_ID, c, i])
            render_multi([shape], cfg.size, rng).save(folder / f"cells_{i:05d}.jpg", format="JPEG",
                                                      quality=cfg.quality)
        counts[shape] = cfg.per_class
    return counts

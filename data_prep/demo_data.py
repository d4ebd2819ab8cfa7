"""Built-in demo data: coloured shapes on noisy textured backgrounds, as an ImageFolder tree of JPEGs.

Why this data: the demo and the tests need images that a tiny CoAtNet can learn in a few hundred steps
on a CPU, that cost nothing to make, and that offer two *different* label sets over the same kind of
images, so that pretraining on one and fine-tuning on the other exercises a real head swap:

- ``shapes``: the label is the shape kind (``circle``, ``square``, ...); the colour is random, so it
  carries no information.
- ``shape-color``: the label is the (shape, colour) pair (``circle-red``, ``square-blue``, ...); the
  first N pairs are a grid of ceil(sqrt(N)) shapes by ceil(sqrt(N)) colours, so both the shape and the
  colour are needed to tell classes apart.

Every image is a pure function of (seed, label set, class name, index): the same arguments give
byte-identical files (with the same Pillow/libjpeg build).
"""
from __future__ import annotations

import math
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core.errors import UserError

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "arrow")
COLOURS = {  # name -> RGB; the order fixes the shape-color grid
    "red": (220, 40, 40), "green": (40, 185, 60), "blue": (40, 80, 235), "yellow": (240, 215, 40),
    "magenta": (215, 50, 200), "cyan": (40, 215, 225), "orange": (250, 140, 30), "white": (245, 245, 245),
}
LABEL_SETS = ("shapes", "shape-color")
_SUPERSAMPLE = 2  # shapes are drawn at 2x and reduced: cheap anti-aliasing


@dataclass(frozen=True)
class DemoDataConfig:
    out: Path
    classes: int = 6
    per_class: int = 100
    size: int = 64
    seed: int = 0
    label_set: str = "shapes"
    quality: int = 90
    overwrite: bool = False


def class_specs(num_classes: int, label_set: str) -> list[tuple[str, str, str | None]]:
    """(folder name, shape, colour or None) for each class, in a fixed order."""
    if label_set not in LABEL_SETS:
        raise UserError(f"--label-set {label_set!r}: choose one of {', '.join(LABEL_SETS)}")
    most = len(SHAPES) if label_set == "shapes" else min(len(SHAPES), len(COLOURS)) ** 2
    if not 1 <= num_classes <= most:
        raise UserError(f"--classes {num_classes}: the {label_set!r} label set has 1..{most} classes")
    if label_set == "shapes":
        return [(shape, shape, None) for shape in SHAPES[:num_classes]]
    side = math.ceil(math.sqrt(num_classes))
    grid = [(s, c) for s in SHAPES[:side] for c in list(COLOURS)[:side]]
    return [(f"{s}-{c}", s, c) for s, c in grid[:num_classes]]


def _rotate(points: list[tuple[float, float]], angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _star(r: float, points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        rad = r if k % 2 == 0 else r * inner
        a = math.pi * k / points - math.pi / 2
        out.append((rad * math.cos(a), rad * math.sin(a)))
    return out


def _draw_mask(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """An L-mode mask (255 inside the shape) with random position, scale and rotation."""
    s = size * _SUPERSAMPLE
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    r = s * rng.uniform(0.2, 0.34)
    cx, cy = (rng.uniform(r, s - r) for _ in range(2))  # the whole shape stays inside the image
    angle = rng.uniform(0, 2 * math.pi)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ri = r * 0.55
        draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    elif shape == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ox, oy = cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle)
        ri = r * 0.85
        draw.ellipse((ox - ri, oy - ri, ox + ri, oy + ri), fill=0)
    else:
        if shape == "square":
            local = [(r * 0.8 * x, r * 0.8 * y) for x, y in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        elif shape == "triangle":
            local = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        elif shape == "star":
            local = _star(r)
        elif shape == "cross":
            w = 0.3 * r
            local = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                     (-r, -w), (-w, -w)]
        elif shape == "arrow":
            local = [(-r, -0.2 * r), (0.15 * r, -0.2 * r), (0.15 * r, -0.6 * r), (r, 0), (0.15 * r, 0.6 * r),
                     (0.15 * r, 0.2 * r), (-r, 0.2 * r)]
        else:  # pragma: no cover - SHAPES and this function are kept in sync
            raise ValueError(shape)
        draw.polygon(_rotate(local, angle, cx, cy), fill=255)
    return mask.reduce(_SUPERSAMPLE)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A muted random tint, low-frequency blotches and per-pixel noise (float32 HxWx3)."""
    base = rng.uniform(60, 170) + rng.uniform(-25, 25, size=3)
    coarse = rng.normal(0, 28, size=(6, 6, 3)).astype(np.float32)
    blotches = np.asarray(
        Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR),
        dtype=np.float32) - 128
    grain = rng.normal(0, 14, size=(size, size, 3))
    return (base + blotches + grain).astype(np.float32)


def render_image(shape: str, colour: str | None, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image: ``shape`` in ``colour`` (random palette colour when None) on a textured background."""
    if colour is None:
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
    rgb = np.asarray(COLOURS[colour], dtype=np.float32) + rng.uniform(-18, 18, size=3)
    img = _background(size, rng)
    alpha = np.asarray(_draw_mask(shape, size, rng), dtype=np.float32)[..., None] / 255.0
    img = paint(img, alpha, rgb, rng)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def paint(img: np.ndarray, alpha: np.ndarray, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Composite a shape of colour `rgb` through `alpha` (H, W, 1); the shape is textured too, not a flat fill."""
    shade = rng.normal(0, 8, size=(*alpha.shape[:2], 1))
    return img * (1 - alpha) + (rgb + shade) * alpha


def _looks_like_demo_tree(out: Path) -> bool:
    for entry in out.iterdir():
        if not entry.is_dir():
            return False
        if any(not f.is_file() or f.suffix != ".jpg" for f in entry.iterdir()):
            return False
    return True


def prepare_out(cfg: DemoDataConfig, min_size: int, looks_like_ours, what: str = "demo-data") -> Path:
    """Check --per-class / --size, and empty OUT (only a tree `looks_like_ours` says we wrote, with --overwrite)."""
    if cfg.per_class < 1:
        raise UserError(f"--per-class {cfg.per_class}: must be at least 1")
    if cfg.size < min_size:
        raise UserError(f"--size {cfg.size}: must be at least {min_size} pixels for {what}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give demo-data a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise UserError(f"{out} is not empty; choose a new folder or pass --overwrite")
        if not looks_like_ours(out):
            raise UserError(f"{out} holds files that {what} did not write; refusing to delete it, "
                            f"choose a new folder")
        shutil.rmtree(out)
    return out


def generate(cfg: DemoDataConfig) -> dict[str, int]:
    """Write cfg.out/<class>/<class>_<index>.jpg and return {class: count}."""
    specs = class_specs(cfg.classes, cfg.label_set)
    out = prepare_out(cfg, 8, _looks_like_demo_tree)
    counts = {}
    set_id = LABEL_SETS.index(cfg.label_set)
    for name, shape, colour in specs:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        class_id = zlib.crc32(name.encode())
        for i in range(cfg.per_class):
            rng = np.random.default_rng([cfg.seed, set_id, class_id, i])
            image = render_image(shape, colour, cfg.size, rng)
            image.save(folder / f"{name}_{i:05d}.jpg", format="JPEG", quality=cfg.quality)
        counts[name] = cfg.per_class
    return counts

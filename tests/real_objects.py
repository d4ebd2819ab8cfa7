"""Test images of real objects, made here from photographs that ship inside scikit-image's wheel (no download).

Why: the shape demo (data_prep.demo_multi) draws flat polygons; a user's multi-label data are photographs
of objects. Each class is one photographed object (the astronaut, the cat, the coffee cup, the rocket, ...),
and every instance of it is a fresh random view: a crop of 70-100% of the object's box, a flip, a small
rotation, brightness/contrast/colour jitter, pasted at a random size onto a crop of a real texture
photograph (grass, gravel, brick).

* `write_multi(out, n, seed)`: 2-4 distinct objects per 64 px image, small (18-28 px), one per quadrant,
  written as OUT/images/*.jpg + OUT/labels.jsonl ({"path", "labels"}) + OUT/classes.txt, the manifest
  `python -m data_prep shard` reads.
* `write_single(out, per_class, seed)`: one object per image, large (38-56 px) and anywhere: another
  scale and position than in `write_multi`; an ImageFolder tree OUT/<class>/*.jpg.
Every image is a pure function of (seed, index).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

SIZE = 64
# class name -> (skimage.data loader, object box (left, top, right, bottom) in the photograph, or None: all)
OBJECTS = {
    "astronaut": ("astronaut", (140, 0, 370, 230)),
    "cat": ("chelsea", (120, 20, 360, 280)),
    "coffee": ("coffee", (140, 30, 480, 380)),
    "rocket": ("rocket", (250, 0, 400, 427)),
    "cameraman": ("camera", (120, 40, 360, 400)),
    "coins": ("coins", None),
    "horse": ("horse", None),
    "moon": ("moon", (40, 40, 470, 470)),
    "clock": ("clock", (20, 0, 300, 280)),
    "retina": ("retina", (100, 100, 1311, 1311)),
}
CLASSES = list(OBJECTS)
BACKGROUNDS = ("grass", "gravel", "brick")


@lru_cache(maxsize=None)
def _photo(loader: str) -> Image.Image:
    import skimage.data

    a = getattr(skimage.data, loader)()
    if a.dtype == bool:  # the horse: a black silhouette on white
        a = np.where(a, 40, 235).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return Image.fromarray(a[..., :3].astype(np.uint8), "RGB")


@lru_cache(maxsize=None)
def _object(name: str) -> Image.Image:
    loader, box = OBJECTS[name]
    photo = _photo(loader)
    return photo.crop(box) if box else photo


def _background(rng: np.random.Generator) -> Image.Image:
    photo = _photo(BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    side = int(rng.integers(96, 256))
    x, y = (int(rng.integers(0, photo.width - side)), int(rng.integers(0, photo.height - side)))
    tile = photo.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.BILINEAR)
    tint = rng.uniform(0.6, 1.1, 3)
    return Image.fromarray(np.clip(np.asarray(tile, np.float32) * tint, 0, 255).astype(np.uint8))


def view(name: str, side: int, rng: np.random.Generator) -> Image.Image:
    """One random view of object `name`, `side` px on its longer edge."""
    obj = _object(name)
    frac = rng.uniform(0.7, 1.0, 2)
    w, h = int(obj.width * frac[0]), int(obj.height * frac[1])
    x, y = int(rng.integers(0, obj.width - w + 1)), int(rng.integers(0, obj.height - h + 1))
    img = obj.crop((x, y, x + w, y + h))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR, expand=False, fillcolor=(128, 128, 128))
    scale = side / max(img.size)
    img = img.resize((max(4, round(img.width * scale)), max(4, round(img.height * scale))), Image.BILINEAR)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.75, 1.25))
    return ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))


def compose_multi(names: list[str], rng: np.random.Generator) -> Image.Image:
    """Objects 18-28 px, one per quadrant of a 64 px texture (none hides another)."""
    img = _background(rng)
    half = SIZE // 2
    for name, cell in zip(names, rng.choice(4, size=len(names), replace=False)):
        obj = view(name, int(rng.integers(18, 29)), rng)
        x0, y0 = int(cell % 2) * half, int(cell // 2) * half
        x = x0 + int(rng.integers(0, half - obj.width + 1))
        y = y0 + int(rng.integers(0, half - obj.height + 1))
        img.paste(obj, (x, y))
    return img


def compose_single(name: str, rng: np.random.Generator) -> Image.Image:
    """One object 38-56 px, anywhere in the 64 px image."""
    img = _background(rng)
    obj = view(name, int(rng.integers(38, 57)), rng)
    img.paste(obj, (int(rng.integers(0, SIZE - obj.width + 1)), int(rng.integers(0, SIZE - obj.height + 1))))
    return img


def write_multi(out: Path, n: int, seed: int) -> Path:
    """n multi-label images, their JSONL manifest and classes.txt under `out`; returns the manifest."""
    (out / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        rng = np.random.default_rng([seed, 0, i])
        k = int(rng.integers(2, 5))
        names = [CLASSES[c] for c in sorted(rng.choice(len(CLASSES), size=k, replace=False))]
        rel = f"images/multi_{i:05d}.jpg"
        compose_multi(names, rng).save(out / rel, quality=92)
        lines.append(json.dumps({"path": rel, "labels": names}))
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    (out / "labels.jsonl").write_text("".join(f"{line}\n" for line in lines))
    return out / "labels.jsonl"


def write_single(out: Path, per_class: int, seed: int) -> Path:
    """An ImageFolder tree of single-object images, `per_class` per class."""
    for c, name in enumerate(CLASSES):
        (out / name).mkdir(parents=True)
        for i in range(per_class):
            compose_single(name, np.random.default_rng([seed, 1, c, i])).save(out / name / f"{i:05d}.jpg", quality=92)
    return out


# Near-duplicate tests and benchmarks/near_dup_quality.py: natural photographs only (no drawings: a
# perceptual hash behaves differently on flat shapes), and the alterations a copy of an evaluation image
# picks up on the web.
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "moon", "rocket",
          "clock", "hubble_deep_field", "immunohistochemistry", "retina", "cell", "page", "text")


def distinct_photos(tiles: int = 3, names=PHOTOS) -> list[tuple[str, Image.Image]]:
    """Each photograph whole, then its tiles x tiles non-overlapping tiles: distinct natural images (a tile
    shows another part of the scene, at another scale)."""
    out = []
    for name in names:
        photo = _photo(name)
        out.append((name, photo))
        w, h = photo.size
        for row in range(tiles):
            for col in range(tiles):
                box = (col * w // tiles, row * h // tiles, (col + 1) * w // tiles, (row + 1) * h // tiles)
                out.append((f"{name}-tile{row}{col}", photo.crop(box)))
    return out


def _crop(image: Image.Image, fraction: float) -> Image.Image:
    w, h = image.size
    dx, dy = int(w * fraction), int(h * fraction)
    return image.crop((dx, dy, w - dx, h - dy))


def _scale(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((max(8, round(image.width * factor)), max(8, round(image.height * factor))),
                        Image.Resampling.BICUBIC)


# alteration -> (image -> altered image, JPEG quality of the copy)
ALTERATIONS = {
    "reencoded_q50": (lambda im: im, 50),
    "resized_half": (lambda im: _scale(im, 0.5), 90),
    "cropped_2pct": (lambda im: _crop(im, 0.02), 90),
    "cropped_5pct": (lambda im: _crop(im, 0.05), 90),
    "brightened_25pct": (lambda im: ImageEnhance.Brightness(im).enhance(1.25), 90),
    "all_four": (lambda im: ImageEnhance.Brightness(_crop(_scale(im, 0.75), 0.03)).enhance(1.15), 70),
}


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    import io

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def altered_copy(image: Image.Image, alteration: str) -> bytes:
    change, quality = ALTERATIONS[alteration]
    return jpeg_bytes(change(image), quality)

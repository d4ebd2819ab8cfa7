"""Generated inputs for the data_prep tests: ordinary images plus every broken/odd file the issue lists.

`make_tricky_tree` returns the tree and the exact expectations (which files are written, with which
class, and which are rejected for which reason), so the tests compare against facts, not snapshots.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


def _rgb(seed: int, width: int = 48, height: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(1, 1, 3))
    noise = rng.integers(-40, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb_png(side: int = 40_000) -> bytes:
    """A tiny PNG whose header claims side x side pixels (1.6 G): must be rejected from the header alone."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    data = zlib.compress(b"\x00" * (side + 1) * 8)  # a few rows of zeros
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def exif_rotated_jpeg(seed: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    return encode(_rgb(seed, 60, 30), "JPEG", quality=90, exif=exif.tobytes())


@dataclass
class Tree:
    root: Path
    classes: list[str]
    written: dict[str, str] = field(default_factory=dict)     # id -> class of every file that must be written
    rejected: dict[str, str] = field(default_factory=dict)    # id -> reason
    duplicates: dict[str, str] = field(default_factory=dict)  # id -> id of the kept copy (--dedup)


def make_tricky_tree(root: Path, per_class: int = 6) -> Tree:
    """SRC/<class>/... with normal images, odd names, odd modes and broken files."""
    classes = ["cat", "dog", "ünï bird"]
    tree = Tree(root, classes)

    def put(rel: str, data: bytes, outcome: str | None = None):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if outcome is None:
            tree.written[rel] = rel.split("/", 1)[0]
        else:
            tree.rejected[rel] = outcome

    seed = 0
    for name in classes:
        for i in range(per_class):
            seed += 1
            put(f"{name}/img_{i:03d}.jpg", encode(_rgb(seed), "JPEG", quality=90))
    good = encode(_rgb(999, 640, 480), "JPEG", quality=85)  # big enough to be resized
    put("cat/with space.jpg", good)
    put("cat/several.dots.v2.jpeg", encode(_rgb(1001), "JPEG"))
    put("cat/UPPER CASE.JPG", encode(_rgb(1002), "JPEG"))
    put("cat/ünïcødé-名前.jpg", encode(_rgb(1003), "JPEG"))
    put("cat/cmyk.jpg", encode(_rgb(1004).convert("CMYK"), "JPEG"))
    put("cat/rotated.jpg", exif_rotated_jpeg(1005))
    sixteen = (np.arange(40 * 48, dtype=np.uint32).reshape(40, 48) * 31 % 65535).astype(np.uint16)
    put("dog/sixteen-bit.png", encode(Image.fromarray(sixteen), "PNG"))
    put("dog/palette.png", encode(_rgb(1006).convert("P"), "PNG"))
    put("dog/rgba.PNG", encode(_rgb(1007).convert("RGBA"), "PNG"))
    put("dog/la.png", encode(_rgb(1008).convert("LA"), "PNG"))
    put("dog/nested/deeper/inner.webp", encode(_rgb(1009), "WEBP", quality=80))
    put("dog/grey.bmp", encode(_rgb(1010).convert("L"), "BMP"))
    put("dog/corrupt-pixels.png", corrupt_pixels_png(1012), "unreadable")  # fails only in the full decode
    # broken files
    put("cat/empty.jpg", b"", "unreadable")
    put("cat/truncated.jpg", good[: len(good) // 2], "truncated")
    put("dog/truncated.png", encode(_rgb(1011).convert("RGBA"), "PNG")[:300], "truncated")
    put("dog/text.jpg", b"this is plain text, not a JPEG\n" * 4, "not_an_image")
    put("ünï bird/bomb.png", decompression_bomb_png(), "too_many_pixels")
    put("cat/.DS_Store", b"\x00\x00\x00\x01Bud1", "non_image_file")
    put("dog/notes.txt", b"some notes", "non_image_file")
    put("README.txt", b"top-level file, in no class", "no_class")
    # an exact copy of a kept file: written twice without --dedup, once with it
    put("ünï bird/copy-of-cat.jpg", good)
    tree.duplicates["ünï bird/copy-of-cat.jpg"] = "cat/with space.jpg"
    return tree


def make_jpeg_tree(root: Path, classes: int, per_class: int, width: int = 64, height: int = 48) -> dict[str, str]:
    """Plain JPEG class folders; returns id -> class."""
    out = {}
    for c in range(classes):
        for i in range(per_class):
            rel = f"class_{c}/img_{i:04d}.jpg"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(_rgb(c * 100_000 + i, width, height), "JPEG", quality=90))
            out[rel] = f"class_{c}"
    return out


def corrupt_pixels_png(seed: int) -> bytes:
    """A PNG whose chunk structure and CRCs are intact (the scan passes it) but whose pixel data is garbage:
    only the full decode in the shard task finds out."""
    good = encode(_rgb(seed, 40, 40), "PNG")
    ihdr = good[8:33]  # signature is 8 bytes, IHDR chunk 25
    junk = b"\x78\x9c" + bytes(range(200))
    return good[:8] + ihdr + _png_chunk(b"IDAT", junk) + good[-12:]

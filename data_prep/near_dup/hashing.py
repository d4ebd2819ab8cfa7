"""A 64-bit perceptual hash of an image's bytes: the same picture re-encoded, resized, slightly cropped or
brightened gets a hash a few bits away; unrelated photographs differ in about half of the 64 bits.

The hash is ``imagehash.phash`` (DCT of a 32x32 grey image, the 8x8 lowest frequencies against their
median; https://www.hackerfactor.com/blog/index.php?/archives/432-Looks-Like-It.html) -- a kept library,
not our own. What we add is the decode in front of it: the same bomb guard as the scan, EXIF orientation
applied (the shard holds the upright image), every mode to RGB as the shard writer does, and a JPEG decoded
at a reduced DCT scale (``draft``) of at least 128 px, since phash shrinks to 32 px anyway: a full decode
would cost 5-20x more for the same hash. A pure function of the bytes, so shard placement stays a pure
function of the inputs.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from data_prep.images import ImageRejected, _open, classify_error, to_rgb

HASH_NAME = "imagehash-4.3-phash64-draft128"  # changes when the hash would: part of every cache key
DRAFT_SIDE = 128                               # smallest side a JPEG is decoded at before the hash
NEAR_DISTANCE = 10                             # default --near-distance (docs/data.md: the measurement)


def image_hash(image: Image.Image) -> int:
    """phash of a decoded image as an unsigned 64-bit int (bit i of imagehash's 8x8 boolean array, row-major,
    first bit most significant)."""
    import imagehash

    bits = imagehash.phash(image).hash.flatten()
    return int.from_bytes(np.packbits(bits.astype(np.uint8)).tobytes(), "big")


def bytes_hash(data: bytes, max_pixels: int) -> int:
    """The perceptual hash of an image file's bytes; raises ImageRejected when they do not decode."""
    try:
        image = _open(data, max_pixels)
        if image.format == "JPEG":
            image.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))  # libjpeg's DCT scaling: exact, deterministic
        image.load()
        if image.getexif().get(0x0112, 1) not in (1, None):
            image = ImageOps.exif_transpose(image)
        return image_hash(to_rgb(image))
    except Exception as err:  # noqa: BLE001 - decoder errors are properties of the file
        raise classify_error(err) from None


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of two uint64 arrays (broadcast)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


__all__ = ["HASH_NAME", "NEAR_DISTANCE", "ImageRejected", "bytes_hash", "hamming", "image_hash"]

"""Per-image work: the cheap scan that decides whether a file is usable, and the decode/resize/encode step.

Both are pure functions of the file's bytes and the options (same bytes in, same result out), which is
what makes shards reproducible wherever and however often a task runs.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from core.images import SUPPORTED_FORMATS, jpeg_ends_at_eoi, open_image, strip_jpeg_metadata

# A truncated file must be rejected, never padded with grey (Pillow's default is already False; pin it).
ImageFile.LOAD_TRUNCATED_IMAGES = False

_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_JPEG_END = b"\xff\xd9"
PARQUET_ROW = -2  # InputFile.size of a parquet image: its offset is a row index, not a byte offset
MAX_BYTES = 64 << 20  # default --max-bytes: a sample's bytes above this are rejected before they are read
MAX_ROW_GROUP_BYTES = 512 << 20  # default --max-row-group-bytes (parquet, from the file's metadata)


@dataclass(frozen=True)
class ImageOptions:
    """Options that change the bytes of a sample (they are part of the job fingerprint)."""

    max_size: int = 256        # shorter side at most this; 0 = keep
    max_aspect: float = 4.0    # longer side at most max_size * max_aspect
    quality: int = 90
    max_pixels: int = 89_478_485
    max_bytes: int = MAX_BYTES       # bytes of one input (file, member, object, parquet cell)
    max_row_group_bytes: int = MAX_ROW_GROUP_BYTES  # parquet: uncompressed image column of one row group
    strip_metadata: bool = False     # drop EXIF/XMP/IPTC/comments from passed-through JPEGs too

    def fingerprint_options(self) -> dict:
        """The options as the job fingerprint sees them: the ones added later only when not at their default,
        so an OUT written before they existed is still recognised as the same job."""
        out = asdict(self)
        for name, default in (("max_bytes", MAX_BYTES), ("max_row_group_bytes", MAX_ROW_GROUP_BYTES),
                              ("strip_metadata", False)):
            if out[name] == default:
                del out[name]
        return out


@dataclass(frozen=True)
class ScanResult:
    reason: str | None     # None = usable; else a reject reason
    detail: str
    width: int = 0
    height: int = 0
    sha1: str = ""


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def classify_error(err: BaseException) -> ImageRejected:
    """Map a Pillow/IO exception to one of the reject reasons."""
    if isinstance(err, ImageRejected):
        return err
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, Image.DecompressionBombError):
        return ImageRejected("too_many_pixels", text)
    if isinstance(err, UnidentifiedImageError):
        return ImageRejected("not_an_image", f"not one of the supported formats ({', '.join(SUPPORTED_FORMATS)})")
    if isinstance(err, EOFError) or "truncated" in str(err).lower():
        return ImageRejected("truncated", text)
    return ImageRejected("unreadable", text)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open the header only, with the decompression-bomb guard at max_pixels (nothing is decoded yet)."""
    Image.MAX_IMAGE_PIXELS = max_pixels  # process-wide; our workers only run this code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we reject above max_pixels ourselves
        image = open_image(data)  # only SUPPORTED_FORMATS: never EPS (Ghostscript) or another exotic parser
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected("too_many_pixels", f"{width}x{height} = {width * height:,} pixels > {max_pixels:,}")
    return image


def scan(data: bytes, max_pixels: int) -> ScanResult:
    """Decide from the bytes whether an image is usable, without a full decode where possible.

    Catches empty files, non-images, bombs and truncation (PNG: chunk walk with CRCs; JPEG: end-of-image
    marker, and a 1/8-scale decode only when that marker is missing; other formats: a full decode).
    """
    sha1 = hashlib.sha1(data).hexdigest()
    if not data:
        return ScanResult("unreadable", "empty file (0 bytes)", sha1=sha1)
    try:
        image = _open(data, max_pixels)
        width, height = image.size
        fmt = image.format
        if fmt == "PNG":
            image.verify()
        elif fmt == "JPEG":
            if not data.rstrip(b"\x00\r\n ").endswith(_JPEG_END):
                image.draft("RGB", (1, 1))  # smallest DCT scale: reads every byte, decodes 1/64 of the pixels
                image.load()
        else:
            image.load()
    except Exception as err:  # noqa: BLE001 - every decoder error is a property of the file, not a bug
        rejected = classify_error(err)
        return ScanResult(rejected.reason, rejected.detail, sha1=sha1)
    return ScanResult(None, fmt or "", width, height, sha1)


def target_size(width: int, height: int, opts: ImageOptions) -> tuple[int, int]:
    """Shorter side <= max_size, longer side <= max_size * max_aspect, never upscaled."""
    if opts.max_size <= 0:
        return width, height
    scale = min(1.0, opts.max_size / min(width, height), opts.max_size * opts.max_aspect / max(width, height))
    if scale >= 1.0:
        return width, height
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def to_rgb(image: Image.Image) -> Image.Image:
    """Every Pillow mode to 8-bit RGB: 16-bit greys are scaled (not clipped), alpha is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(image)
        if mode != "F" and (mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255):
            values = values.astype(np.uint32) >> 8  # 16-bit range -> 8-bit; Pillow's convert would clip at 255
        grey = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _orientation(image: Image.Image) -> int:
    """EXIF orientation 1..8; anything missing, unreadable or out of range counts as upright (1)."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels unusable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def encode(data: bytes, opts: ImageOptions) -> tuple[bytes, int, int]:
    """(JPEG bytes, original width, original height) for one source image; raises ImageRejected.

    JPEGs already within size, upright (no EXIF rotation) and RGB, that end at their end-of-image marker
    (nothing appended), keep their original bytes once a 1/8-scale decode shows their data is intact
    (``strip_metadata``: minus their EXIF/XMP/IPTC/comment segments). Others are
    decoded (JPEGs with libjpeg's DCT downscaling via draft(), which is exact and deterministic),
    EXIF-rotated, converted to RGB, resized with a bicubic filter (reduce() first for large factors) and
    encoded once at opts.quality with fixed settings.
    """
    try:
        image = _open(data, opts.max_pixels)
        width, height = image.size
        new_w, new_h = target_size(width, height, opts)
        if image.format == "JPEG":
            orientation = _orientation(image)  # JPEG EXIF sits in APP1, read at open: no decode needed
            if image.mode == "RGB" and orientation == 1 and (new_w, new_h) == (width, height) \
                    and jpeg_ends_at_eoi(data):
                # The scan only checked the end marker: corrupt entropy data must still be a reject, not
                # copied into a shard. A 1/8-scale decode reads every byte at 1/64 of the pixel cost.
                image.draft("RGB", (1, 1))
                image.load()
                return (strip_jpeg_metadata(data) if opts.strip_metadata else data), width, height
            if (new_w, new_h) != (width, height):
                image.draft("RGB", (new_w, new_h))  # stored orientation: the scale factor does not depend on it
            image.load()
        else:
            image.load()  # first: PNG's getexif() would load, and _orientation must not swallow decode errors
            orientation = _orientation(image)
        if orientation != 1:  # exif_transpose copies the image even when there is nothing to do
            image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
        oriented = (new_w, new_h) if orientation in (1, 2, 3, 4) else (new_h, new_w)
        if image.size != oriented:
            image = image.resize(oriented, Image.Resampling.BICUBIC, reducing_gap=3.0)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=opts.quality, subsampling="4:2:0", optimize=False,
                   progressive=False)
        return out.getvalue(), width, height
    except Exception as err:  # noqa: BLE001 - decoder errors are properties of the file
        raise classify_error(err) from None

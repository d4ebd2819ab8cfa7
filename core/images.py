"""The image formats the pipeline decodes, and the JPEG marker walk; one definition for the scan (data_prep)
and for training (pipeline.data.shards).

Why a fixed list: ``Image.open`` without ``formats=`` tries every Pillow plugin, so any file named ``.jpg``
can reach the EPS plugin (which runs Ghostscript, an external program) or the JPEG 2000, PSD and FITS
parsers. Only the formats data_prep documents as inputs (its image extensions) are opened; anything else is
"not an image". None of these plugins starts another program.
"""
from __future__ import annotations

import io

# Pillow format names of data_prep's image extensions (.jpg .jpeg .png .ppm .pgm .bmp .tif .tiff .webp .gif).
# PPM covers .pgm/.pbm. Never add EPS (Ghostscript), PDF or anything that calls out to a program.
SUPPORTED_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP", "GIF")
TRAINING_FORMATS = ("JPEG",)  # shards hold the JPEGs data_prep wrote, nothing else

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RST0..7: markers without a length field
# APPn / COM segments that --strip-metadata drops: APP1 (EXIF, XMP), APP13 (IPTC/Photoshop), other app data
# and comments. Kept: APP0 (JFIF), APP2 (ICC colour profile: the pixels mean other colours without it) and
# APP14 (Adobe: says how to turn the components into RGB).
_KEEP_APP = frozenset({0xE0, 0xE2, 0xEE})


def open_image(data: bytes, formats=SUPPORTED_FORMATS):
    """Pillow image of `data` (header only, nothing decoded yet), trying only `formats`."""
    from PIL import Image

    return Image.open(io.BytesIO(data), formats=list(formats))


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]] | None:
    """(marker, start, end) of every JPEG segment up to and including EOI, entropy-coded data included in the
    SOS segment that precedes it; None when the marker structure is broken or there is no EOI.

    Hand-written because neither Pillow nor libjpeg says where the image ends: bytes after EOI (an appended
    archive, a second file) are invisible to a decoder but would be copied into a shard by a pass-through.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != _SOI:
        return None
    out, pos = [(_SOI, 0, 2)], 2
    while pos < n:
        if data[pos] != 0xFF:
            return None
        while pos < n and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= n:
            return None
        marker, start = data[pos], pos - 1
        pos += 1
        if marker == _EOI:
            out.append((marker, start, pos))
            return out
        if marker in _STANDALONE:
            out.append((marker, start, pos))
            continue
        if pos + 2 > n:
            return None
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2 or pos + length > n:
            return None
        pos += length
        if marker == _SOS:  # entropy-coded data: runs to the next marker that is not stuffing (FF00) or RSTn
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return None
                following = data[pos + 1]
                if following == 0 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                    pos += 1 if following == 0xFF else 2
                    continue
                break
        out.append((marker, start, pos))
    return None


def jpeg_ends_at_eoi(data: bytes) -> bool:
    """True when `data` is one well-formed JPEG marker sequence whose EOI is its last two bytes."""
    segments = jpeg_segments(data)
    return segments is not None and segments[-1][2] == len(data)


def strip_jpeg_metadata(data: bytes) -> bytes:
    """`data` without its EXIF/XMP/IPTC/other APPn and COM segments (JFIF, ICC and Adobe kept); the pixels'
    bytes are untouched. `data` must pass jpeg_ends_at_eoi."""
    segments = jpeg_segments(data)
    if segments is None:
        raise ValueError("not a well-formed JPEG")
    keep = [data[s:e] for marker, s, e in segments
            if not ((0xE0 <= marker <= 0xEF and marker not in _KEEP_APP) or marker == 0xFE)]
    return b"".join(keep)

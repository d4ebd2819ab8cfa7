"""Recall and false matches of the near-duplicate hash (data_prep.near_dup) at every Hamming distance.

Images: scikit-image's shipped photographs (tests/real_objects.py PHOTOS; no download), each whole and as
3x3 non-overlapping tiles: distinct natural images, written as JPEG q90 -- the "evaluation set". Altered
copies of each (tests/real_objects.py ALTERATIONS: re-encoded at q50, resized to half, 5% cropped off every
edge, brightened 25%, and all of these at once, milder) are the near-duplicates that must be found.

Printed per distance d: recall per alteration (share of copies whose hash is within d of their original's)
and the false-match rate (share of pairs of *distinct* images within d: each such pair would wrongly remove a
training image). The baseline beside it is the hash of a full decode (no DCT-scaled JPEG decode), to show
the faster decode loses no recall. Last, the index: lookups per second of the multi-index against comparing
every query with every stored hash, on an ImageNet-1K-val-sized set of random hashes.

    .venv/bin/python benchmarks/near_dup_quality.py
    .venv/bin/python benchmarks/near_dup_quality.py --tiles 4 --max-distance 16
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.near_dup.hashing import NEAR_DISTANCE, bytes_hash, hamming, image_hash  # noqa: E402
from data_prep.near_dup.index import NearIndex  # noqa: E402
from tests.real_objects import ALTERATIONS, altered_copy, distinct_photos, jpeg_bytes  # noqa: E402


def _full_decode_hash(data: bytes) -> int:
    return image_hash(Image.open(io.BytesIO(data)).convert("RGB"))


def measure(tiles: int, max_distance: int) -> dict:
    images = distinct_photos(tiles)
    originals = [jpeg_bytes(im) for _name, im in images]
    whole = [data for (name, _im), data in zip(images, originals) if "-tile" not in name]
    copies = {kind: [altered_copy(im, kind) for _name, im in images] for kind in ALTERATIONS}
    result = {"images": len(images), "pairs": len(images) * (len(images) - 1) // 2}
    for label, hash_of in (("draft decode (used)", lambda b: bytes_hash(b, 1 << 30)),
                           ("full decode (baseline)", _full_decode_hash)):
        base = np.array([hash_of(b) for b in originals], np.uint64)
        start = time.perf_counter()  # speed: the whole photographs (300-1411 px), as large as real photos
        for _ in range(3):
            for data in whole:
                hash_of(data)
        seconds = (time.perf_counter() - start) / 3
        dist = {kind: hamming(base, np.array([hash_of(b) for b in data], np.uint64)) for kind, data in copies.items()}
        upper = np.triu_indices(len(base), 1)
        pairwise = hamming(base[:, None], base[None, :])[upper]
        rows = []
        for d in range(max_distance + 1):
            rows.append({"d": d, **{k: float((v <= d).mean()) for k, v in dist.items()},
                         "false_pairs": int((pairwise <= d).sum())})
        result[label] = {"rows": rows, "ms_per_image": 1000 * seconds / len(whole),
                         "closest_distinct": int(pairwise.min())}
    return result


def _balanced_hashes(rng, count: int) -> np.ndarray:
    """Random 64-bit hashes with exactly 32 bits set, as phash's median threshold makes them."""
    bits = np.argsort(rng.random((count, 64)), axis=1)[:, :32]
    words = np.zeros(count, np.uint64)
    for column in range(32):
        words |= np.uint64(1) << bits[:, column].astype(np.uint64)
    return words


def index_speed(stored: int, queries: int, max_distance: int) -> dict:
    """Lookups per second of the multi-index (data_prep.near_dup.index) against comparing every query with every
    stored hash (numpy, batched), on random balanced hashes: an eval set of `stored` images, `queries` training
    images. Both must find the same matches."""
    rng = np.random.default_rng(0)
    table, asked = _balanced_hashes(rng, stored), _balanced_hashes(rng, queries)
    asked[: queries // 10] = table[: queries // 10] ^ np.uint64(0b1111)  # a tenth are near copies (4 bits)
    start = time.perf_counter()
    rows, dist = NearIndex(table, max_distance).nearest(asked)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    brute = np.concatenate([hamming(asked[i:i + 256, None], table[None, :]).min(axis=1)
                            for i in range(0, queries, 256)])
    baseline = time.perf_counter() - start
    assert ((brute <= max_distance) == (rows >= 0)).all() and (dist[rows >= 0] == brute[rows >= 0]).all()
    return {"ours": queries / ours, "baseline": queries / baseline, "found": int((rows >= 0).sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", type=int, default=3, help="tiles per side of each photograph (default: 3)")
    parser.add_argument("--max-distance", type=int, default=14, help="largest distance printed (default: 14)")
    parser.add_argument("--index-size", type=int, default=50_000, help="eval hashes in the index speed test "
                                                                       "(default: 50000, ImageNet-1K val)")
    parser.add_argument("--queries", type=int, default=20_000, help="lookups in the index speed test "
                                                                    "(default: 20000)")
    args = parser.parse_args()
    result = measure(args.tiles, args.max_distance)
    print(f"{result['images']} distinct photographs and tiles, {result['pairs']} distinct pairs, "
          f"{len(ALTERATIONS)} altered copies of each")
    for label in ("draft decode (used)", "full decode (baseline)"):
        r = result[label]
        print(f"\n== {label}: {r['ms_per_image']:.2f} ms per whole photograph to hash; closest distinct pair "
              f"at distance {r['closest_distinct']}")
        print("d   " + "  ".join(f"{k:>16}" for k in ALTERATIONS) + "  false pairs (rate)")
        for row in r["rows"]:
            print(f"{row['d']:<3} " + "  ".join(f"{row[k]:>16.1%}" for k in ALTERATIONS)
                  + f"  {row['false_pairs']} ({row['false_pairs'] / result['pairs']:.4%})")
    ratio = result["full decode (baseline)"]["ms_per_image"] / result["draft decode (used)"]["ms_per_image"]
    print(f"\nhash time of the whole photographs: full decode / draft decode = {ratio:.2f}x")
    speed = index_speed(args.index_size, args.queries, NEAR_DISTANCE)
    print(f"\n== index: {args.queries} lookups in {args.index_size} random balanced hashes within {NEAR_DISTANCE} "
          f"bits ({speed['found']} found, the same as comparing with all)\nmulti-index {speed['ours']:,.0f} "
          f"lookups/s, compare-with-all {speed['baseline']:,.0f} lookups/s: {speed['ours'] / speed['baseline']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

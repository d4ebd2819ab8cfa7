"""Fuzz every source kind of data_prep with mutated valid inputs (issue 22): each case must end as samples and
named rejects, or a one-line source error, never a traceback, a hang or unbounded memory; a rerun of a case
gives byte-identical results.

    python benchmarks/fuzz_sources.py                      # 300 cases per kind, seed 0
    python benchmarks/fuzz_sources.py --cases 6 --seed 1000  # what tests/test_data_prep_hostile.py runs

Kinds: folder, tars, manifest (CSV and JSONL), openimages, webdataset, parquet. A case builds a small source from
its seed (some labels hostile: random JSON, deep, huge, objects, numbers, nulls, NULs, lone surrogates; some
images truncated or bit-flipped inside the container), then applies 0-3 mutations to its files (truncate, flip
bits or append to an image, a tar, a parquet file or a manifest; rename an image to random bytes),
then runs the listing (``list_partitioned``) and, for every listed input, the read, the scan and the encode of
the shard tasks, in process (no Ray: the tasks are plain functions). A case is run twice; the two outcome
digests (ids, reasons, sha256 of every encoded sample) must match.

Cases are drawn from a seeded ``random`` so any failing case replays from (kind, seed) alone; in the test suite
hypothesis draws the (kind, seed) pairs (derandomized, shrinking a failure to its smallest seed:
tests/test_data_prep_hostile.py), while this script runs the long plain loop that counts outcomes per kind. Hangs: SIGALRM per case. Memory: the process's peak
RSS is printed and must stay under --max-rss-mb.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import sys
import tarfile
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from core.errors import UserError  # noqa: E402
from data_prep.images import ImageOptions, ImageRejected, encode, scan  # noqa: E402
from data_prep.limits import Limits  # noqa: E402
from data_prep.sources.listing import list_partitioned  # noqa: E402
from data_prep.sources.read import read_bytes  # noqa: E402
from data_prep.spill import PARTITIONS, read_spill  # noqa: E402

KINDS = ("folder", "tars", "csv", "jsonl", "openimages", "webdataset", "parquet")
LIMITS = Limits(max_bytes=256 << 10, max_label_bytes=4096, max_labels=16, max_classes=64)
OPTIONS = ImageOptions(max_size=32, max_pixels=1 << 20, max_bytes=256 << 10)
CLASSES = ("cat", "dog", "owl")


class Hang(Exception):
    pass


def _image(rng: random.Random) -> bytes:
    size = (rng.randint(8, 40), rng.randint(8, 40))
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    image.save(out, format=rng.choice(["JPEG", "PNG"]))
    return out.getvalue()


def _hostile_label(rng: random.Random):
    """A random JSON label value: valid names, or the shapes an attacker sends."""
    return rng.choice([
        lambda: rng.choice(CLASSES), lambda: rng.randrange(-5, 10), lambda: None, lambda: True, lambda: 1.5,
        lambda: {"name": "cat"}, lambda: [rng.choice(CLASSES)] * rng.randint(0, 40),
        lambda: json.loads("[" * 200 + "]" * 200), lambda: "x" * rng.randint(4000, 9000),
        lambda: "a\u0000b", lambda: "\ud800", lambda: "", lambda: [[["cat"]]],
    ])()


def _random_name(rng: random.Random) -> bytes:
    return bytes(rng.choice([rng.randrange(1, 256), ord("a")]) for _ in range(rng.randint(1, 12))).replace(b"/", b"_")


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    how = rng.choice(["truncate", "flip", "append", "zero"])
    if how == "truncate":
        return data[:rng.randrange(len(data))]
    if how == "append":
        return data + rng.randbytes(rng.randint(1, 4096))  # from the seed: a case replays exactly
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] = 0 if how == "zero" else out[i] ^ (1 << rng.randrange(8))
    return bytes(out)


def _samples(rng: random.Random, n: int) -> list[tuple[str, object, bytes]]:
    """(name, label, image bytes): mostly valid; some labels hostile, some images truncated or bit-flipped
    (inside the container, so packed kinds are fuzzed per row, not only as a damaged file)."""
    out = []
    for i in range(n):
        label = rng.choice(CLASSES) if rng.random() > 0.3 else _hostile_label(rng)
        data = _image(rng)
        out.append((f"s{i:03d}", label, _mutate_bytes(rng, data) if rng.random() < 0.3 else data))
    return out


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            archive.addfile(info, io.BytesIO(data))


def _text_label(label) -> str:
    return label if isinstance(label, str) else json.dumps(label)


def build(kind: str, rng: random.Random, root: Path) -> dict:
    """A valid-ish source of `kind` under root; returns the list_partitioned arguments and the mutable files."""
    samples = _samples(rng, rng.randint(3, 8))
    root.mkdir(parents=True)
    images = root / "images"
    args: dict = {"kind": kind}
    if kind in ("folder", "csv", "jsonl", "openimages"):
        for name, label, data in samples:
            folder = images / (label if isinstance(label, str) and label in CLASSES else "cat") if kind == "folder" \
                else images
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.jpg").write_bytes(data)
    if kind == "folder":
        args["src"] = images
    elif kind == "tars":
        for cls in CLASSES:
            _tar(root / f"{cls}.tar", [(f"{n}.jpg", d) for n, label, d in samples if label == cls] or
                 [("x.jpg", _image(rng))])
        args["src"] = root
    elif kind == "csv":
        with open(root / "m.csv", "w", newline="", encoding="utf-8", errors="surrogatepass") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            for name, label, _d in samples:
                writer.writerow([f"images/{name}.jpg", _text_label(label)])
        args["src"] = root / "m.csv"
    elif kind == "jsonl":
        lines = [json.dumps({"path": f"images/{n}.jpg", "label": label}) for n, label, _d in samples]
        (root / "m.jsonl").write_text("\n".join(lines) + "\n")
        args["src"] = root / "m.jsonl"
    elif kind == "openimages":
        with open(root / "labels.csv", "w", newline="", encoding="utf-8", errors="surrogatepass") as handle:
            writer = csv.writer(handle)
            writer.writerow(["ImageID", "Source", "LabelName", "Confidence"])
            for name, label, _d in samples:
                writer.writerow([name, "x", _text_label(label), rng.choice(["1", "0", "1.0", "yes"])])
        args.update(src=root / "labels.csv", images=images)
    elif kind == "webdataset":
        members = []
        for name, label, data in samples:
            members += [(f"{name}.jpg", data), (f"{name}.json", json.dumps({"label": label}).encode())]
        _tar(root / "shard-000.tar", members)
        args.update(src=root, label_field="label")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"jpg": [d for _n, _l, d in samples],  # a parquet string is valid UTF-8: JSON text
                          "label": [label if label in CLASSES else json.dumps(label) for _n, label, _d in samples]})
        pq.write_table(table, root / "part-0.parquet", row_group_size=rng.randint(1, 4))
        args["src"] = root
    return args


def mutate(rng: random.Random, root: Path) -> list[str]:
    """0-3 mutations of the files under root: bytes of a file (an image, a tar, a parquet file, a manifest), or
    a file's name (random bytes)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    done = []
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        target = rng.choice(files)
        if rng.random() < 0.2 and target.suffix == ".jpg":
            new = os.fsencode(target.parent) + b"/" + _random_name(rng) + b".jpg"
            try:
                os.rename(target, new)
            except OSError:
                continue
            files = sorted(p for p in root.rglob("*") if p.is_file())
            done.append("rename")
        else:
            target.write_bytes(_mutate_bytes(rng, target.read_bytes()))
            done.append(f"bytes:{target.suffix}")
    return done


def run_case(args: dict, work: Path) -> tuple[str, Counter]:
    """(digest of every outcome, outcome counts) of one source: listing, then read + scan + encode per input."""
    extra = {k: args[k] for k in ("images", "label_field") if k in args}
    kind = args["kind"] if args["kind"] in ("folder", "tars", "webdataset", "parquet", "openimages") else "manifest"
    try:
        parts = list_partitioned(args["src"], kind, None, 0, work, limits=LIMITS, **extra)
    except UserError as err:
        if os.environ.get("FUZZ_VERBOSE"):
            print(f"source error: {err}", file=sys.stderr)
        return hashlib.sha256(str(err).encode()).hexdigest(), Counter({"source_error": 1})
    outcomes, counts = [], Counter()
    for reject in read_spill(parts.rejects_path):
        outcomes.append((reject["source"], reject["reason"]))
        counts[f"reject:{reject['reason']}"] += 1
    for part in range(PARTITIONS):
        for _key, file_id, _cls, path, offset, size, _labels in read_spill(parts.inputs_path(part)):
            try:
                data = read_bytes(path, offset, size, OPTIONS.max_bytes, OPTIONS.max_row_group_bytes)
                result = scan(data, OPTIONS.max_pixels)
                if result.reason is not None:
                    raise ImageRejected(result.reason, result.detail)
                jpg = encode(data, OPTIONS)[0]
                outcomes.append((file_id, hashlib.sha256(jpg).hexdigest()))
                counts["sample"] += 1
            except ImageRejected as err:
                outcomes.append((file_id, err.reason))
                counts[f"reject:{err.reason}"] += 1
    return hashlib.sha256(json.dumps(sorted(outcomes)).encode()).hexdigest(), counts


def fuzz(kind: str, seed: int, tmp: Path, timeout_s: int) -> tuple[str, Counter]:
    """One case: 'ok', 'crash', 'hang' or 'nondeterministic', and its outcome counts."""
    rng = random.Random(f"{kind}:{seed}")
    root = tmp / f"{kind}-{seed}"
    signal.alarm(timeout_s)
    try:
        args = build(kind, rng, root / "src")
        mutate(rng, root / "src")
        first, counts = run_case(args, root / "work1")
        second, _ = run_case(args, root / "work2")
        status = "ok" if first == second else "nondeterministic"
    except Hang:
        status, counts = "hang", Counter()
    except Exception:  # noqa: BLE001 - anything escaping the pipeline is what this harness looks for
        print(f"CRASH {kind} seed {seed}:\n{traceback.format_exc()}", file=sys.stderr)
        status, counts = "crash", Counter()
    finally:
        signal.alarm(0)
        shutil.rmtree(root, ignore_errors=True)
    return status, counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=300, help="cases per source kind (default: 300)")
    parser.add_argument("--seed", type=int, default=0, help="first case seed (default: 0)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--timeout", type=int, default=30, help="seconds per case before it counts as a hang")
    parser.add_argument("--max-rss-mb", type=int, default=2048, help="peak RSS above this fails the run")
    args = parser.parse_args(argv)

    def on_alarm(_signum, _frame):
        raise Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    start, failures = time.perf_counter(), 0
    totals: Counter = Counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-sources-") as tmp:
        for kind in args.kinds.split(","):
            statuses, outcomes = Counter(), Counter()
            kind_start = time.perf_counter()
            for seed in range(args.seed, args.seed + args.cases):
                status, counts = fuzz(kind, seed, Path(tmp), args.timeout)
                statuses[status] += 1
                outcomes.update(counts)
            failures += statuses["crash"] + statuses["hang"] + statuses["nondeterministic"]
            totals.update(statuses)
            shown = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
            print(f"{kind:<11} cases {args.cases}: ok {statuses['ok']}, crashes {statuses['crash']}, hangs "
                  f"{statuses['hang']}, nondeterministic {statuses['nondeterministic']}; "
                  f"{time.perf_counter() - kind_start:.1f} s; outcomes: {shown}", flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"total: {sum(totals.values())} cases, {totals['crash']} crashes, {totals['hang']} hangs, "
          f"{totals['nondeterministic']} nondeterministic, peak RSS {peak_mb:.0f} MB, "
          f"{time.perf_counter() - start:.1f} s")
    return 1 if failures or peak_mb > args.max_rss_mb else 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line of data_prep: ``shard``, ``dedup``, ``verify`` and ``demo-data`` (``python -m data_prep --help``)."""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from core.errors import UserError, cli_main
from core.storage import as_location

from data_prep.near_dup.hashing import NEAR_DISTANCE

_EPILOG = textwrap.dedent("""\
    examples:
      python -m data_prep demo-data runs/demo/images --classes 6 --per-class 200 --size 64 --seed 0
      python -m data_prep shard runs/demo/images runs/demo/shards --split train --shard-size 64 --seed 0
      python -m data_prep verify runs/demo/shards
    """)


def _bounded(kind, low, high=None, what: str = ""):
    """An argparse type: `kind(text)` within [low, high], else a one-line usage error naming the value."""
    def parse(text: str):
        value = kind(text)
        if value < low or (high is not None and value > high):
            limit = f"in {low}..{high}" if high is not None else (f"at least {low}" if low else f"{low} or more")
            raise argparse.ArgumentTypeError(f"{text}: {what}must be {limit}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def _location(text: str):
    """An argparse type: a local Path, or an object-store URL kept as text (type=Path would turn s3://b/p
    into s3:/b/p)."""
    try:
        return as_location(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_location.__name__ = "location"
_positive_int = _bounded(int, 1)
_quality = _bounded(int, 1, 95, "JPEG quality ")


def _add_options(parser: argparse.ArgumentParser, rows: list[tuple]) -> None:
    """(flag, type, default, help) rows; type `bool` is an on/off flag. The help texts name the defaults."""
    for flag, kind, default, text in rows:
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=text)


# (flag, type, default, help): the options of `shard` and `demo-data` that are a plain value or flag.
_SHARD_OPTIONS = [
    ("--shard-size", _positive_int, 1000,
     "samples per shard; the last shard may be short, and so may a shard holding a file that only fails when "
     "fully decoded (exact lengths go to _info.json) (default: 1000)"),
    ("--seed", int, 0, "global shuffle seed: a sample's shard and position depend only on the input list and "
                       "this seed (default: 0)"),
    ("--max-size", _bounded(int, 0), 256, "downscale so the shorter side is at most this many pixels (never "
                                          "upscale); 0 keeps the size (default: 256)"),
    ("--max-aspect", _bounded(float, 1.0), 4.0,
     "also cap the longer side at max-size * this, so panoramas do not stay huge (default: 4.0)"),
    ("--quality", _quality, 90, "JPEG quality of re-encoded images; JPEGs already within size, upright and RGB "
                                "keep their original bytes (default: 90)"),
    ("--max-pixels", _positive_int, 89_478_485, "reject images with more pixels than this as 'too_many_pixels' "
                                                "(decompression bomb guard; default: Pillow's 89,478,485)"),
    ("--dedup", bool, False, "write exact duplicates (same source bytes) once; the others go to rejects.jsonl as "
                             "'duplicate' and are counted in _info.json"),
    ("--workers", _positive_int, None, "at most this many shard tasks at once (default: every CPU of the local "
                                       "machine or of the cluster)"),
]
_MiB = 1 << 20
# Limits on what one hostile input can make the job read or hold (data_prep/limits.py;
# docs/data.md, "Hostile input and limits").
_LIMIT_OPTIONS = [
    ("--max-bytes", _positive_int, 64 * _MiB, "reject an image file, tar member, object or parquet cell larger "
                                              "than this many bytes as 'too_large', judged from its size before "
                                              "it is read (default: 64 MiB)"),
    ("--max-label-bytes", _positive_int, 64 << 10, "reject a sample whose label (manifest row, .json/.cls/.txt "
                                                   "member, label name) is larger (default: 65536)"),
    ("--max-labels", _positive_int, 1024, "reject an image with more labels than this (default: 1024)"),
    ("--max-classes", _positive_int, 200_000, "stop when the source names more classes than this (default: "
                                              "200000)"),
    ("--max-row-group-bytes", _positive_int, 512 * _MiB,
     "parquet: reject the rows of a row group whose image column is larger uncompressed, judged from the file's "
     "metadata before anything is decompressed (default: 512 MiB)"),
    ("--strip-metadata", bool, False, "drop EXIF (GPS), XMP, IPTC and comments from JPEGs that keep their bytes "
                                      "(re-encoded ones never carry them; EXIF orientation is applied first)"),
]
_SHARD_FLAGS = [
    ("--overwrite", bool, False, "replace this split in OUT even if it was made from other inputs or options "
                                 "(other splits in OUT are kept)"),
    ("--no-progress", bool, False, "no progress bar (log lines only)"),
]
_DEMO_OPTIONS = [
    ("--classes", _positive_int, 6,
     "number of classes: 1..8 for 'shapes' and 'multi', 1..64 for 'shape-color' (default: 6)"),
    ("--per-class", _positive_int, 100, "images per class (default: 100)"),
    ("--size", _positive_int, 64, "image side in pixels (default: 64)"),
    ("--seed", int, 0, "random seed; same seed, same bytes (default: 0)"),
    ("--quality", _quality, 90, "JPEG quality (default: 90)"),
    ("--overwrite", bool, False, "replace an existing demo-data folder"),
]


# sub-command -> (help, description, epilog), as `--help` shows them.
_COMMANDS = {
    "shard": (
        "turn an image collection (ImageFolder tree, per-class tars, CSV/JSONL manifest, OpenImages labels, "
        "webdataset tars, parquet files) into shards",
        textwrap.dedent("""\
            Write OUT/{split}-000000.tar ... and OUT/_info.json (timm-readable) from SRC.

            SRC is one of
              * an ImageFolder tree SRC/<class>/.../<image>   (classes sorted as torchvision sorts them)
              * a folder of per-class archives SRC/<class>.tar (ImageNet-21K style; read in place, never extracted)
              * a manifest file SRC.csv or SRC.jsonl with columns/keys `path` and `label` (a class name), or
                `labels` for several per image (a JSON list; in CSV names separated by '|'); relative paths
                are relative to the manifest's folder.
              * an OpenImages annotation file SRC.csv (header ImageID,Source,LabelName,Confidence; only
                Confidence 1 is kept) with --images DIR holding <ImageID>.jpg.
              * webdataset .tar files (a folder, one file or a quoted pattern 'a/train-*.tar'; samples are
                members sharing a key, labels in .cls or the .json: --label-field, --label-map), e.g. our
                own shards to reshard them, or img2dataset / DataComp output.
              * parquet files with an image-bytes column (jpg/png/webp/image, or Hugging Face's image
                struct) and a label column (img2dataset, Hugging Face datasets).
            --source auto tells these six kinds apart (and asks for --source when unsure); --source
            folder|tars|manifest|openimages|webdataset|parquet forces one.
            Multi-label samples keep `cls` (the first label) and add `.labels` ("3,7,12") and json
            `labels`/`classes`.
            Files that cannot be used are listed in OUT/rejects.jsonl with a reason; nothing is dropped silently.
            Re-running the same command resumes: complete, verified shards are kept, the rest is redone.
            """),
        textwrap.dedent("""\
            example:
              python -m data_prep shard ~/imagenet21k ~/shards/in21k --split train --shard-size 1000 \\
                  --max-size 320 --quality 90 --dedup --seed 0 --ray-address auto
              AWS_ENDPOINT_URL=http://minio:9000 python -m data_prep shard s3://raw/in1k-train s3://shards/in1k
            """)),
    "dedup": (
        "report groups of near-duplicate images inside one source (perceptual hash), writing no shards",
        textwrap.dedent("""\
            List SRC as `shard` does (any source kind), hash every image (64-bit perceptual hash, Ray tasks) and
            print one JSON line per group of images within --near-distance bits of each other:
            {"group", "size", "ids", "distances"} (each member's distance to the group's first id). A summary
            line goes to stderr. Exact duplicates (same bytes) are removed while sharding with `shard --dedup`;
            near duplicates of evaluation images with `shard --exclude-near`.
            """),
        "example:\n  python -m data_prep dedup runs/demo/images --out runs/demo/near-duplicates.jsonl\n"),
    "verify": (
        "re-read every shard of OUT and check it against _info.json",
        "Check every shard listed in OUT/_info.json: file present, bytes and sha256, sample count, every sample "
        "complete (jpg, cls, json), labels within the class list (in multi-label splits every label of .labels, "
        "whose first is cls), and one image per shard decodes. Exits 1 with "
        "a report on any mismatch.",
        "example:\n  python -m data_prep verify runs/demo/shards --split train\n"),
    "demo-data": (
        "write the built-in demo images (coloured shapes on textured backgrounds) as an ImageFolder tree",
        "Write OUT/<class>/<class>_00000.jpg ...: one shape per image, random position, scale and rotation, on a "
        "noisy textured background. With --label-set multi: OUT/images/multi_00000.jpg ... with 2-3 shapes each, "
        "OUT/labels.jsonl ({\"path\", \"labels\"} per image) and OUT/classes.txt. Deterministic: the same "
        "arguments give byte-identical files.",
        textwrap.dedent("""\
            examples:
              python -m data_prep demo-data runs/demo/pretrain --classes 8 --per-class 300 --label-set shapes
              python -m data_prep demo-data runs/demo/finetune --classes 9 --per-class 100 --label-set shape-color
              python -m data_prep demo-data runs/demo/multi --classes 6 --per-class 100 --label-set multi
              python -m data_prep shard runs/demo/multi/labels.jsonl runs/demo/multi-shards \
                  --classes runs/demo/multi/classes.txt
            """)),
}


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Pack image collections into WebDataset shards with Ray (exactly once, byte-identical, "
                    "resumable), check them, or write the built-in demo images.",
        epilog=_EPILOG, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{shard,dedup,verify,demo-data}")
    shard, dedup, verify, demo = (sub.add_parser(name, help=help_, description=description, epilog=epilog,
                                          formatter_class=raw)
                           for name, (help_, description, epilog) in _COMMANDS.items())
    shard.add_argument("src", type=_location, help="ImageFolder tree, folder of <class>.tar files, .csv/.jsonl "
                       "manifest, OpenImages .csv, webdataset tars or parquet files (a folder, file or quoted "
                       "pattern); a local path or s3://bucket/prefix")
    shard.add_argument("out", type=_location, help="output folder (shared by every node on a cluster), or "
                       "s3://bucket/prefix (S3 or an S3-compatible store: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...); "
                       "several splits may share it, e.g. --split train then --split val")
    shard.add_argument("--split", default="train",
                       help="split name, used in shard names and _info.json (default: train)")
    shard.add_argument("--source", choices=["auto", "folder", "tars", "manifest", "openimages", "webdataset", "parquet"],
                       default="auto",
                       help="kind of SRC; auto: a .csv with the header ImageID,Source,LabelName,Confidence is "
                            "OpenImages annotations, any other .csv/.jsonl file a manifest, a .tar file, pattern or folder "
                            "whose tars hold key-sharing members webdataset, a folder with .tar files "
                            "and no sub-folders per-class tars, .parquet files parquet, any other folder an "
                            "ImageFolder tree (default: auto)")
    shard.add_argument("--images", type=_location, default=None, metavar="DIR",
                       help="OpenImages only: the folder holding <ImageID>.jpg for the annotation file SRC")
    shard.add_argument("--classes", type=_location, default=None, metavar="FILE",
                       help="fix the class order: a text file with one class name per line (e.g. the 1,000 "
                            "ImageNet-1K synsets) or a JSON list / {\"classes\": [...]} (e.g. another split's "
                            "_info.json); or a mapping raw name -> class: ILSVRC's LOC_synset_mapping.txt "
                            "(\"n01440764 tench, Tinca tinca\" lines), a two-column .csv/.tsv or a JSON object, e.g. "
                            "to shard Hugging Face's ImageNet-1K parquet onto synsets (docs/data.md); images of other "
                            "classes are rejected as 'unknown_class' (multi-label: "
                            "other labels are dropped, an image with none left is rejected) "
                            "(default: the sorted class names found in SRC)")
    shard.add_argument("--label-field", default=None, metavar="KEY",
                       help="webdataset/parquet sources: where the label(s) are: a JSON key of the sample's .json "
                            "member, a member extension (cls, txt), or a parquet column")
    shard.add_argument("--label-map", type=_location, default=None, metavar="FILE",
                       help="webdataset/parquet sources: a JSON object or two-column CSV mapping raw labels to class "
                            "names; labels it does not map are unknown")
    _add_options(shard, _SHARD_OPTIONS)
    shard.add_argument("--exclude-near", type=_location, nargs="+", default=(), metavar="EVAL",
                       help="evaluation sets (any kind of SRC, or our shards, e.g. ImageNet-1K val): images of SRC "
                            "whose perceptual hash is within --near-distance bits of one of theirs go to "
                            "rejects.jsonl as 'near_duplicate', naming the eval image (docs/data.md)")
    shard.add_argument("--near-distance", type=_bounded(int, 0, 24, "--near-distance "), default=NEAR_DISTANCE,
                       metavar="BITS", help=f"largest Hamming distance of two 64-bit hashes counted as near "
                                            f"duplicates (default: {NEAR_DISTANCE}, measured in docs/data.md)")
    shard.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="Ray cluster to join: 'auto' or host:port (a cluster with token authentication "
                            "also needs RAY_AUTH_MODE=token and its token, as any Ray driver does); default: start "
                            "a private local Ray on 127.0.0.1 that ends with this command")
    _add_options(shard, _LIMIT_OPTIONS)
    _add_options(shard, _SHARD_FLAGS)

    dedup.add_argument("src", type=_location, help="any SRC of `shard`: a local path or s3://bucket/prefix")
    dedup.add_argument("--source", choices=["auto", "folder", "tars", "manifest", "openimages", "webdataset",
                                            "parquet"], default="auto", help="kind of SRC, as for shard "
                                                                            "(default: auto)")
    dedup.add_argument("--label-field", default=None, metavar="KEY", help="as for shard (webdataset/parquet)")
    dedup.add_argument("--near-distance", type=_bounded(int, 0, 24, "--near-distance "), default=NEAR_DISTANCE,
                       metavar="BITS", help=f"largest Hamming distance within a group (default: {NEAR_DISTANCE})")
    dedup.add_argument("--out", type=Path, default=None, metavar="FILE",
                       help="write the JSON lines here (default: stdout)")
    dedup.add_argument("--ray-address", default=None, metavar="ADDR", help="as for shard (default: a private "
                                                                           "local Ray)")
    dedup.add_argument("--workers", type=_positive_int, default=None, help="at most this many hashing tasks at "
                                                                           "once (default: every CPU)")

    verify.add_argument("out", type=_location, help="shard folder holding _info.json, or s3://bucket/prefix")
    verify.add_argument("--split", default=None, help="check only this split (default: every split)")

    demo.add_argument("out", type=Path, help="folder to create (must be new or empty, or pass --overwrite)")
    _add_options(demo, _DEMO_OPTIONS[:4])
    demo.add_argument("--label-set", choices=["shapes", "shape-color", "multi", "cells"], default="shapes",
                      help="'shapes': label = shape kind, colour random; 'shape-color': label = (shape, colour) "
                           "pair, folder names like circle-red; 'multi': 2-3 shapes per image, labels = the shapes "
                           "present, written as OUT/images/*.jpg + OUT/labels.jsonl (shard that file), "
                           "--classes x --per-class images in all; 'cells': one shape per image drawn as in "
                           "'multi' (a quarter of the image), as class folders: a single-label transfer task at "
                           "the multi-label set's scale (default: shapes)")
    _add_options(demo, _DEMO_OPTIONS[4:])
    return parser


def _run_demo(args) -> int:
    import time

    from data_prep.demo_data import DemoDataConfig, generate
    from data_prep.demo_multi import generate_cells, generate_multi

    start = time.perf_counter()
    cfg = DemoDataConfig(out=args.out, classes=args.classes, per_class=args.per_class, size=args.size,
                         seed=args.seed, label_set=args.label_set, quality=args.quality, overwrite=args.overwrite)
    if args.label_set == "multi":
        total, counts = generate_multi(cfg)
        print(f"demo-data: wrote {total} multi-label images ({', '.join(f'{k} {v}' for k, v in counts.items())} "
              f"images per class) and {args.out / 'labels.jsonl'} in {time.perf_counter() - start:.2f}s; "
              f"next: python -m data_prep shard {args.out / 'labels.jsonl'} OUT --classes "
              f"{args.out / 'classes.txt'}")
        return 0
    counts = generate_cells(cfg) if args.label_set == "cells" else generate(cfg)
    total = sum(counts.values())
    print(f"demo-data: wrote {total} images in {len(counts)} classes ({', '.join(counts)}) to {args.out} "
          f"in {time.perf_counter() - start:.2f}s")
    return 0


def _run_shard(args) -> int:
    from data_prep.shard.job import ShardConfig, run_shard_job

    cfg = ShardConfig(src=args.src, out=args.out, split=args.split, source=args.source, classes_file=args.classes,
                      images=args.images, label_field=args.label_field, label_map=args.label_map,
                      shard_size=args.shard_size, seed=args.seed, max_size=args.max_size, max_aspect=args.max_aspect,
                      quality=args.quality, max_pixels=args.max_pixels, max_bytes=args.max_bytes,
                      max_label_bytes=args.max_label_bytes, max_labels=args.max_labels, max_classes=args.max_classes,
                      max_row_group_bytes=args.max_row_group_bytes, strip_metadata=args.strip_metadata,
                      dedup=args.dedup, exclude_near=tuple(args.exclude_near), near_distance=args.near_distance,
                      workers=args.workers,
                      ray_address=args.ray_address, overwrite=args.overwrite, progress=not args.no_progress)
    run_shard_job(cfg)
    return 0


def _run_dedup(args) -> int:
    from data_prep.images import ImageOptions
    from data_prep.limits import Limits
    from data_prep.near_dup.dedup import run_dedup

    run_dedup(args.src, args.source, args.near_distance, args.out, args.ray_address, args.workers, ImageOptions(),
              Limits(), label_field=args.label_field, log=lambda line: print(line, file=sys.stderr))
    return 0


def _run_verify(args) -> int:
    from data_prep.shard.verify import verify_out

    report = verify_out(args.out, split=args.split)
    for line in report.lines:
        print(line)
    return 0 if report.ok else 1


@cli_main
def main(argv: list[str] | None = None) -> int:
    """User errors: one line `error: ...`, exit 2; Ctrl-C: a hint to re-run (the job resumes), exit 130."""
    args = build_parser().parse_args(argv)
    handlers = {"demo-data": _run_demo, "shard": _run_shard, "dedup": _run_dedup, "verify": _run_verify}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

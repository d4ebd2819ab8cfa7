"""``verify OUT``: re-read every shard and check it against _info.json.

Checks, per shard: present, byte size and sha256 as recorded, readable as a tar without extracting,
every sample complete (jpg, cls, json) with a unique key, ``cls`` an integer within the class list and
equal to the json label, sample count equal to ``shard_lengths``; the first image of each shard decodes.
Multi-label splits (``multi_label: true``): every sample also has ``.labels``, a non-empty list of distinct
labels within the class list whose first is ``cls``, equal to the json ``labels``, with json ``classes``
their names.
Per split: ``num_samples`` is the sum of the shard lengths and ``filenames`` matches the shard list.
OUT may be an object-store URL (``s3://bucket/prefix``): shards are then streamed from the store
(core.storage.open_read: ranged reads, each retried), never downloaded whole.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from PIL import Image

from core import storage
from core.errors import UserError
from core.storage import Location

from data_prep.shard.info import load_info
from data_prep.shard.layout import INFO_NAME


@dataclass
class VerifyReport:
    lines: list[str] = field(default_factory=list)
    problems: int = 0

    @property
    def ok(self) -> bool:
        return self.problems == 0

    def bad(self, message: str) -> None:
        self.problems += 1
        self.lines.append(f"FAIL {message}")


def _read_samples(path: Location, digest) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, streaming the tar once (tar mode 'r|': no seeking, nothing written to disk)."""

    class _Hashing(io.RawIOBase):
        def __init__(self, handle):
            self.handle = handle

        def readable(self):
            return True

        def readinto(self, buffer):
            data = self.handle.read(len(buffer))
            digest.update(data)
            buffer[:len(data)] = data
            return len(data)

    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with storage.open_read(path) as handle:
        stream = io.BufferedReader(_Hashing(handle), buffer_size=1 << 20)
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext] = archive.extractfile(member).read()
        while stream.read(1 << 20):  # hash the tar's zero padding too
            pass
    return {k: samples[k] for k in order}


def _label_list_problem(parts: dict[str, bytes], label: int, meta: dict, classes: list[str]) -> str | None:
    """Why a multi-label sample's `.labels` / json labels are wrong, or None."""
    if "labels" not in parts:
        return "lacks labels"
    try:
        labels = [int(x) for x in parts["labels"].decode("ascii").split(",")]
    except (ValueError, UnicodeDecodeError):
        return f"has an unreadable labels member {parts['labels'][:40]!r}"
    if len(set(labels)) != len(labels) or not all(0 <= x < len(classes) for x in labels):
        return f"has labels {labels}: repeated or outside 0..{len(classes) - 1}"
    if labels[0] != label:
        return f"has cls {label} but labels {labels} (cls must be the first)"
    if meta.get("labels") != labels or meta.get("classes") != [classes[x] for x in labels]:
        return f"has json labels/classes that disagree with labels {labels}"
    return None


def _check_shard(out: Location, split: str, shard: dict, length: int, classes: list[str], multi: bool,
                 report: VerifyReport) -> int:
    before = report.problems
    name = shard.get("filename", "?")
    path = storage.join(out, name)
    where = f"{split}/{name}"
    try:
        size = storage.size(path)
    except FileNotFoundError:
        report.bad(f"{where}: file missing")
        return 0
    if size != shard.get("bytes"):
        report.bad(f"{where}: {size} bytes, _info.json says {shard.get('bytes')}")
    digest = hashlib.sha256()
    try:
        samples = _read_samples(path, digest)
    except (tarfile.TarError, OSError, EOFError) as err:
        report.bad(f"{where}: not a readable tar ({err})")
        return 0
    except Exception as err:  # noqa: BLE001 - a store's read error that outlived its retries (aiohttp, botocore)
        report.bad(f"{where}: read failed ({type(err).__name__}: {err})")
        return 0
    if digest.hexdigest() != shard.get("sha256"):
        report.bad(f"{where}: sha256 {digest.hexdigest()[:16]}... differs from _info.json")
    num_classes = len(classes)
    if len(samples) != length or length != shard.get("num_samples"):
        report.bad(f"{where}: {len(samples)} samples, _info.json says {length}")
    for key, parts in samples.items():
        missing = {"jpg", "cls", "json"} - set(parts)
        if missing:
            report.bad(f"{where}: sample {key} lacks {', '.join(sorted(missing))}")
            continue
        try:
            label = int(parts["cls"].decode("ascii"))
            meta = json.loads(parts["json"])
        except (ValueError, UnicodeDecodeError):
            report.bad(f"{where}: sample {key} has an unreadable cls or json")
            continue
        if not 0 <= label < num_classes or meta.get("label", label) != label:
            report.bad(f"{where}: sample {key} has label {label}, outside 0..{num_classes - 1} or != json label")
        elif multi and (problem := _label_list_problem(parts, label, meta, classes)):
            report.bad(f"{where}: sample {key} {problem}")
    if samples:
        first_key, first = next(iter(samples.items()))
        try:
            with Image.open(io.BytesIO(first.get("jpg", b""))) as image:
                image.load()
        except Exception as err:  # noqa: BLE001 - any decoder error is a finding, not a crash
            report.bad(f"{where}: image of sample {first_key} does not decode ({err})")
    if report.problems == before:
        report.lines.append(f"ok   {where}: {len(samples)} samples, {size:,} bytes")
    return len(samples)


def verify_out(out: Location, split: str | None = None) -> VerifyReport:
    out = storage.as_location(out)
    with storage.user_errors(out, "read it"):
        return _verify_out(out, split)


def _verify_out(out: Location, split: str | None) -> VerifyReport:
    info_path = storage.join(out, INFO_NAME)
    if not storage.exists(info_path):
        raise UserError(f"{info_path} not found; is {out} a shard folder written by `data_prep shard`?")
    info = load_info(out)
    splits = info.get("splits", {})
    if split is not None:
        if split not in splits:
            raise UserError(f"--split {split!r} is not in {info_path} (splits: {', '.join(splits) or 'none'})")
        splits = {split: splits[split]}
    report = VerifyReport()
    total = 0
    for name, entry in splits.items():
        shards = entry.get("shards", [])
        lengths = entry.get("shard_lengths", [])
        if [s.get("filename") for s in shards] != entry.get("filenames") or len(lengths) != len(shards):
            report.bad(f"{name}: filenames / shard_lengths / shards disagree in _info.json")
            continue
        if sum(lengths) != entry.get("num_samples"):
            report.bad(f"{name}: num_samples {entry.get('num_samples')} != sum of shard_lengths {sum(lengths)}")
        classes, multi = entry.get("classes", []), bool(entry.get("multi_label", False))
        for shard, length in zip(shards, lengths):
            total += _check_shard(out, name, shard, length, classes, multi, report)
    shard_count = sum(len(e.get("shards", [])) for e in splits.values())
    verdict = "OK" if report.ok else f"{report.problems} problem(s)"
    report.lines.append(f"verify {out}: {verdict}; {len(splits)} split(s), {shard_count} shards, {total} samples")
    return report

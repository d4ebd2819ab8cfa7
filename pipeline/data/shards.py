"""The shards data_prep writes, as every reader sees them: where they are, how many samples, how to decode one.

One module for training (pipeline.data.loader), evaluation (pipeline.evaluation.loop) and the planner (launch.plan),
so a shard folder, a URL pattern and a sample mean the same thing everywhere:

    shards = open_shards("shards/imagenet-1k", "val")   # ShardSet(urls, shard_lengths, num_samples, classes)
    image, label = decode_sample(sample)                 # uint8 CHW RGB tensor, int label
    image, labels = decode_sample(sample, multi_label=True)   # ... list[int] (`.labels`, first == `.cls`)

A multi-label split (`_info.json`: `splits.<split>.multi_label`, issue 11) adds a `<key>.labels` member per
sample ("3,7,12", distinct ints, the first is `.cls`); `ShardSet.multi_label` says so, and readers that
want every label pass `multi_label=True` to the sample functions.

A location may be a local folder or pattern, or an object-store URL (`s3://bucket/shards`, or a pattern
`s3://bucket/shards/train-{000000..000099}.tar`), configured the standard AWS way (core.storage). Importing
this module registers `s3://` with webdataset's gopen (below), so the training and evaluation loaders, in
every DataLoader worker, stream shards from the store in ranged reads that are each retried on transient
errors; a shard whose read still fails is skipped and counted like a corrupt one.

A location that is not usable raises core.errors.UserError with one line saying what to do.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
from webdataset import gopen
from webdataset.gopen import gopen_schemes  # the module (`webdataset.gopen` names the function)
from webdataset.shardlists import expand_urls
from webdataset.handlers import warn_and_continue
from webdataset.tariterators import base_plus_ext, group_by_keys, url_opener

from core import storage
from core.errors import UserError
from core.images import TRAINING_FORMATS, open_image

MAX_SAMPLE_BYTES = 64 << 20  # data.max_sample_bytes default: a shard member above it is skipped unread
MAX_PIXELS = 89_478_485      # data.max_pixels default (Pillow's bomb limit): a larger image is skipped
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta

# torchvision 0.29 announces a move of its decoders to TorchCodec; they are still the fastest JPEG decode here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


@dataclass
class ShardSet:
    """The shards of one split: where they are, how many samples each holds, and the class names."""
    urls: list[str]
    shard_lengths: list[int]
    num_samples: int
    classes: Optional[list[str]] = None
    multi_label: bool = False
    # Images per class (`_info.json` counts.per_class, in class order), where data_prep recorded them: the
    # label prior a sigmoid head's initial bias is set from (pipeline.train.loss.initial_head_bias).
    class_counts: Optional[list[int]] = None
    # data.train as a weighted mixture (pipeline.data.sources.open_train): [(TrainSource, its ShardSet)], the
    # sources the train stream draws from; `urls`/`num_samples` above then cover all of them. None: one source.
    mixture: Optional[list] = None


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _gopen_store(url: str, mode: str = "rb", bufsize: int = 8192, **_kw):
    """webdataset gopen handler for object-store URLs: core.storage's streaming reader (fsspec/s3fs).

    Why not webdataset's own `pipe:aws s3 cp ...` recipe: it needs the AWS CLI in every worker image, and a
    connection cut mid-shard ends the pipe (the rest of the shard is lost) where s3fs retries the range.
    """
    if mode != "rb":
        raise ValueError(f"{url}: shards are only read through gopen, not written (mode {mode!r})")
    return storage.open_read(url)


for _scheme in ("s3", "s3a"):
    gopen_schemes.setdefault(_scheme, _gopen_store)


def _scan_tar(url: str) -> tuple[int, bool]:
    """(samples in one tar (distinct keys), whether it has `.labels` members), reading headers only.

    Used when there is no _info.json: the `.labels` members are then the only sign of a multi-label split.
    """
    if _is_local(url):
        with tarfile.open(url, "r:") as tf:  # random access: seeks over the member data
            names = tf.getnames()
    else:
        with gopen.gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
            names = [m.name for m in tf]
    parts = [base_plus_ext(n) for n in names]
    return len({key for key, _ in parts} - {None}), any(ext == "labels" for _, ext in parts)


def _count_samples(url: str) -> int:
    return _scan_tar(url)[0]


def _read_info(folder: str) -> Optional[dict]:
    path = str(storage.join(storage.as_location(folder), "_info.json")) if storage.is_url(folder) else \
        os.path.join(folder, "_info.json")
    if storage.is_url(path):
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            return None
    elif not os.path.isfile(path):
        return None
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UserError(f"{path} is not readable ({e}); re-run `python -m data_prep shard`") from None
    try:
        return json.loads(data)
    except ValueError as e:
        raise UserError(f"{path} is not readable JSON ({e}); re-run `python -m data_prep shard`") from None


def _missing(urls: list[str]) -> list[str]:
    """The shards that do not exist: local files one by one, objects by listing each prefix once (a split
    of 30,000 shards would otherwise cost 30,000 requests before training starts)."""
    local = [u for u in urls if _is_local(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    remote = [u for u in urls if storage.is_url(u)]
    listed: dict[str, set[str]] = {}
    for url in remote:
        prefix, _, name = url.rpartition("/")
        if prefix not in listed:
            listed[prefix] = set(storage.listdir(prefix, "*"))
        if name not in listed[prefix]:
            missing.append(url)
    return missing


def _open_folder(path: str, split: str) -> ShardSet:
    """A shard folder: the split's entry in `_info.json`, or without one its `{split}-*.tar` files, counted."""
    info = _read_info(path)
    if info is None:
        if storage.is_url(path):
            urls = [f"{path}/{name}" for name in storage.listdir(path, f"{split}-*.tar")]
        else:
            urls = sorted(glob.glob(os.path.join(glob.escape(path), f"{split}-*.tar")))
        if not urls:
            raise UserError(f"no shards for split {split!r} in {path} (no _info.json, no {split}-*.tar); "
                            f"make them with `python -m data_prep shard SRC {path} --split {split}`")
        scans = [_scan_tar(u) for u in urls]
        lengths = [n for n, _ in scans]
        return ShardSet(urls, lengths, sum(lengths), None, any(m for _, m in scans))
    splits = info.get("splits", {})
    if split not in splits:
        raise UserError(f"{path}/_info.json has no split {split!r} (it has: {', '.join(splits) or 'none'}); "
                        f"shard it with `python -m data_prep shard SRC {path} --split {split}`")
    entry = splits[split]
    names = entry.get("filenames") or [s["filename"] for s in entry.get("shards", [])]
    lengths = entry.get("shard_lengths") or [s["num_samples"] for s in entry.get("shards", [])]
    urls = [f"{path}/{n}" if storage.is_url(path) else os.path.join(path, n) for n in names]
    missing = _missing(urls)
    if missing:
        raise UserError(f"{len(missing)} shard(s) listed in {path}/_info.json are missing, e.g. {missing[0]}; "
                        f"re-run `python -m data_prep shard`")
    if len(lengths) != len(urls):
        lengths = [_count_samples(u) for u in urls]
    classes = entry.get("classes", info.get("classes"))
    per_class = (entry.get("counts") or {}).get("per_class") or {}
    counts = [int(per_class.get(name, 0)) for name in classes] if classes and per_class else None
    return ShardSet(urls, [int(n) for n in lengths], int(sum(lengths)), list(classes) if classes else None,
                    bool(entry.get("multi_label", False)), counts)


def _open_pattern(pattern: str, split: str) -> ShardSet:
    """A brace-expanded URL pattern; lengths from an `_info.json` beside local files, else the tar headers."""
    path = os.path.expanduser(pattern)
    urls = expand_urls(path)
    local = [u for u in urls if _is_local(u)]
    remote = [u for u in urls if storage.is_url(u)]
    if not urls or (len(local) == len(urls) and not any(os.path.isfile(u) for u in urls)):
        raise UserError(f"shard location {pattern!r} is neither a folder nor matches any shard file; "
                        f"check data.train / data.val")
    missing = _missing(local + remote)
    if remote and len(missing) == len(remote) == len(urls):
        raise UserError(f"shard location {pattern!r} is neither a prefix with _info.json nor matches any shard "
                        f"object; check data.train / data.val (and AWS_ENDPOINT_URL for an S3-compatible store)")
    if missing:
        raise UserError(f"{len(missing)} shard(s) of {pattern!r} do not exist, e.g. {missing[0]}")
    lengths: list[Optional[int]] = [None] * len(urls)
    classes, multi_label = None, None
    folders = {os.path.dirname(u) for u in local} | {u.rpartition("/")[0] for u in remote}
    if len(folders) == 1 and len(local) + len(remote) == len(urls):  # a pattern over data_prep's folder
        info = _read_info(folders.pop() or ".")
        if info:
            by_name, multi_by_name = {}, {}
            for sp in info.get("splits", {}).values():
                by_name.update(zip(sp.get("filenames", []), sp.get("shard_lengths", [])))
                multi_by_name.update((n, bool(sp.get("multi_label", False))) for n in sp.get("filenames", []))
            lengths = [by_name.get(os.path.basename(u)) for u in urls]
            multi_label = multi_by_name.get(os.path.basename(urls[0]))
            entry = info.get("splits", {}).get(split)
            if entry is not None:
                classes = entry.get("classes")
    scans = {i: _scan_tar(u) for i, (u, n) in enumerate(zip(urls, lengths)) if n is None}
    counted = [n if n is not None else scans[i][0] for i, n in enumerate(lengths)]
    if multi_label is None:  # no _info.json entry for this split: the first shard's members decide
        multi_label = (scans.get(0) or _scan_tar(urls[0]))[1]
    return ShardSet(list(urls), [int(n) for n in counted], int(sum(counted)), classes, bool(multi_label))


def open_shards(path_or_pattern: str, split: str = "train") -> ShardSet:
    """Resolve a shard folder (with `_info.json`) or a webdataset URL pattern into a ShardSet.

    Folder: the split's entry in `_info.json` (or, without one, the folder's `{split}-*.tar` files, counted).
    Pattern: brace-expanded (`a-{000000..000009}.tar`); sample counts come from an `_info.json` next to
    local files when it lists them, else from reading the tar headers. Raises UserError with one line.
    """
    if not path_or_pattern:
        raise UserError("no shard location given (data.train / data.val is empty)")
    if storage.is_url(path_or_pattern):
        url = str(storage.as_location(path_or_pattern))
        with storage.user_errors(url, "read shards there"):
            if "{" not in url and not url.endswith(".tar"):  # a prefix written by data_prep
                return _open_folder(url, split)
            return _open_pattern(url, split)
    path = os.path.expanduser(str(path_or_pattern))
    if os.path.isdir(path):
        return _open_folder(path, split)
    return _open_pattern(str(path_or_pattern), split)


def _text(value) -> str:
    return value.decode("ascii").strip() if isinstance(value, bytes) else str(value).strip()


def split_sample(sample: dict, multi_label: bool = False) -> tuple[bytes, Union[int, list[int]]]:
    """A raw sample's JPEG bytes and its label, undecoded: the int `cls`, or with `multi_label` the list of
    `.labels` (first == cls; a sample without `.labels` has just [cls]). Raises ValueError on a sample without
    `jpg`/`cls` or with an unreadable `.labels`."""
    if "jpg" not in sample or "cls" not in sample:
        raise ValueError(f"sample {sample.get('__key__')!r} lacks jpg/cls (has {sorted(k for k in sample if k[0] != '_')})")
    label = int(_text(sample["cls"]))
    if not multi_label:
        return sample["jpg"], label
    if "labels" not in sample:
        return sample["jpg"], [label]
    labels = [int(part) for part in _text(sample["labels"]).split(",")]
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"sample {sample.get('__key__')!r}: .labels {labels} is empty or repeats a label")
    return sample["jpg"], labels


def decode_sample(sample: dict, multi_label: bool = False,
                  max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, Union[int, list[int]]]:
    """JPEG bytes -> uint8 CHW RGB tensor (torchvision's JPEG decoder, nothing else), label as split_sample.
    Raises on a bad sample: not a JPEG, or more than `max_pixels` (judged from the header, before decoding)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data, label = split_sample(sample, multi_label)
    check_jpeg_header(data, max_pixels)
    image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return image, label


def pad_labels(labels: list[list[int]]) -> torch.Tensor:
    """Label lists of a batch -> int64 (B, max labels), padded with -1 (the first column is each `cls`).

    Why padded indices and not multi-hot: a batch of 512 images with 21,841 classes would ship 11 MB of
    multi-hot floats per batch from a worker; the indices are a few KB, made multi-hot on the device.
    """
    width = max((len(row) for row in labels), default=1)
    out = torch.full((len(labels), width), -1, dtype=torch.int64)
    for i, row in enumerate(labels):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
    return out


def check_jpeg_header(data: bytes, max_pixels: int = MAX_PIXELS) -> None:
    """Raise ValueError unless `data` starts like a decodable JPEG of at most `max_pixels` (PIL reads the
    headers only, ~20 us, and tries no format but JPEG: core.images).

    Why: with data.decode=gpu the workers never decode, so this is their only chance to drop a damaged,
    oversized or non-JPEG sample (counted as corrupt) before it would fail a whole batch on the device.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = open_image(data, TRAINING_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ValueError(f"not a JPEG image within the limits ({err})") from None
    with image:
        if image.format not in ("JPEG", "MPO") or image.width < 1 or image.height < 1:
            raise ValueError(f"not a JPEG image ({image.format} {image.width}x{image.height})")
        if image.width * image.height > max_pixels:
            raise ValueError(f"{image.width}x{image.height} pixels > data.max_pixels {max_pixels:,}")


def tar_members(opened: Iterable[dict], handler: Callable[[Exception], bool],
                max_bytes: int = MAX_SAMPLE_BYTES) -> Iterator[dict]:
    """webdataset's tar_file_expander (same samples, same end-of-shard marker for group_by_keys), except:
    the stream is read as a plain tar ("r|": a gzip/xz/bz2 stream is an error, never decompressed without a
    bound, where webdataset's "r|*" would), and a member over `max_bytes` (tar header) is skipped unread and
    reported to `handler` like a corrupt one."""
    for source in opened:
        url = source["url"]
        try:
            with tarfile.open(fileobj=source["stream"], mode="r|") as archive:
                for member in archive:
                    archive.members = []  # TarFile keeps every TarInfo it read unless told otherwise
                    if not member.isreg() or _META.match(member.name):
                        continue
                    if member.size > max_bytes:
                        handler(ValueError(f"member {member.name} of {url}: {member.size:,} bytes > "
                                           f"data.max_sample_bytes {max_bytes:,}; skipped"))
                        continue
                    yield {"fname": member.name, "data": archive.extractfile(member).read(), "__url__": url}
            yield {}  # end of shard: group_by_keys never joins samples across shards
        except Exception as exn:  # noqa: BLE001 - a damaged or compressed shard: the handler counts it
            exn.args = exn.args + (url,)
            if not handler(exn):
                break
        finally:
            stream = source.get("stream")
            if stream is not None:
                stream.close()


def tarfile_samples(source: Iterable[dict], handler: Callable[[Exception], bool] = warn_and_continue,
                    max_bytes: int = MAX_SAMPLE_BYTES) -> Iterator[dict]:
    """A webdataset pipeline stage like ``wds.tarfile_to_samples``, reading through ``tar_members`` (plain tars
    only, no member over `max_bytes`); module-level so DataLoader workers started by forkserver can load it."""
    return group_by_keys(tar_members(url_opener(source, handler=handler), handler, max_bytes), handler=handler)


def worker_init(_: int) -> None:
    """DataLoader worker start: one intra-op thread, since decode + augment is per-sample work and threads
    would only contend with the other workers."""
    torch.set_num_threads(1)

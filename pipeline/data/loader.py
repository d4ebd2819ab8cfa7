"""The TRAIN input pipeline: streaming WebDataset shards with an exactly resumable order.

Design (why it resumes exactly and never hangs a collective)
------------------------------------------------------------
* Streams. Rank r with K DataLoader workers runs K independent sample streams; stream s = r * K + w for
  logical worker w, S = world_size * K streams in all. Every stream is INFINITE: it walks "passes" over
  the shard list. Pass e is a permutation P_e of the N shards drawn from (seed, e); shard P_e[i] belongs to
  stream (e * N + i) % S. The round robin carries over from pass to pass, so even N < S gives every
  stream shards, and each pass is split evenly over streams (per-rank and per-worker shard splitting).
* Shuffle. Within one (stream, pass) the raw samples (undecoded bytes) go through webdataset's shuffle
  buffer with an RNG seeded by (seed, e, s); the buffer drains at the end of the pass, so a pass is a
  self-contained unit.
* Position. A stream's position is (pass, offset): `offset` raw samples of pass `pass` were consumed.
  Each batch carries the position after its last sample; the trainer stores the newest one per worker
  (plus how many batches it consumed, which says whose turn it is in the DataLoader's round robin).
* Labels. Single-label splits ship int64 labels (B,). A multi-label split read with multi-hot targets
  (loss.type=sigmoid, see `multi_hot_targets`) ships every image's labels padded with -1 (B, L), and the
  device turns them into multi-hot float (B, num_classes): MixUp/CutMix then mix those with the same
  per-batch draws (pipeline.data.transforms.MultiHotMix). `data.first_label_only` reads such a split as single-label.
* Augmentation. Sample (pass e, offset o) of stream s is decoded and transformed after seeding torch's
  RNG with (seed, e, s, o); MixUp/CutMix for a batch with (seed, e, s, offset of its first sample).
  So data order and augmentation are a pure function of (seed, epoch/pass, rank, worker, position), and
  resuming replays the raw samples of the current pass through the buffer WITHOUT decoding them (only tar
  headers and bytes are read), then continues bit for bit.
* Where. Workers always ship uint8: the crops (data.decode=cpu), or the raw JPEG bytes with each sample's
  seed (data.decode=gpu, decoded and augmented on the device). Normalisation and MixUp/CutMix run in
  TrainLoader on the training device after the transfer (pipeline.data.device_augment, which also bounds the
  shared memory per rank).
* Epochs. An epoch is num_samples // global_batch_size optimizer steps (the trainer's definition). Every
  rank draws the same number of micro-batches from its infinite stream, so no rank runs dry before the
  others and no collective hangs at an epoch's end, whatever the shard sizes.
* Corruption. Tar errors (truncated or unreadable shards) go through a webdataset handler that warns,
  counts and continues; samples that fail to decode or lack `jpg`/`cls` are skipped the same way.
  Shards on an object store (`s3://...`, pipeline.data.shards registers the scheme with webdataset's gopen) are
  read in ranged GETs that s3fs and botocore retry on transient errors; a read that still fails mid-shard
  ends that shard here, counted (and its missing samples counted again by the length check) like a
  truncated shard. The
  count travels with each batch (per worker) so rank 0 can log it; it is part of the saved position.
* A changed layout (world size, workers, micro batch or seed) cannot continue the old streams; the loader
  then starts every stream at the pass after the furthest saved one, so it does not replay old data.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import group_by_keys, url_opener

from pipeline.data.corrupt import CorruptionCounter, check_corrupt_fraction
from pipeline.data.device_augment import DeviceBatch, check_decode, pack_jpegs, shared_memory_bytes
from core.errors import UserError
from pipeline.data.shards import (MAX_PIXELS, MAX_SAMPLE_BYTES, ShardSet, check_jpeg_header, decode_sample, pad_labels,
                                  split_sample, tar_members, worker_init)

log = logging.getLogger("pipeline.data.loader")


# ------------------------------------------------------------------------------------- seeds and streams
def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers given (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


_TAG_SHARDS, _TAG_BUFFER, _TAG_SAMPLE, _TAG_MIX = 1, 2, 3, 4


def shards_of_pass(seed: int, pass_index: int, num_shards: int, stream: int, num_streams: int) -> list[int]:
    """Indices of the shards stream `stream` reads in pass `pass_index` (see the module docstring)."""
    order = np.random.default_rng(derive_seed(seed, _TAG_SHARDS, pass_index)).permutation(num_shards)
    start = (pass_index * num_shards) % num_streams
    first = (stream - start) % num_streams
    return [int(order[i]) for i in range(first, num_shards, num_streams)]


@dataclass
class StreamPosition:
    """Where one logical worker's stream stands: `offset` raw samples of pass `pass_index` consumed."""
    pass_index: int = 0
    offset: int = 0
    corrupt: int = 0

    def to_dict(self) -> dict:
        return {"pass": self.pass_index, "offset": self.offset, "corrupt": self.corrupt}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamPosition":
        return cls(int(d["pass"]), int(d["offset"]), int(d.get("corrupt", 0)))


class TrainStream(IterableDataset):
    """Infinite, deterministic stream of uint8 micro-batches for one rank.

    Yields dicts {"labels": int64 (B,) (`multi_label`: (B, L), each image's labels padded with -1),
    "mix_seed": the batch's MixUp/CutMix seed, "worker": logical worker,
    "position": StreamPosition dict after the batch} plus, with `transform` (data.decode=cpu),
    "images": uint8 (B, 3, H, W); without (data.decode=gpu), "jpeg"/"jpeg_offsets" (pack_jpegs) and "seeds":
    int64 (B,), each sample's augmentation seed, for pipeline.data.device_augment.augment_on_device.
    """

    def __init__(self, shards: ShardSet, *, seed: int, rank: int, world_size: int, num_workers: int,
                 micro_batch_size: int, transform: Optional[Callable], shuffle_buffer: int = 1000,
                 positions: Optional[dict[int, dict]] = None, worker_offset: int = 0,
                 num_classes: Optional[int] = None, multi_label: bool = False,
                 max_sample_bytes: int = MAX_SAMPLE_BYTES, max_pixels: int = MAX_PIXELS):
        self.shards = shards
        self.max_sample_bytes, self.max_pixels = max_sample_bytes, max_pixels
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers = max(1, num_workers)
        self.micro_batch_size = micro_batch_size
        self.transform = transform
        self.shuffle_buffer = shuffle_buffer
        self.positions = {int(k): v for k, v in (positions or {}).items()}
        self.worker_offset = worker_offset
        self.num_classes = num_classes
        self.multi_label = multi_label

    # -- raw samples of one pass of one stream, shuffled, undecoded
    def _raw_pass(self, pass_index: int, stream: int, handler: CorruptionCounter) -> Iterator[dict]:
        num_streams = self.world_size * self.num_workers
        idx = shards_of_pass(self.seed, pass_index, len(self.shards.urls), stream, num_streams)
        samples = self._samples_of(idx, handler)
        if self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, _TAG_BUFFER, pass_index, stream))
            samples = _shuffle(iter(samples), bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
        return iter(samples)

    def _samples_of(self, shard_indices: list[int], handler: CorruptionCounter) -> Iterator[dict]:
        """Raw samples of these shards in order; a shard that ends early is reported like any corruption.

        Why the count: a tar cut at a member boundary reads as a shorter, valid archive (tarfile takes the
        missing header for the end), so only the sample count known from _info.json reveals it.
        """
        for i in shard_indices:
            url, expected = self.shards.urls[i], self.shards.shard_lengths[i]
            opened = url_opener(iter([{"url": url}]), handler=handler)
            count = 0
            members = tar_members(opened, handler, self.max_sample_bytes)
            for sample in group_by_keys(members, handler=handler):
                count += 1
                yield sample
            if count < expected:
                handler(ValueError(f"{url}: read {count} of its {expected} samples; the shard is truncated or "
                                   f"damaged"))

    def _prepare(self, sample: dict, sample_seed: int) -> tuple[Any, Any]:
        """One raw sample -> (uint8 crop, or checked JPEG bytes when decoding on the device; label or labels)."""
        if self.transform is None:
            data, label = split_sample(sample, self.multi_label)
            check_jpeg_header(data, self.max_pixels)
        else:
            image, label = decode_sample(sample, self.multi_label, self.max_pixels)
        if self.num_classes is not None:
            bad = [k for k in (label if self.multi_label else [label]) if not 0 <= k < self.num_classes]
            if bad:
                raise ValueError(f"label {bad[0]} outside 0..{self.num_classes - 1}")
        if self.transform is None:
            return data, label
        # Only the CPU generator (the transforms run on CPU tensors): torch.manual_seed would also queue lazy
        # CUDA/XPU/MTIA seeding with a formatted stack trace each time, ~0.8 ms per image.
        torch.default_generator.manual_seed(sample_seed)
        return self.transform(image), label

    def _collate(self, items: list, labels: list, seeds: list[int], mix_seed: int) -> dict:
        targets = pad_labels(labels) if self.multi_label else torch.tensor(labels, dtype=torch.int64)
        batch = {"labels": targets, "mix_seed": mix_seed}
        if self.transform is None:
            batch["jpeg"], batch["jpeg_offsets"] = pack_jpegs(items)
            batch["seeds"] = torch.tensor(seeds, dtype=torch.int64)
        else:
            batch["images"] = default_collate(items)  # stacks straight into shared memory in a worker
        return batch

    def __iter__(self):
        info = get_worker_info()
        slot = info.id if info is not None else 0
        worker = (slot + self.worker_offset) % self.num_workers
        stream = self.rank * self.num_workers + worker
        pos = StreamPosition.from_dict(self.positions[worker]) if worker in self.positions else StreamPosition()
        handler = CorruptionCounter(f"rank {self.rank} worker {worker}")
        handler.count = pos.corrupt
        if info is None:
            # Loading in the training process: the per-sample seeding must not touch the trainer's RNG. A
            # fork_rng around this generator would not do it (the trainer runs between the yields), so the
            # trainer's CPU RNG state is taken when the generator resumes and put back before each yield.
            batches = self._batches(stream, worker, pos, handler)
            while True:
                trainer_rng = torch.get_rng_state()
                try:
                    batch = next(batches)
                finally:
                    torch.set_rng_state(trainer_rng)
                yield batch
        else:
            yield from self._batches(stream, worker, pos, handler)

    def _batches(self, stream: int, worker: int, pos: StreamPosition, handler: CorruptionCounter):
        items, labels, seeds = [], [], []
        first = None  # (pass, offset) of the batch's first sample: seeds MixUp/CutMix
        empty_passes = 0
        pass_index, skip = pos.pass_index, pos.offset
        while True:
            raw = self._raw_pass(pass_index, stream, handler)
            offset = 0
            got_any = False
            if skip:
                handler.silent = True  # these samples were counted before the checkpoint
                for _ in raw:
                    offset += 1
                    if offset == skip:
                        break
                handler.silent = False
                got_any = offset > 0
                skip = 0
            for sample in raw:
                offset += 1
                got_any = True
                sample_seed = derive_seed(self.seed, _TAG_SAMPLE, pass_index, stream, offset)
                try:
                    item, label = self._prepare(sample, sample_seed)
                except Exception as exn:  # a bad JPEG or label: skip it, count it, carry on
                    exn.args = exn.args + (f"sample {sample.get('__key__')} of {sample.get('__url__')}",)
                    handler(exn)
                    continue
                if first is None:
                    first = (pass_index, offset)
                items.append(item)
                labels.append(label)
                seeds.append(sample_seed)
                if len(items) == self.micro_batch_size:
                    mix_seed = derive_seed(self.seed, _TAG_MIX, first[0], stream, first[1])
                    batch = self._collate(items, labels, seeds, mix_seed)
                    batch.update(worker=worker, position=StreamPosition(pass_index, offset, handler.count).to_dict())
                    yield batch
                    items, labels, seeds, first = [], [], [], None
            empty_passes = 0 if got_any else empty_passes + 1
            if empty_passes > self.world_size * self.num_workers + 1:
                raise RuntimeError(f"stream {stream} read no samples in {empty_passes} passes: every shard of "
                                   f"{len(self.shards.urls)} is unreadable")
            pass_index += 1


class TrainLoader:
    """The rank's training batches plus the bookkeeping that makes them resumable.

    Yields (images float32 normalised NCHW on `device`, targets on `device`: int64 labels, or soft (B, C)
    float with MixUp/CutMix; with `multi_label`, multi-hot float (B, num_classes), mixed by MixUp/CutMix).
    Workers ship uint8; normalisation, MixUp/CutMix and with decode="gpu" the JPEG decode and augmentation
    run here on `device` (pipeline.data.device_augment). decode="gpu" runs on any device given (the tests use the
    CPU); build_train_loader refuses it without CUDA.

    `state_dict()` -> {"layout": ..., "batches": micro-batches consumed, "positions": {worker: position}}.
    """

    def __init__(self, shards: ShardSet, *, seed: int, rank: int, world_size: int, num_workers: int,
                 micro_batch_size: int, image_size, randaugment_layers: int = 2, randaugment_magnitude: int = 15,
                 min_crop_scale: float = 0.08,
                 mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, num_classes: Optional[int] = None,
                 shuffle_buffer: int = 1000, state: Optional[dict] = None, pin_memory: bool = False,
                 prefetch_factor: int = 4, device: Optional[torch.device] = None, decode: str = "cpu",
                 multi_label: bool = False, worker_start: str = "fork", max_sample_bytes: int = MAX_SAMPLE_BYTES,
                 max_pixels: int = MAX_PIXELS, max_corrupt_fraction: float = 1.0):
        from pipeline.data.batch_augment import BatchedTrainAugment
        from pipeline.data.transforms import MultiHotMix, batch_mix_transform, train_transform

        if multi_label and not num_classes:
            raise ValueError("multi-label targets need num_classes (the width of the multi-hot vectors)")
        self.layout = {"seed": seed, "rank": rank, "world_size": world_size, "num_workers": num_workers,
                       "micro_batch_size": micro_batch_size, "num_shards": len(shards.urls)}
        self.shards = shards
        self.batches = 0
        self.micro_batch_size, self.max_corrupt_fraction = micro_batch_size, max_corrupt_fraction
        self.positions: dict[int, dict] = {}
        worker_offset = self._restore(state, num_workers)
        # data.max_corrupt_fraction judges this launch's reading only: a restored count (all of it on worker 0
        # after a layout change) over no batches yet would stop every resume of a long run.
        self._launch_counts = (self.corrupt_count, self.batches)
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode must be cpu or gpu, got {decode!r}")
        self.device = torch.device(device or "cpu")
        augment = dict(randaugment_layers=randaugment_layers, randaugment_magnitude=randaugment_magnitude,
                       scale=(min_crop_scale, 1.0))
        on_device = BatchedTrainAugment(image_size, **augment) if decode == "gpu" else None
        if multi_label:
            mix = MultiHotMix(mixup_alpha, cutmix_alpha) if mixup_alpha > 0 or cutmix_alpha > 0 else None
        else:
            mix = batch_mix_transform(num_classes, mixup_alpha, cutmix_alpha) if num_classes else None
        self.finish = DeviceBatch(self.device, mix=mix, transform=on_device,
                                  num_classes=num_classes if multi_label else None)
        self.dataset = TrainStream(
            shards, seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
            micro_batch_size=micro_batch_size,
            transform=train_transform(image_size, **augment, normalize=False) if decode == "cpu" else None,
            shuffle_buffer=shuffle_buffer, positions=self.positions, worker_offset=worker_offset,
            num_classes=num_classes, multi_label=multi_label, max_sample_bytes=max_sample_bytes,
            max_pixels=max_pixels)
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs = dict(num_workers=num_workers, worker_init_fn=worker_init, prefetch_factor=prefetch_factor,
                          persistent_workers=False, multiprocessing_context=worker_start)
        if decode == "cpu" and rank == 0:
            log.info("input pipeline: uint8 batches, at most %.2f GB of shared memory per rank (%d workers x "
                     "prefetch %d + 2 batches of %d images)", shared_memory_bytes(
                         num_workers, prefetch_factor, micro_batch_size, image_size) / 1e9,
                     num_workers, prefetch_factor, micro_batch_size)
        # Its own generator: starting the workers must not draw from the trainer's global RNG (exact resume).
        self.loader = DataLoader(self.dataset, batch_size=None, pin_memory=pin_memory,
                                 generator=torch.Generator().manual_seed(seed), **kwargs)
        self._iter = self._ahead = None

    def _restore(self, state: Optional[dict], num_workers: int) -> int:
        """Take the saved positions (same layout) or restart at the next pass (changed layout); returns the
        DataLoader worker whose turn comes first."""
        if not state:
            return 0
        if state.get("layout") == self.layout:
            self.batches = int(state["batches"])
            self.positions = {int(k): v for k, v in state["positions"].items()}
            return self.batches % max(1, num_workers)
        # Different world size / workers / batch: the old streams cannot continue. Start all streams at the
        # pass after the furthest one seen, so no data is replayed immediately.
        passes = [int(p["pass"]) for p in state.get("positions", {}).values()] or [-1]
        corrupt = sum(int(p.get("corrupt", 0)) for p in state.get("positions", {}).values())
        nxt = max(passes) + 1
        self.positions = {w: {"pass": nxt, "offset": 0, "corrupt": corrupt if w == 0 else 0}
                          for w in range(max(1, num_workers))}
        log.warning("data layout changed (%s -> %s): streams restart at pass %d", state.get("layout"),
                    self.layout, nxt)
        return 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None:
            self._iter, self._ahead = iter(self.loader), None
        batch, pending = self._ahead or self._launch_next()
        # data.decode=gpu on CUDA: batch N+1's decode and augmentation start on the side stream now and overlap
        # batch N's step. Its position is only committed when it is handed out, so a checkpoint resumes at it.
        self._ahead = self._launch_next() if self.finish.stream is not None else None  # the stream is endless
        self.batches += 1
        self.positions[int(batch["worker"])] = batch["position"]
        if self.layout["world_size"] == 1:  # several ranks: the trainer judges the sum at log steps, on every rank
            check_corrupt_fraction(*self.read_since_launch(), self.max_corrupt_fraction)
        return pending.wait()

    def _launch_next(self):
        batch = next(self._iter)
        return batch, self.finish.launch(batch)

    def read_since_launch(self) -> tuple[int, int]:
        """(samples skipped, samples read) by this rank since this launch started."""
        corrupt = self.corrupt_count - self._launch_counts[0]
        return corrupt, corrupt + (self.batches - self._launch_counts[1]) * self.micro_batch_size

    @property
    def corrupt_count(self) -> int:
        return sum(int(p.get("corrupt", 0)) for p in self.positions.values())

    def state_dict(self) -> dict:
        return {"layout": dict(self.layout), "batches": self.batches,
                "positions": {str(k): dict(v) for k, v in self.positions.items()}}

    def close(self) -> None:
        self._iter = self._ahead = None  # drops the worker processes


def multi_hot_targets(cfg, shards: ShardSet) -> bool:
    """Whether the train split trains on multi-hot targets (a multi-label split with loss.type=sigmoid).

    A multi-label split under softmax is refused in one line unless data.first_label_only says to train on
    each image's first label (the split is then read as single-label: `.cls`). The trainer asks this before
    any process group exists.
    """
    if not shards.multi_label or cfg.data.first_label_only:
        return False
    if cfg.loss.type != "sigmoid":
        raise UserError(f"{cfg.data.train} [{cfg.data.train_split}] is a multi-label split, but loss.type="
                        f"{cfg.loss.type} trains on one label per image; set loss.type=sigmoid (multi-hot targets) "
                        f"or data.first_label_only=true (softmax on each image's first label)")
    return True


def loader_state_for_rank(saved: dict[str, dict], rank: int, world_size: int) -> dict:
    """The loader state this rank starts from, given every rank's saved loader state ({"<rank>": state}).

    Same world size: this rank's own state (the loader continues its streams, or restarts them itself when
    its layout changed). A different world size: all ranks' positions in one layout-less state, so the
    loader restarts every stream after the furthest pass seen; the corrupt-sample count stays on rank 0.
    """
    if len(saved) == world_size and str(rank) in saved:
        return saved[str(rank)]
    positions = {f"{r}.{w}": dict(p) for r, s in saved.items() for w, p in s["positions"].items()}
    if rank != 0:
        for p in positions.values():
            p["corrupt"] = 0
    return {"layout": None, "positions": positions}


def build_train_loader(cfg, shards: ShardSet, rank: int, world_size: int, num_classes: int,
                       state: Optional[dict] = None, pin_memory: bool = False,
                       device: Optional[torch.device] = None) -> TrainLoader:
    """The TrainLoader for a pipeline Config (see pipeline.config.DataConfig), resumed from `state`: every
    rank's saved loader state ({"<rank>": state}, as checkpoints hold it), regrouped here when the world size
    changed (`loader_state_for_rank`).

    Raises UserError (one line) for data.decode=gpu on a rank without a CUDA device, and for a multi-label
    split under softmax without data.first_label_only (`multi_hot_targets`).
    """
    d = cfg.data
    device = device or torch.device("cpu")
    check_decode(d.decode, device)
    multi_label = multi_hot_targets(cfg, shards)
    # The workers start once per launch (the stream runs over every pass), after NCCL, the watchdog and the
    # TensorBoard writer have started their threads: on GPUs from a forkserver (see DataConfig.worker_start).
    worker_start = d.worker_start if d.worker_start != "auto" else "forkserver" if device.type == "cuda" else "fork"
    return TrainLoader(shards, seed=cfg.seed, rank=rank, world_size=world_size, num_workers=d.num_workers,
                       micro_batch_size=cfg.train.micro_batch_size, image_size=cfg.image_hw,
                       randaugment_layers=d.randaugment_layers, randaugment_magnitude=d.randaugment_magnitude,
                       min_crop_scale=d.multi_label_min_crop_scale if multi_label else d.min_crop_scale,
                       mixup_alpha=d.mixup_alpha, cutmix_alpha=d.cutmix_alpha,
                       num_classes=num_classes, shuffle_buffer=d.shuffle_buffer,
                       state=None if state is None else loader_state_for_rank(state, rank, world_size),
                       pin_memory=pin_memory, prefetch_factor=d.prefetch_factor, device=device, decode=d.decode,
                       multi_label=multi_label, worker_start=worker_start, max_sample_bytes=d.max_sample_bytes,
                       max_pixels=d.max_pixels, max_corrupt_fraction=d.max_corrupt_fraction)

"""The streams of one rank's training samples: shard order per pass, shuffle, seeds, positions, and the draw
from a weighted mixture of sources. The design (why it resumes exactly) is in pipeline.data.loader's docstring;
the mixture's schedule in pipeline.data.mixture.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import group_by_keys, url_opener

from pipeline.data.corrupt import CorruptionCounter
from pipeline.data.device_augment import pack_jpegs
from pipeline.data.mixture import MixtureSchedule
from pipeline.data.shards import (MAX_PIXELS, MAX_SAMPLE_BYTES, ShardSet, check_jpeg_header, decode_sample, pad_labels,
                                  split_sample, tar_members)

# ------------------------------------------------------------------------------------- seeds and streams
def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers given (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


_TAG_SHARDS, _TAG_BUFFER, _TAG_SAMPLE, _TAG_MIX, _TAG_SOURCE = 1, 2, 3, 4, 6  # 5: pipeline.data.mixture


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



@dataclass
class _Item:
    """One good sample of a source's stream, prepared, with the stream position just after it."""
    item: Any
    label: Any
    seed: int
    pass_index: int
    offset: int


@dataclass
class MixturePlan:
    """Where a rank's micro-batches fall in the run's global sample positions (pipeline.data.mixture): the
    position the launch starts at (samples seen), and the batch geometry that numbers the rest."""
    start: int
    accumulation: int


class TrainStream(IterableDataset):
    """Infinite, deterministic stream of uint8 micro-batches for one rank.

    Yields dicts {"labels": int64 (B,) (`multi_label`: (B, L), each image's labels padded with -1),
    "mix_seed": the batch's MixUp/CutMix seed, "worker": logical worker,
    "position": StreamPosition dict after the batch} plus, with `transform` (data.decode=cpu),
    "images": uint8 (B, 3, H, W); without (data.decode=gpu), "jpeg"/"jpeg_offsets" (pack_jpegs) and "seeds":
    int64 (B,), each sample's augmentation seed, for pipeline.data.device_augment.augment_on_device.
    A mixture (`shards.mixture`, with `mixture_plan`) adds "sources": int64 (B,), each sample's source index,
    and its position is {"corrupt": total, "sources": {name: StreamPosition dict}}.
    """

    def __init__(self, shards: ShardSet, *, seed: int, rank: int, world_size: int, num_workers: int,
                 micro_batch_size: int, transform: Optional[Callable], shuffle_buffer: int = 1000,
                 positions: Optional[dict[int, dict]] = None, worker_offset: int = 0,
                 num_classes: Optional[int] = None, multi_label: bool = False,
                 max_sample_bytes: int = MAX_SAMPLE_BYTES, max_pixels: int = MAX_PIXELS,
                 mixture_plan: Optional[MixturePlan] = None):
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
        if shards.mixture and mixture_plan is None:
            raise ValueError("a mixture of sources needs a mixture_plan (where the rank's batches fall)")
        self.mixture_plan = mixture_plan if shards.mixture else None

    # -- raw samples of one pass of one stream, shuffled, undecoded
    def _raw_pass(self, shards: ShardSet, seed: int, pass_index: int, stream: int,
                  handler: CorruptionCounter) -> Iterator[dict]:
        num_streams = self.world_size * self.num_workers
        idx = shards_of_pass(seed, pass_index, len(shards.urls), stream, num_streams)
        samples = self._samples_of(shards, idx, handler)
        if self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(seed, _TAG_BUFFER, pass_index, stream))
            samples = _shuffle(iter(samples), bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
        return iter(samples)

    def _samples_of(self, shards: ShardSet, shard_indices: list[int], handler: CorruptionCounter) -> Iterator[dict]:
        """Raw samples of these shards in order; a shard that ends early is reported like any corruption.

        Why the count: a tar cut at a member boundary reads as a shorter, valid archive (tarfile takes the
        missing header for the end), so only the sample count known from _info.json reveals it.
        """
        for i in shard_indices:
            url, expected = shards.urls[i], shards.shard_lengths[i]
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
        batches = self._mixed_batches(slot) if self.mixture_plan is not None else self._batches(slot)
        if info is None:
            # Loading in the training process: the per-sample seeding must not touch the trainer's RNG. A
            # fork_rng around this generator would not do it (the trainer runs between the yields), so the
            # trainer's CPU RNG state is taken when the generator resumes and put back before each yield.
            while True:
                trainer_rng = torch.get_rng_state()
                try:
                    batch = next(batches)
                finally:
                    torch.set_rng_state(trainer_rng)
                yield batch
        else:
            yield from batches

    def _items(self, shards: ShardSet, seed: int, stream: int, pos: StreamPosition,
               handler: CorruptionCounter) -> Iterator[_Item]:
        """The good samples of one source's stream from `pos` on, prepared, over pass after pass (endless)."""
        empty_passes = 0
        pass_index, skip = pos.pass_index, pos.offset
        while True:
            raw = self._raw_pass(shards, seed, pass_index, stream, handler)
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
                sample_seed = derive_seed(seed, _TAG_SAMPLE, pass_index, stream, offset)
                try:
                    item, label = self._prepare(sample, sample_seed)
                except Exception as exn:  # a bad JPEG or label: skip it, count it, carry on
                    exn.args = exn.args + (f"sample {sample.get('__key__')} of {sample.get('__url__')}",)
                    handler(exn)
                    continue
                yield _Item(item, label, sample_seed, pass_index, offset)
            empty_passes = 0 if got_any else empty_passes + 1
            if empty_passes > self.world_size * self.num_workers + 1:
                raise RuntimeError(f"stream {stream} read no samples in {empty_passes} passes: every shard of "
                                   f"{len(shards.urls)} is unreadable")
            pass_index += 1

    def _worker(self, slot: int) -> tuple[int, int]:
        worker = (slot + self.worker_offset) % self.num_workers
        return worker, self.rank * self.num_workers + worker

    def _batches(self, slot: int):
        """One source: micro-batches of the next good samples; positions as StreamPosition dicts."""
        worker, stream = self._worker(slot)
        pos = StreamPosition.from_dict(self.positions[worker]) if worker in self.positions else StreamPosition()
        handler = CorruptionCounter(f"rank {self.rank} worker {worker}")
        handler.count = pos.corrupt
        items = self._items(self.shards, self.seed, stream, pos, handler)
        while True:
            chunk = [next(items) for _ in range(self.micro_batch_size)]
            first, last = chunk[0], chunk[-1]
            mix_seed = derive_seed(self.seed, _TAG_MIX, first.pass_index, stream, first.offset)
            batch = self._collate([c.item for c in chunk], [c.label for c in chunk], [c.seed for c in chunk], mix_seed)
            batch.update(worker=worker, position=StreamPosition(last.pass_index, last.offset, handler.count).to_dict())
            yield batch

    def _mixed_batches(self, slot: int):
        """A mixture: each slot of a micro-batch takes the next good sample of the source the schedule gives
        its global position; every source keeps its own stream (seeded by its index), position and count."""
        worker, stream = self._worker(slot)
        plan, micro = self.mixture_plan, self.micro_batch_size
        sources = self.shards.mixture
        schedule = MixtureSchedule([src.weight for src, _ in sources], self.seed)
        saved = self.positions.get(worker, {}).get("sources", {})
        positions = [StreamPosition.from_dict(saved[src.name]) if src.name in saved else StreamPosition()
                     for src, _ in sources]
        handlers = [CorruptionCounter(f"rank {self.rank} worker {worker} source {src.name}") for src, _ in sources]
        for handler, pos in zip(handlers, positions):
            handler.count = pos.corrupt  # a generator reads nothing between pulls: the count at its last sample
        streams = [self._items(shards, derive_seed(self.seed, _TAG_SOURCE, i), stream, pos, handler)
                   for i, ((_, shards), pos, handler) in enumerate(zip(sources, positions, handlers))]
        per_step = self.world_size * micro
        for j in itertools.count():
            k = j * self.num_workers + slot  # this launch's k-th micro-batch of the rank (DataLoader round robin)
            step, micro_step = divmod(k, plan.accumulation)
            first = plan.start + step * per_step * plan.accumulation + micro_step * per_step + self.rank * micro
            picks = schedule.sources(first, micro)
            chunk = []
            for s in picks:
                got = next(streams[s])
                positions[s] = StreamPosition(got.pass_index, got.offset, handlers[s].count)
                chunk.append(got)
            batch = self._collate([c.item for c in chunk], [c.label for c in chunk], [c.seed for c in chunk],
                                  derive_seed(self.seed, _TAG_MIX, first))
            batch.update(worker=worker, sources=torch.from_numpy(picks),
                         position={"corrupt": sum(p.corrupt for p in positions),
                                   "sources": {src.name: p.to_dict() for (src, _), p in zip(sources, positions)}})
            yield batch

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
* Mixtures. With `data.train` a weighted list of sources (pipeline.data.sources), each source has its own
  streams and positions as above (keyed by its name), and each slot of a micro-batch takes its source from
  a seeded schedule over the run's global sample positions (pipeline.data.mixture), so the draws per source
  are a function of the samples seen, the same on any world size. The streams live in pipeline.data.stream.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from pipeline.data.corrupt import check_corrupt_fraction
from pipeline.data.device_augment import DeviceBatch, check_decode, shared_memory_bytes
from core.errors import UserError
from pipeline.data.mixture import restart_positions
from pipeline.data.sources import describe
from pipeline.data.shards import MAX_PIXELS, MAX_SAMPLE_BYTES, ShardSet, worker_init
from pipeline.data.stream import (MixturePlan, StreamPosition, TrainStream, derive_seed,  # noqa: F401 (re-exported)
                                  shards_of_pass)

log = logging.getLogger("pipeline.data.loader")


class TrainLoader:
    """The rank's training batches plus the bookkeeping that makes them resumable.

    Yields (images float32 normalised NCHW on `device`, targets on `device`: int64 labels, or soft (B, C)
    float with MixUp/CutMix; with `multi_label`, multi-hot float (B, num_classes), mixed by MixUp/CutMix).
    Workers ship uint8; normalisation, MixUp/CutMix and with decode="gpu" the JPEG decode and augmentation
    run here on `device` (pipeline.data.device_augment). decode="gpu" runs on any device given (the tests use the
    CPU); build_train_loader refuses it without CUDA.

    `state_dict()` -> {"layout": ..., "batches": micro-batches consumed, "positions": {worker: position}}, and
    for a mixture (`shards.mixture`) "drawn": {source name: samples this rank drew from it}. A mixture needs
    `mixture_plan` (where the rank's micro-batches fall in the run's global sample positions).
    """

    def __init__(self, shards: ShardSet, *, seed: int, rank: int, world_size: int, num_workers: int,
                 micro_batch_size: int, image_size, randaugment_layers: int = 2, randaugment_magnitude: int = 15,
                 min_crop_scale: float = 0.08,
                 mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, num_classes: Optional[int] = None,
                 shuffle_buffer: int = 1000, state: Optional[dict] = None, pin_memory: bool = False,
                 prefetch_factor: int = 4, device: Optional[torch.device] = None, decode: str = "cpu",
                 multi_label: bool = False, worker_start: str = "fork", max_sample_bytes: int = MAX_SAMPLE_BYTES,
                 max_pixels: int = MAX_PIXELS, max_corrupt_fraction: float = 1.0,
                 mixture_plan: Optional[MixturePlan] = None):
        from pipeline.data.batch_augment import BatchedTrainAugment
        from pipeline.data.transforms import MultiHotMix, batch_mix_transform, train_transform

        if multi_label and not num_classes:
            raise ValueError("multi-label targets need num_classes (the width of the multi-hot vectors)")
        self.layout = {"seed": seed, "rank": rank, "world_size": world_size, "num_workers": num_workers,
                       "micro_batch_size": micro_batch_size, "num_shards": len(shards.urls)}
        self.source_names = [src.name for src, _ in shards.mixture] if shards.mixture else None
        if self.source_names:  # other sources or weights: another schedule, so the streams restart
            self.layout["sources"] = [[src.name, src.weight] for src, _ in shards.mixture]
        self.drawn = [0] * len(self.source_names or [])
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
            max_pixels=max_pixels, mixture_plan=mixture_plan)
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
        drawn = state.get("drawn") or {}
        self.drawn = [int(drawn.get(name, 0)) for name in self.source_names or []]
        if state.get("layout") == self.layout:
            self.batches = int(state["batches"])
            self.positions = {int(k): v for k, v in state["positions"].items()}
            return self.batches % max(1, num_workers)
        # Different world size / workers / batch: the old streams cannot continue. Start all streams at the
        # pass after the furthest one seen, so no data is replayed immediately.
        self.positions = restart_positions(state.get("positions", {}).values(), num_workers, self.source_names)
        log.warning("data layout changed (%s -> %s): streams restart at the pass after the furthest one read",
                    state.get("layout"), self.layout)
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
        if self.source_names:
            for s, n in enumerate(torch.bincount(batch["sources"], minlength=len(self.drawn)).tolist()):
                self.drawn[s] += n
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
        out = {"layout": dict(self.layout), "batches": self.batches,
               "positions": {str(k): dict(v) for k, v in self.positions.items()}}
        if self.source_names:
            out["drawn"] = dict(zip(self.source_names, self.drawn))
        return out

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
        raise UserError(f"{describe(cfg.data.train)} [{cfg.data.train_split}] is a multi-label split, but loss.type="
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
    drawn: dict[str, int] = {}
    for s in saved.values():  # the draws so far, all on rank 0: the run's fraction per source goes on from them
        for name, n in (s.get("drawn") or {}).items():
            drawn[name] = drawn.get(name, 0) + int(n) if rank == 0 else 0
    if rank != 0:
        for p in positions.values():
            p["corrupt"] = 0
            for q in (p.get("sources") or {}).values():
                q["corrupt"] = 0
    return {"layout": None, "positions": positions, "drawn": drawn}


def build_train_loader(cfg, shards: ShardSet, rank: int, world_size: int, num_classes: int,
                       state: Optional[dict] = None, pin_memory: bool = False,
                       device: Optional[torch.device] = None, samples_seen: int = 0) -> TrainLoader:
    """The TrainLoader for a pipeline Config (see pipeline.config.DataConfig), resumed from `state`: every
    rank's saved loader state ({"<rank>": state}, as checkpoints hold it), regrouped here when the world size
    changed (`loader_state_for_rank`). `samples_seen` (the run's, at the step it starts from) places a
    mixture's batches in its schedule (pipeline.data.mixture).

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
                       max_pixels=d.max_pixels, max_corrupt_fraction=d.max_corrupt_fraction,
                       mixture_plan=MixturePlan(samples_seen, cfg.train.global_batch_size // (
                           cfg.train.micro_batch_size * world_size)) if shards.mixture else None)

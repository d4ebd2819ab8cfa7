"""What a shard job is asked to do (ShardConfig) and what it reports (JobResult)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from core.storage import Location

from data_prep.images import MAX_BYTES, ImageOptions
from data_prep.limits import Limits
from data_prep.near_dup.hashing import NEAR_DISTANCE


@dataclass(frozen=True)
class ShardConfig:
    src: Location                        # a Path, or an object-store URL string (core.storage.as_location)
    out: Location
    split: str = "train"
    source: str = "auto"                 # auto | folder | tars | manifest | openimages | webdataset | parquet
    classes_file: Path | None = None
    images: Path | None = None           # OpenImages: the folder holding <ImageID>.jpg
    label_field: str | None = None       # webdataset/parquet sources: JSON key, member extension or column
    label_map: Path | None = None        # webdataset/parquet sources: raw label -> class name
    shard_size: int = 1000
    seed: int = 0
    max_size: int = 256
    max_aspect: float = 4.0
    quality: int = 90
    max_pixels: int = 89_478_485
    max_bytes: int = MAX_BYTES
    strip_metadata: bool = False
    max_label_bytes: int = Limits.max_label_bytes
    max_labels: int = Limits.max_labels
    max_classes: int = Limits.max_classes
    max_row_group_bytes: int = Limits.max_row_group_bytes
    dedup: bool = False
    exclude_near: tuple = ()             # evaluation sets (any SRC kind, our shards): near copies are rejected
    near_distance: int = NEAR_DISTANCE   # --exclude-near: largest Hamming distance of two 64-bit hashes
    workers: int | None = None
    ray_address: str | None = None
    overwrite: bool = False
    progress: bool = True
    list_in_parts: bool = True           # tars/webdataset/parquet listed by Ray tasks, resumable (False: in
                                         # the driver, one process: the baseline tests and benchmarks compare to)

    def image_options(self) -> ImageOptions:
        return ImageOptions(max_size=self.max_size, max_aspect=self.max_aspect, quality=self.quality,
                            max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                            max_row_group_bytes=self.max_row_group_bytes, strip_metadata=self.strip_metadata)

    def limits(self) -> Limits:
        return Limits(max_bytes=self.max_bytes, max_label_bytes=self.max_label_bytes, max_labels=self.max_labels,
                      max_classes=self.max_classes, max_row_group_bytes=self.max_row_group_bytes)

    def output_options(self, kind: str) -> dict:
        """Every option that changes the output bytes: a different value means a different job."""
        return {"split": self.split, "source": kind, "shard_size": self.shard_size, "seed": self.seed,
                "dedup": self.dedup, **self.image_options().fingerprint_options(),
                **self.limits().fingerprint_options()}  # the class list is in the input fingerprint


@dataclass
class JobResult:
    split: str
    num_samples: int
    num_shards: int
    resumed_shards: int
    rejected: int
    duplicates: int
    bytes: int
    seconds: float
    phases: dict           # seconds per phase: list, ray_start, scan, write
    nodes: dict
    task_cpu_seconds: float = 0.0  # CPU time of the shard-writing tasks (not resumed ones)
    up_to_date: bool = False

    @property
    def images_per_s(self) -> float:
        return self.num_samples / self.seconds if self.seconds > 0 else 0.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

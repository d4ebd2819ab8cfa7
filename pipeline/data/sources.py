"""`data.train` as every reader sees it: one shard location, or a weighted mixture of named sources.

    data:
      train:
        - {path: shards/jft, weight: 3, name: web}
        - {path: s3://bucket/shards/imagenet-21k, weight: 1, name: in21k}

`train_sources(value)` checks the value (one-line UserError per bad entry; the config calls it before any
heavy import, so this module imports nothing heavy at the top). `open_train(value, split)` opens every source
and returns ONE ShardSet: sizes summed, the class list all sources share (refused in one line otherwise), and
for two or more sources `ShardSet.mixture`, which the train stream draws from (pipeline.data.mixture). So the
planner, the trainer's class counts and evaluation read a mixture like a single folder, through this one call.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from core.errors import UserError

_KEYS = ("path", "weight", "name")
MAX_SOURCES = 256  # the schedule's block is k x k positions: 65,536 at most
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # a TensorBoard tag part: data/source_fraction/<name>


@dataclass(frozen=True)
class TrainSource:
    """One source of the training mixture: where its shards are, its weight, and the name metrics use."""
    name: str
    path: str
    weight: float


def default_name(path: str) -> str:
    """A source's name when none is given: its folder's name (for a pattern, the folder holding the shards)."""
    parts = [p for p in re.split(r"[/\\]", str(path)) if p and not p.endswith(":")]
    while parts and ("{" in parts[-1] or parts[-1].endswith(".tar")):
        parts.pop()
    return re.sub(r"[^A-Za-z0-9_.-]", "_", parts[-1] if parts else "source")[:64] or "source"


def train_sources(value: Any, key: str = "data.train") -> list[TrainSource]:
    """The sources `data.train` names, checked: a path string is one source of weight 1; a list holds mappings
    {path, weight (> 0, default 1), name (default: the folder's name)} or plain path strings."""
    if isinstance(value, str):
        if value.lstrip().startswith(("[", "{")):  # an override whose YAML did not parse arrives as its text
            raise UserError(f"{key}={value!r} is not a valid YAML list; quote each path that holds braces, e.g. "
                            f"[{{path: \"s/train-{{000000..000009}}.tar\", weight: 3}}]")
        return [TrainSource(default_name(value), value, 1.0)]
    if not isinstance(value, list) or not value:
        raise UserError(f"{key} must be a shard location or a non-empty list of {{path, weight, name}}, got {value!r}")
    if len(value) > MAX_SOURCES:
        raise UserError(f"{key} lists {len(value)} sources, more than {MAX_SOURCES}; merge some into one folder")
    out: list[TrainSource] = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        entry = {"path": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            raise UserError(f"{where} must be a mapping {{path, weight, name}} or a path, got {entry!r}")
        unknown = [k for k in entry if k not in _KEYS]
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})")
        path = entry.get("path")
        if not isinstance(path, str) or not path.strip():
            raise UserError(f"{where} has no path: give each source `path: <shard folder or pattern>`")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight <= 0:
            raise UserError(f"{where}.weight must be a number > 0, got {weight!r}")
        name = entry.get("name")
        name = default_name(path) if name is None else name
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserError(f"{where}.name must be 1-64 of A-Z a-z 0-9 _ . -, got {name!r}")
        twin = next((j for j, s in enumerate(out) if s.name == name), None)
        if twin is not None:
            raise UserError(f"{where} and {key}[{twin}] are both named {name!r}; give each source its own `name:`")
        out.append(TrainSource(name, path, float(weight)))
    return out


def first_path(value: Any) -> str:
    """The first source's location: for readers that need one folder (e.g. where the planner finds _info.json)."""
    return train_sources(value)[0].path


def describe(value: Any) -> str:
    """data.train for a message: the path, or the sources' names and paths."""
    sources = train_sources(value)
    return sources[0].path if isinstance(value, str) else ", ".join(f"{s.name}={s.path}" for s in sources)


def _check_same_classes(a: TrainSource, sa, b: TrainSource, sb) -> None:
    if sa.multi_label != sb.multi_label:
        raise UserError(f"data.train: source {b.name!r} ({b.path}) is {'multi' if sb.multi_label else 'single'}-label "
                        f"but {a.name!r} ({a.path}) is not; mix splits of one kind")
    ca, cb = sa.classes, sb.classes
    if ca == cb:
        return
    if ca is None or cb is None:
        none = b if cb is None else a
        raise UserError(f"data.train: source {none.name!r} ({none.path}) records no class list (_info.json) but the "
                        f"others do; shard every source with the same --classes file")
    diff = next((i for i, (x, y) in enumerate(zip(ca, cb)) if x != y), min(len(ca), len(cb)))
    first_a = ca[diff] if diff < len(ca) else "<end>"
    first_b = cb[diff] if diff < len(cb) else "<end>"
    raise UserError(f"data.train: the classes of source {b.name!r} ({b.path}) differ from {a.name!r} ({a.path}) "
                    f"at class {diff}: {first_b!r} vs {first_a!r}; shard every source with the same --classes file")


def open_train(value: Any, split: str = "train"):
    """The train split of `data.train` as one ShardSet (see the module docstring); UserError in one line."""
    from pipeline.data.shards import ShardSet, open_shards

    sources = train_sources(value)
    opened = [open_shards(s.path, split) for s in sources]
    if len(sources) == 1:
        return opened[0]
    for src, shards in zip(sources[1:], opened[1:]):
        _check_same_classes(sources[0], opened[0], src, shards)
    total = sum(s.num_samples for s in opened)
    counts = None
    if all(s.class_counts for s in opened):  # the label prior the mixture draws: each source's, by its share
        weight = sum(s.weight for s in sources)
        counts = [round(sum(src.weight / weight * total * s.class_counts[c] / max(1, s.num_samples)
                            for src, s in zip(sources, opened))) for c in range(len(opened[0].class_counts))]
    return ShardSet([u for s in opened for u in s.urls], [n for s in opened for n in s.shard_lengths], total,
                    opened[0].classes, opened[0].multi_label, counts, mixture=list(zip(sources, opened)))


def source_line(shards) -> str:
    """The line logged at start: each source's weight share, size, and passes over it per epoch of the mixture."""
    weight = sum(src.weight for src, _ in shards.mixture)
    parts = [f"{src.name} {src.weight / weight:.1%} of {s.num_samples:,} images "
             f"({src.weight / weight * shards.num_samples / max(1, s.num_samples):.2f} passes per epoch)"
             for src, s in shards.mixture]
    return f"data mixture of {len(parts)} sources (an epoch is {shards.num_samples:,} images): " + "; ".join(parts)

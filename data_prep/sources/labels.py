"""Raw labels of packed sources (webdataset members, parquet cells) -> class names, and the lister result.

Label values are turned into class names by ``LabelResolver``; samples without a usable label are returned as
rejects (they reach rejects.jsonl), never dropped silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_prep.sources.class_map import ClassMapping
from data_prep.sources.manifests import load_label_map, sorted_classes


@dataclass
class Packed:
    """What a lister hands to sources.list_inputs (every kind; packed sources also judge rejects themselves)."""

    classes: list[str]
    rows: list[tuple] = field(default_factory=list)     # (id, labels tuple, location, offset, size, mtime)
    multi_label: bool = False
    rejects: list[tuple] = field(default_factory=list)  # (id, class name or None, reason, detail)
    dropped: int = 0                                    # multi-label: labels the map or class list did not know
    class_source: str = ""                              # where the class names came from, for messages


class LabelResolver:
    """Raw label values -> class names.

    * An int indexes the source's class names when the source has them (Hugging Face ClassLabel names in the
      parquet metadata; our own shards' _info.json); without them it is the class name "3". Text members
      (cls, txt) holding digits are ints; a JSON string is always a name.
    * ``--label-map`` then maps the names (or the int text); a name it does not map is unknown.
    * A list is a multi-label value: unknown labels are dropped and counted; nothing left is unknown_class.
    """

    def __init__(self, label_map: Path | ClassMapping | None):
        self.classes_map = label_map if isinstance(label_map, ClassMapping) else None
        if self.classes_map is not None:  # --classes as a mapping (class_map.py): ambiguous names left out
            self.map, self.map_name = self.classes_map.unique_map(), self.classes_map.where
        else:
            self.map = load_label_map(label_map) if label_map is not None else None
            self.map_name = f"--label-map {label_map}"
        self._positional: tuple = (None, None)  # (a source's names list, its classes by position): per file

    def _by_position(self, names: list[str] | None) -> list[str] | None:
        if self.classes_map is None or names is None:
            return None
        if self._positional[0] is not names:  # every sample of a file shares its names list: compared once
            self._positional = (names, self.classes_map.by_position(names))
        return self._positional[1]

    def names(self, raw, names: list[str] | None, names_from: str, hf: bool):
        """(kept names, dropped count, None) or (None, 0, (reason, detail))."""
        values = raw if isinstance(raw, list) else [raw]
        if not values:
            return None, 0, ("no_label", "empty label list")
        kept, unknown = [], []
        positional = self._by_position(names)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str)
                                                                                and not value.strip()):
                return None, 0, ("no_label", f"label {value!r} is not a class name or integer")
            if isinstance(value, int) and names is not None:
                if hf and value == -1:  # Hugging Face's "no label" (test splits)
                    return None, 0, ("no_label", "label -1 (no label)")
                if not 0 <= value < len(names):
                    unknown.append(f"{value} (not an index of the {len(names)} class names of {names_from})")
                    continue
                if positional is not None:  # the names list is the mapping's raw column: exact by index
                    kept.append(positional[value])
                    continue
                value = names[value]
            text = str(value).strip()
            if self.map is not None:
                if text not in self.map:
                    several = self.classes_map.ambiguous(text) if self.classes_map is not None else []
                    unknown.append(f"{text!r} (names {len(several)} classes in {self.map_name}: "
                                   f"{', '.join(several)})" if several else f"{text!r} (not in {self.map_name})")
                    continue
                text = self.map[text]
            kept.append(text)
        kept = list(dict.fromkeys(kept))
        if not kept:
            return None, 0, ("unknown_class", f"label {', '.join(unknown)}")
        return tuple(kept), len(unknown), None


def resolved(samples, resolver: LabelResolver, names: list[str] | None, names_from: str, out: Packed,
              early: list[tuple]):
    """Rows (id, class names tuple, location, offset, size, mtime) of `samples` (id, raw label, location,
    offset, size, mtime, hf), yielded as they come. Once they are exhausted `out` holds multi_label, dropped,
    the class list and the rejects: `early` (what the lister judged itself, complete by then) first, then the
    labels that resolve to no class."""
    late, found = [], set()
    for sample_id, raw, location, offset, size, mtime, hf in samples:
        out.multi_label |= isinstance(raw, list)
        kept, dropped, problem = resolver.names(raw, names, names_from, hf)
        if problem is not None:
            late.append((sample_id, None, *problem))
            continue
        out.dropped += dropped
        found.update(kept)
        yield (sample_id, kept, location, offset, size, mtime)
    out.rejects = [*early, *late]
    if names is not None and resolver.map is None:
        out.classes = list(names)  # the source's own order and complete list: class indices stay as they were
    else:
        out.classes = sorted_classes(found)

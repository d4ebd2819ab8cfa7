"""``--classes FILE`` as a mapping (raw name -> class name), so a source whose labels are other names than the
classes wanted shards onto them: Hugging Face's ImageNet-1K parquet names its classes "tench, Tinca tinca",
a 21K -> 1K fine-tune needs the synsets (n01440764) to copy head rows by name.

Formats (a plain list of class names is still ``manifests.load_class_file``):
  * ``LOC_synset_mapping.txt`` as the ILSVRC download ships it: every line ``<synset> <descriptive name>``
    ("n01440764 tench, Tinca tinca"); the synset maps to itself too, so synset-named folders shard alike;
  * a ``.csv`` or ``.tsv`` file of two columns ``raw,class`` (no header);
  * a ``.json`` object ``{"raw": "class", ...}`` (one without a "classes" key).
The classes, in this order, are the file's class column without repeats: class index = first appearance.

ImageNet names two classes alike ("crane": the bird n02012849 and the machine n03126707): a raw name that
maps to several classes is ambiguous. Where the source's own class names list *is* the mapping's raw column
in the same order (Hugging Face's ClassLabel names vs LOC_synset_mapping.txt: both in synset order), an
integer label maps by position, which is exact even for those; elsewhere an ambiguous name is an
'unknown_class' reject saying so.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError

from data_prep.sources.manifests import load_class_file, read_classes_text

_SYNSET_LINE = re.compile(r"^(n\d{8})\s+(\S.*)$")


@dataclass(frozen=True)
class ClassMapping:
    pairs: tuple[tuple[str, str], ...]          # (raw name, class name) in file order, as written
    where: str                                  # "--classes FILE", for messages
    extra: tuple[tuple[str, str], ...] = ()     # also mapped, not positions: a synset to itself
    targets: dict = field(default_factory=dict, compare=False)  # raw -> [classes]
    unique: dict = field(default_factory=dict, compare=False)   # raw -> class, the unambiguous raws

    def __post_init__(self):  # built once: they are looked up per listed row
        for raw, name in self.pairs + self.extra:
            if name not in self.targets.setdefault(raw, []):
                self.targets[raw].append(name)
        self.unique.update((raw, names[0]) for raw, names in self.targets.items() if len(names) == 1)

    @property
    def classes(self) -> list[str]:
        return list(dict.fromkeys(name for _raw, name in self.pairs))

    def unique_map(self) -> dict[str, str]:
        """raw -> class for every raw name that maps to exactly one class."""
        return dict(self.unique)

    def ambiguous(self, raw: str) -> list[str]:
        return self.targets.get(raw, []) if len(self.targets.get(raw, [])) > 1 else []

    def by_position(self, names: list[str] | None) -> list[str] | None:
        """The class of each index of a source's class names list, when that list is the raw column in order."""
        raws = [raw for raw, _name in self.pairs]
        return [name for _raw, name in self.pairs] if names is not None and list(names) == raws else None

    def apply(self, label):
        """A listed label (a name, or a tuple of names) mapped; an unmapped or ambiguous name stays as it is (it
        is then judged an unknown class, unless it already is a class)."""
        known = self.unique
        if isinstance(label, tuple):
            return tuple(dict.fromkeys(known.get(n, n) for n in label))
        return known.get(label, label) if isinstance(label, str) else label


def _pairs_of_text(lines: list[str]) -> list[tuple[str, str]] | None:
    """LOC_synset_mapping.txt pairs (name, synset), or None when not every line is `<synset> <name>`."""
    rows = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    matches = [_SYNSET_LINE.match(row) for row in rows]
    if not rows or not all(matches):
        return None
    return [(match.group(2).strip(), match.group(1)) for match in matches]


def _pairs_of_table(path: Path, text: str) -> list[tuple[str, str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    pairs = []
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    try:
        for row in reader:
            cells = [c.strip() for c in row]
            if not cells or cells == [""]:
                continue
            if len(cells) != 2 or not all(cells):
                raise UserError(f"--classes {path}:{reader.line_num}: expected two columns raw_name,class_name "
                                f"(got {row!r})")
            pairs.append((cells[0], cells[1]))
    except csv.Error as err:
        raise UserError(f"--classes {path}:{reader.line_num}: {err}") from None
    return pairs


def load_classes(path: Path) -> tuple[list[str], ClassMapping | None]:
    """(class order, mapping or None) of a --classes file: a mapping in one of the formats above, or a list."""
    text = read_classes_text(path)
    suffix = path.suffix.lower()
    pairs = None
    if suffix in (".csv", ".tsv"):
        pairs = _pairs_of_table(path, text)
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--classes {path}: invalid JSON at line {err.lineno} ({err.msg})") from None
        if isinstance(data, dict) and "classes" not in data:
            bad = [raw for raw, name in data.items() if not isinstance(name, str) or not name.strip()]
            if bad:
                raise UserError(f"--classes {path}: raw name {bad[0]!r} maps to {data[bad[0]]!r}; give a class name")
            pairs = [(raw.strip(), name.strip()) for raw, name in data.items()]
    else:
        pairs = _pairs_of_text(text.splitlines())
    if pairs is None:
        return load_class_file(path), None
    if not pairs:
        raise UserError(f"--classes {path}: maps no names")
    synsets = tuple((name, name) for _raw, name in pairs) if suffix not in (".csv", ".tsv", ".json") else ()
    mapping = ClassMapping(tuple(pairs), f"--classes {path}", synsets)
    return mapping.classes, mapping


def packed_label_map(classes_file: Path | None, label_map, packed: bool):
    """The label map a source's lister applies: a --classes mapping file's for a `packed` (webdataset or parquet)
    source, else --label-map's (only one of the two may be given). Other kinds apply a mapping file when judging
    (``listing.finish_listing``)."""
    mapping = load_classes(classes_file)[1] if classes_file is not None else None
    if mapping is not None and label_map is not None:
        raise UserError(f"--classes {classes_file} maps names and so does --label-map {label_map}; give one")
    return mapping if mapping is not None and packed else label_map

"""`--classes` as a mapping (raw name -> class): Hugging Face's ImageNet-1K parquet, whose ClassLabel names are
descriptive ("tench, Tinca tinca"), shards onto synsets through ILSVRC's LOC_synset_mapping.txt."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.cli import main
from data_prep.sources.listing import list_partitioned
from data_prep.spill import PARTITIONS, read_spill
from tests.conftest import data_prep_error
from tests.real_objects import distinct_photos, jpeg_bytes

# Six ImageNet-1K classes as LOC_synset_mapping.txt and Hugging Face's ClassLabel both name them, in synset
# order: two pairs share a name ("crane": a bird and a machine; "maillot" is also part of another's name).
SYNSETS = [("n01440764", "tench, Tinca tinca"), ("n01443537", "goldfish, Carassius auratus"),
           ("n02012849", "crane"), ("n03126707", "crane"), ("n03710637", "maillot"),
           ("n03710721", "maillot, tank suit")]


def _loc_file(path: Path) -> Path:
    path.write_text("".join(f"{synset} {name}\n" for synset, name in SYNSETS))
    return path


def _hf_imagenet_parquet(path: Path, labels: list[int]) -> list[bytes]:
    """A file laid out as Hugging Face's imagenet-1k parquet: image struct{bytes, path}, label ClassLabel int,
    the descriptive names in the schema metadata."""
    images = [jpeg_bytes(im.resize((48, 48))) for _name, im in distinct_photos(2, ("astronaut", "coffee"))]
    images = [images[i % len(images)] for i in range(len(labels))]
    table = pa.table({"image": [{"bytes": b, "path": f"val_{i}.JPEG"} for i, b in enumerate(images)],
                      "label": labels})
    features = {"info": {"features": {"image": {"_type": "Image"}, "label": {
        "_type": "ClassLabel", "names": [name for _synset, name in SYNSETS]}}}}
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps(features).encode()}), path)
    return images


def _listed(listing) -> dict[str, str]:
    rows = {}
    for part in range(PARTITIONS):
        if listing.counts[part]:
            rows.update((row[1], row[2]) for row in read_spill(listing.inputs_path(part)))
    return rows


@pytest.mark.slow
def test_hf_parquet_with_descriptive_names_shards_onto_synsets(tmp_path, local_ray):
    """Every label lands on its synset by position, the two "crane"s and the "maillot"s included; the split's
    class list is the synsets in file order, so a 21K -> 1K fine-tune copies head rows by synset."""
    src = tmp_path / "hf"
    src.mkdir()
    labels = [0, 1, 2, 3, 4, 5, 3, 2]
    _hf_imagenet_parquet(src / "validation-00000-of-00001.parquet", labels)
    out = tmp_path / "out"
    assert main(["shard", str(src), str(out), "--split", "val", "--classes", str(_loc_file(tmp_path / "LOC.txt")),
                 "--max-size", "32", "--no-progress", "--workers", "2"]) == 0
    entry = json.loads((out / "_info.json").read_text())["splits"]["val"]
    assert entry["classes"] == [synset for synset, _name in SYNSETS]
    assert entry["num_samples"] == len(labels) and entry["counts"]["rejected"] == {}
    got = {}
    for tar in sorted(out.glob("val-*.tar")):
        with tarfile.open(tar) as handle:
            for member in handle:
                if member.name.endswith(".json"):
                    meta = json.loads(handle.extractfile(member).read())
                    got[meta["source"]] = (meta["label"], meta["class"])
    assert {int(source.rsplit("/", 1)[1]): value for source, value in got.items()} == \
        {row: (label, SYNSETS[label][0]) for row, label in enumerate(labels)}


def test_mapping_formats_map_folder_and_text_labels(tmp_path):
    """A .tsv mapping renames folder classes; a JSON object maps a parquet's string labels; a name that maps to
    two classes without positions to tell them apart is a reject that says so, not a guess."""
    tree = tmp_path / "tree"
    for folder, (_name, image) in zip(("tench", "goldfish", "zebra"), distinct_photos(0, ("astronaut", "coffee",
                                                                                            "rocket"))):
        (tree / folder).mkdir(parents=True)
        (tree / folder / "a.jpg").write_bytes(jpeg_bytes(image.resize((32, 32))))
    tsv = tmp_path / "map.tsv"
    tsv.write_text("goldfish\tn01443537\ntench\tn01440764\n")
    listing = list_partitioned(tree, "auto", tsv, 0, tmp_path / "spill-tree")
    assert listing.classes == ["n01443537", "n01440764"]  # the file's order
    assert _listed(listing) == {"tench/a.jpg": "n01440764", "goldfish/a.jpg": "n01443537"}
    assert listing.rejected == 1  # zebra: no class

    flat = tmp_path / "flat"
    flat.mkdir()
    table = pa.table({"jpg": [jpeg_bytes(im.resize((32, 32))) for _n, im in distinct_photos(0, ("moon", "coins",
                                                                                                 "clock"))],
                      "label": ["tench, Tinca tinca", "crane", "goldfish, Carassius auratus"]})
    pq.write_table(table, flat / "part.parquet")
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"goldfish, Carassius auratus": "n01443537", "tench, Tinca tinca": "n01440764"}))
    listing = list_partitioned(flat, "auto", mapping, 0, tmp_path / "spill-json")
    assert listing.classes == ["n01443537", "n01440764"]
    assert _listed(listing) == {"part.parquet/000000000": "n01440764", "part.parquet/000000002": "n01443537"}
    loc = _loc_file(tmp_path / "LOC_synset_mapping.txt")
    listing = list_partitioned(flat, "auto", loc, 0, tmp_path / "spill-flat")
    assert _listed(listing) == {"part.parquet/000000000": "n01440764", "part.parquet/000000002": "n01443537"}
    rejects = [json.loads(line) for line in listing.rejects_path.read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in rejects] == [("part.parquet/000000001", "unknown_class")]
    assert "'crane' (names 2 classes in --classes" in rejects[0]["detail"]


def test_mapping_mistakes_are_one_line(tmp_path, capsys):
    bad = tmp_path / "map.csv"
    bad.write_text("tench,n01440764,extra\n")
    src = tmp_path / "hf"
    src.mkdir()
    _hf_imagenet_parquet(src / "v.parquet", [0])
    err = data_prep_error(capsys, ["shard", str(src), str(tmp_path / "out"), "--classes", str(bad)])
    assert f"--classes {bad}:1: expected two columns" in err
    loc = _loc_file(tmp_path / "LOC.txt")
    label_map = tmp_path / "labels.json"
    label_map.write_text('{"a": "b"}')
    err = data_prep_error(capsys, ["shard", str(src), str(tmp_path / "out"), "--classes", str(loc), "--label-map",
                                   str(label_map)])
    assert "give one" in err

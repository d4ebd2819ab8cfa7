"""Shards on an S3-compatible object store (issue 12), against a real server: moto's server mode on 127.0.0.1
(tests/s3_server.py), reached over HTTP by the data_prep CLI, its Ray workers and the deepspeed-launched ranks
exactly as they would reach S3, through the standard AWS_* variables.

Covered: shard a folder into s3://, verify it, a SIGKILLed job re-run to byte-identical objects, shard from
s3:// into s3://, 2-rank pretraining (and its evaluation) streaming its shards from s3://, concurrent
_info.json updates that lose nothing, and one-line errors naming the URL.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from tests.s3_server import s3, s3_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SHARD_ARGS = ["--shard-size", "6", "--seed", "0", "--workers", "1", "--no-progress"]


def _env() -> dict:
    return {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}


def _data_prep(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run([PY, "-m", "data_prep", *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    if check:
        assert res.returncode == 0, f"data_prep {' '.join(args)}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


def _tar_hashes(fs, url: str) -> dict[str, str]:
    prefix = url.removeprefix("s3://")
    return {path.rsplit("/", 1)[-1]: hashlib.sha256(fs.cat_file(path)).hexdigest()
            for path in sorted(fs.glob(f"{prefix}/*.tar"))}


def _info(fs, url: str) -> dict:
    return json.loads(fs.cat_file(f"{url.removeprefix('s3://')}/_info.json"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """96 generated JPEGs in 4 class folders."""
    root = tmp_path_factory.mktemp("s3-images") / "images"
    subprocess.run([PY, "-m", "data_prep", "demo-data", str(root), "--classes", "4", "--per-class", "24", "--size",
                    "40", "--seed", "3", "--label-set", "shape-color"], check=True, capture_output=True, cwd=REPO)
    return root


@pytest.fixture(scope="module")
def s3_shards(s3, images) -> str:  # noqa: F811
    """The images sharded into s3://shards/ref by an uninterrupted run (16 shards of 6)."""
    url = f"{s3.bucket('shards')}/ref"
    _data_prep("shard", str(images), url, *SHARD_ARGS)
    return url


# ------------------------------------------------------------------------------------------- no Ray needed
def test_conditional_writes_and_concurrent_info_updates(s3):  # noqa: F811
    """Exclusive create refuses an existing object; _info.json merged by 6 jobs at once keeps every split."""
    from core import storage
    from data_prep.shard.info import load_info, merge_split

    base = f"{s3.bucket('cas')}/out"
    storage.write_bytes(f"{base}/plan", b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        storage.write_bytes(f"{base}/plan", b"second", exclusive=True)
    assert storage.read_bytes(f"{base}/plan") == b"first"

    splits = [f"s{i}" for i in range(6)]
    errors = []

    def job(split):
        try:
            entry = {"name": split, "num_samples": 1, "filenames": [f"{split}-000000.tar"], "classes": ["a"]}
            merge_split(base, split, entry, [{"source": f"{split}.jpg", "reason": "unreadable"}])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=job, args=(split,)) for split in splits]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert sorted(load_info(base)["splits"]) == splits
    rejects = [json.loads(line) for line in storage.read_bytes(f"{base}/rejects.jsonl").decode().splitlines()]
    assert sorted(r["split"] for r in rejects) == splits


def test_store_mistakes_are_one_line_naming_the_url(s3, images, capsys):  # noqa: F811
    from tests.conftest import data_prep_error

    err = data_prep_error(capsys, ["shard", str(images), "s3://no-such-bucket/shards", "--no-progress"])
    assert "s3://no-such-bucket" in err and "bucket" in err, err
    err = data_prep_error(capsys, ["verify", f"{s3.bucket('empty')}/nothing"])
    assert "s3://empty/nothing/_info.json not found" in err, err

    from core.errors import UserError
    from pipeline.data.shards import open_shards

    with pytest.raises(UserError, match="s3://no-such-bucket/x"):
        open_shards("s3://no-such-bucket/x", "train")


# --------------------------------------------------------------------------------------- Ray and launchers
@pytest.mark.slow
def test_shard_into_s3_verify_and_sigkill_rerun_is_byte_identical(s3, images, s3_shards):  # noqa: F811
    fs = s3.fs
    ref = _tar_hashes(fs, s3_shards)
    assert len(ref) == 16
    entry = _info(fs, s3_shards)["splits"]["train"]
    assert entry["num_samples"] == 96 and [ref[s["filename"]] for s in entry["shards"]] == \
        [s["sha256"] for s in entry["shards"]]
    res = _data_prep("verify", s3_shards)
    assert res.stdout.count("ok   train/") == 16 and "OK; 1 split(s), 16 shards, 96 samples" in res.stdout

    # SIGKILL the whole job (driver and its private Ray) once some shard objects exist, then re-run.
    killed = f"{s3.bucket('shards')}/killed"
    cmd = [PY, "-m", "data_prep", "shard", str(images), killed, *SHARD_ARGS]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    written = 0
    while proc.poll() is None and time.monotonic() < deadline:
        written = len(fs.glob("shards/killed/_state/train/receipts/*.json"))
        if written >= 2:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate(timeout=60)[0].decode(errors="replace")[-3000:]
    assert 2 <= written < 16 and not fs.exists("shards/killed/_info.json"), \
        f"the kill did not land mid-job ({written} receipts):\n{output}"

    res = _data_prep("shard", str(images), killed, *SHARD_ARGS)
    run = _info(fs, killed)["splits"]["train"]["run"]
    assert run["resumed_shards"] >= 2, run
    assert _tar_hashes(fs, killed) == ref
    assert _info(fs, killed)["splits"]["train"]["shards"] == entry["shards"]
    names = {p.rsplit("/", 1)[-1] for p in fs.find("shards/killed")}
    assert names == {p.rsplit("/", 1)[-1] for p in fs.find(s3_shards.removeprefix("s3://"))}  # nothing stray


def _jpg_hashes(fs, url: str) -> tuple[list[str], dict[str, int]]:
    """sha256 of every image in a split's shards (sorted), and images per class as _info.json counts them."""
    hashes = []
    for path in sorted(fs.glob(f"{url.removeprefix('s3://')}/train-*.tar")):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
            hashes += [hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar if m.name.endswith(".jpg")]
    return sorted(hashes), _info(fs, url)["splits"]["train"]["counts"]["per_class"]


@pytest.mark.slow
def test_shard_webdataset_source_from_s3_into_s3(s3, s3_shards):  # noqa: F811
    """A DataComp/img2dataset-style source on the store (here: the webdataset tars of s3_shards, labels in the
    `class` key of each sample's json) sharded into another prefix: the same images, classes and counts."""
    out = f"{s3.bucket('shards')}/from-s3"
    _data_prep("shard", s3_shards, out, "--source", "webdataset", "--label-field", "class", *SHARD_ARGS)
    assert "OK; 1 split(s), 16 shards, 96 samples" in _data_prep("verify", out).stdout
    assert _jpg_hashes(s3.fs, out) == _jpg_hashes(s3.fs, s3_shards)


@pytest.mark.slow
def test_shard_image_folder_from_s3_into_s3(s3, images, s3_shards):  # noqa: F811
    """The demo ImageFolder tree uploaded to the store and sharded from there: the same shards as from disk."""
    fs = s3.fs
    src = f"{s3.bucket('raw')}/images"
    fs.put(str(images) + "/", "raw/images/", recursive=True)
    out = f"{s3.bucket('shards')}/folder-from-s3"
    res = _data_prep("shard", src, out, *SHARD_ARGS, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "OK; 1 split(s), 16 shards, 96 samples" in _data_prep("verify", out).stdout
    assert _tar_hashes(fs, out) == _tar_hashes(fs, s3_shards) or _jpg_hashes(fs, out) == _jpg_hashes(fs, s3_shards)
    # listed one class folder at a time, and no listing kept (s3fs's dircache would hold every object's entry)
    from data_prep.sources.remote import filesystem, walk_class_folders
    listed = [(folder, len(files)) for folder, files in walk_class_folders(src)]
    assert listed[0][0] is None and sum(n for _f, n in listed) == 96 and len(listed) == 5, listed
    assert not filesystem(src)[0].dircache


def _port_below_ephemeral_range() -> int:
    """A free port of 127.0.0.1 below Linux's ephemeral range (32768+). Why not free_port(): both ranks here hold
    HTTP connections to the store while the rendezvous starts, and twice in three runs on the shared 2-core test
    machine they hung in TCPStore with a master port from the ephemeral range (free_port's); below it, no
    outgoing connection (ours or another test's) can hold or self-connect to that port."""
    import random
    import socket

    rng = random.Random(os.getpid())
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000..32000")


@pytest.mark.slow
def test_two_rank_pretraining_reads_its_shards_from_s3(s3, s3_shards, tmp_path):  # noqa: F811
    """deepspeed launcher, 2 CPU ranks with a DataLoader worker each, 3 steps on s3:// shards, then the
    evaluation of data.val, also on s3://: every sample counted, nothing skipped as corrupt."""
    from tests.test_pipeline_train import base_overrides, deepspeed_cmd, metrics, run

    run_dir = tmp_path / "run"
    overrides = base_overrides(s3_shards, run_dir, **{
        "data.val": s3_shards, "data.val_split": "train", "train.steps": 3, "train.global_batch_size": 8,
        "checkpoint.every_steps": 3, "train.hang_timeout_s": 120})
    cmd = deepspeed_cmd(overrides)
    cmd[cmd.index("--master_port") + 1] = str(_port_below_ephemeral_range())
    res = run(cmd, timeout=300)  # a hang dumps stacks after 120 s (watchdog)
    train, evals = metrics(run_dir)
    assert sorted(train) == [1, 2, 3], res.stderr[-3000:]
    assert all(rec.get("data/corrupt_skipped", 0) == 0 for rec in train.values()), train
    counts = [rec.get("eval/count", rec.get("count")) for rec in evals]
    assert counts and counts[-1] == 96, evals

"""Shared test helpers: free ports, the `slow` marker, and `demo_shards` (data_prep's shards, built once)."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.runtime.distributed import free_port  # noqa: F401  (tests import it from here)

# Everything in tests talks to this machine only.
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("RAY_ADDRESS", "")  # never join a cluster by accident
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Checkpoints the tests write are signed with a key of the test session (pipeline.checkpoint.trust), not the user's.
os.environ.setdefault("COATNET_CHECKPOINT_KEY", os.path.join(tempfile.mkdtemp(prefix="coatnet-test-key-"), "key"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts Ray or several ranks; skipped by `make test-fast`")


@pytest.fixture(autouse=True, scope="module")
def _release_deepspeed_shm():
    """Ranks the tests kill on purpose leave DeepSpeed's 67 MB /dev/shm segments behind (pipeline.runtime.cpu_shm)."""
    yield
    from pipeline.runtime.cpu_shm import remove_orphans

    remove_orphans()


@pytest.fixture
def port() -> int:
    return free_port()


DEMO_SHARD_CLASSES = 4


def _run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """A shard folder with a `train` split (5 shards of 32) and a `val` split (2 shards of 16), built once."""
    root = tmp_path_factory.mktemp("pipeline-demo-shards")
    out = root / "shards"
    py = sys.executable
    for split, per_class, seed, shard_size in (("train", 40, 0, 32), ("val", 8, 1, 16)):
        images = root / f"images-{split}"
        _run([py, "-m", "data_prep", "demo-data", str(images), "--classes", str(DEMO_SHARD_CLASSES), "--per-class",
              str(per_class), "--size", "40", "--seed", str(seed), "--label-set", "shape-color"])
        _run([py, "-m", "data_prep", "shard", str(images), str(out), "--split", split, "--shard-size",
              str(shard_size), "--seed", "0", "--workers", "1"])
    return out


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray on 127.0.0.1 for a module's in-process data_prep jobs (one started by another module is reused)."""
    import ray

    from data_prep.shard.cluster import init_local_ray

    if ray.is_initialized():  # another module left its Ray running: use it, leave it to its owner
        yield ray
        return
    init_local_ray(num_cpus=2)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    yield ray
    ray.shutdown()


def data_prep_error(capsys, argv: list[str]) -> str:
    """`python -m data_prep ARGV` in process must fail as a user error: exit 2, one stderr line, no traceback."""
    from data_prep.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err

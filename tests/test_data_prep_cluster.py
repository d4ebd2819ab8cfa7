"""The shard CLI as users run it: killed with SIGKILL and re-run, and spread over a two-node Ray cluster.

Each test starts its own Ray processes (a private local instance per CLI run, or `ray start --block`
nodes under a private temp dir) and ends exactly those processes by their process group; it never calls
`ray stop`, which would stop every Ray on the machine, other people's included.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from core.files import stale_temps
from tests.conftest import free_port
from tests.test_data_prep_helpers import make_jpeg_tree

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _shard_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_prep", "shard", str(src), str(out), "--no-progress", *extra]


def _run(cmd: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("train-*.tar"))}


def _sources(out: Path) -> list[str]:
    import webdataset as wds

    urls = [str(p) for p in sorted(out.glob("train-*.tar"))]
    return [json.loads(s["json"])["source"] for s in wds.WebDataset(urls, shardshuffle=False)]


def test_sigkill_part_way_then_rerun_is_exactly_once_and_byte_identical(tmp_path):
    expected = make_jpeg_tree(tmp_path / "src", classes=3, per_class=40)
    args = ("--shard-size", "4", "--seed", "7", "--max-size", "32")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_shard_cmd(tmp_path / "src", killed, "--workers", "1", *args), cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(killed.glob("train-*.tar")):  # kill as soon as the first shard is complete
            assert proc.poll() is None and time.monotonic() < deadline, "the job ended before writing a shard"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started (same process group)
        proc.wait(timeout=30)
    partial = _tars(killed)
    assert 0 < len(partial) < 30 and not (killed / "_info.json").exists(), "the kill must land part-way"

    rerun = _run(_shard_cmd(tmp_path / "src", killed, "--workers", "2", *args))
    assert "kept from an earlier run" in rerun.stdout
    reference = tmp_path / "reference"
    _run(_shard_cmd(tmp_path / "src", reference, "--workers", "2", *args))

    assert _tars(killed) == _tars(reference)  # byte-identical, shard by shard
    assert {k: v for k, v in _tars(killed).items() if k in partial} == partial  # kept shards were complete
    sources = _sources(killed)
    assert len(sources) == len(set(sources)) == len(expected) and set(sources) == set(expected)
    assert not stale_temps(killed) and not list(killed.glob(".*.tmp"))
    info = json.loads((killed / "_info.json").read_text())["splits"]["train"]
    assert info["run"]["resumed_shards"] >= len(partial) and info["num_samples"] == len(expected)


class _RayNode:
    """`ray start --block` in its own session: stopping it ends exactly the processes it started."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]):
        self.log = log
        with open(log, "w") as handle:
            self.proc = subprocess.Popen([RAY, "start", "--block", *args], cwd=REPO, start_new_session=True,
                                         stdout=handle, stderr=subprocess.STDOUT, env=env)

    def wait_started(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while "block forever" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, self.log.read_text(errors="replace")
            assert time.monotonic() < deadline, "ray start did not come up"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # --block: shuts its own Ray processes down
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of ours still alive in that session
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


_PROBE = """
import sys, time, ray
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", log_to_driver=False)

@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def where():
    time.sleep(0.2)
    return ray.get_runtime_context().get_node_id()

deadline = time.monotonic() + 60
while len(set(ray.get([where.remote() for _ in range(4)]))) < 2:
    assert time.monotonic() < deadline, "the second node never ran a task"
"""


def _wait_until_both_nodes_schedule(address: str, env: dict) -> None:
    """A joined node is usable once the head's scheduler sees its CPU; probe with tiny SPREAD tasks."""
    subprocess.run([sys.executable, "-c", _PROBE, address], cwd=REPO, env=env, check=True, timeout=120,
                   capture_output=True)


def test_two_ray_nodes_on_loopback_both_write_shards(tmp_path):
    expected = make_jpeg_tree(tmp_path / "src", classes=2, per_class=24)
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="dp-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    common = ["--num-cpus", "1", "--temp-dir", temp_dir, "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    # A private cluster token: every process of this cluster (and only those) uses it, ~/.ray is untouched.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    nodes = []
    try:
        head = _RayNode(["--head", "--port", str(port), "--include-dashboard", "false", *common],
                        tmp_path / "head.log", env)
        nodes.append(head)
        head.wait_started()
        worker = _RayNode(["--address", f"127.0.0.1:{port}", *common], tmp_path / "worker.log", env)
        nodes.append(worker)
        worker.wait_started()
        _wait_until_both_nodes_schedule(f"127.0.0.1:{port}", env)
        out = tmp_path / "shards"
        result = _run(_shard_cmd(tmp_path / "src", out, "--ray-address", f"127.0.0.1:{port}", "--workers", "2",
                                 "--shard-size", "4", "--max-size", "32"), env=env)
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    info = json.loads((out / "_info.json").read_text())["splits"]["train"]
    assert len(info["run"]["nodes"]) == 2, (info["run"], result.stderr)  # both nodes wrote shards
    assert sum(info["run"]["nodes"].values()) == len(info["filenames"]) == 12
    assert sorted(_sources(out)) == sorted(expected)
    assert "2 node(s)" in result.stderr

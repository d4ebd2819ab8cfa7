"""A real S3-compatible server for the tests: moto's server mode on 127.0.0.1, over HTTP.

Not moto's in-process `mock_aws`: that patches botocore inside one process, and the code under test runs in
subprocesses (the data_prep CLI, its Ray workers, the deepspeed-launched ranks and their DataLoader workers).
The server is a separate process; everything reaches it the way it would reach S3 or MinIO, configured by
the standard variables only (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), which
`S3Server.env` holds and the `s3` fixture puts into os.environ for the test (subprocesses inherit it).

    def test_x(s3):
        url = s3.bucket("shards")          # "s3://shards", created on the server
        s3.fs.find("shards")               # s3fs against the same server
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.runtime.distributed import free_port

_START_TIMEOUT_S = 60.0


@dataclass
class S3Server:
    endpoint: str
    env: dict = field(default_factory=dict)

    @property
    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=self.env["AWS_ACCESS_KEY_ID"],
                                 secret=self.env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True,
                                 use_listings_cache=False)

    def bucket(self, name: str) -> str:
        fs = self.fs
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"


def _moto_command(port: int) -> list[str]:
    script = Path(sys.executable).parent / "moto_server"
    if script.exists():
        return [str(script), "-H", "127.0.0.1", "-p", str(port)]
    if shutil.which("moto_server") is None:
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    return ["moto_server", "-H", "127.0.0.1", "-p", str(port)]


def _wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not listen on 127.0.0.1:{port} within {_START_TIMEOUT_S:.0f} s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto server for the session, on a free port of 127.0.0.1; stopped at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(_moto_command(port), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_listening(port, proc, log)
        endpoint = f"http://127.0.0.1:{port}"
        yield S3Server(endpoint, {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                                  "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                                  "AWS_EC2_METADATA_DISABLED": "true"})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def s3(s3_server):
    """The session's server, with its AWS_* variables in os.environ for this module's tests (and their
    subprocesses); put back as they were afterwards."""
    import s3fs

    with pytest.MonkeyPatch.context() as patch:
        for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            patch.delenv(key, raising=False)
        for key, value in s3_server.env.items():
            patch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()  # made with these variables; later modules may hold others

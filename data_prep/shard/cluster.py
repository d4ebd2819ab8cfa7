"""Connect to Ray: a private local instance on 127.0.0.1 by default, or an existing cluster.

A private instance is started with the number of CPUs we may use and ends with the command (its
processes share the driver's fate), so nothing is left running. Joining ('auto' or host:port) never
starts or stops anything.

Loopback: on Linux, Ray (2.60) replaces ``_node_ip_address="127.0.0.1"`` with the machine's routable
address and its GCS/raylet then listen on every interface. A private single-node instance needs no
network at all, so we set Ray's documented switch for single-machine Ray
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: node address = loopback) for it; its servers then listen on
127.0.0.1 only. Clusters are joined as they are.

Other users of the machine: loopback is shared by every user, so the private instance also gets Ray's token
authentication with a fresh token (as launch/ray_cluster.sh gives a cluster) and a temp dir of its own (0700,
not the shared /tmp/ray, whose session folders another user could have made or could read).
"""
from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass

from core.errors import UserError

_LOOPBACK = ("127.0.0.1", "localhost")
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _private_temp_dir() -> str:
    """A 0700 folder for the instance's sessions, sockets and logs, removed when this process ends."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="coatnet-ray-")  # 0700, a fresh unpredictable name; short (socket paths)
    atexit.register(shutil.rmtree, path, True)
    # Ray makes its temp dir mode 0777 (for users sharing /tmp/ray): give it a folder inside the 0700 one.
    return os.path.join(path, "ray")


_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _reload_ray_auth() -> None:
    """Ray reads the auth mode and token once per process; read them from the environment again (as Ray's own
    tests do), so a private instance's token is used for it and never for a cluster joined after it."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def init_local_ray(num_cpus: int) -> None:
    """Start a private Ray on this machine that listens on 127.0.0.1 only (see the module docstring)."""
    import secrets

    saved_env = {name: os.environ.get(name) for name in (_SINGLE_MACHINE_ENV,) + _AUTH_ENV}
    os.environ[_SINGLE_MACHINE_ENV] = "0"  # inherited by the GCS and raylet (and through it, the workers)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)  # likewise the token, never written to disk
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    import ray

    _reload_ray_auth()
    import ray._private.ray_constants as ray_constants

    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import time: in case ray was imported before us
    try:
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING, _temp_dir=_private_temp_dir())
    finally:
        # Only the processes started above needed them (this driver keeps the token it read); a `ray start`
        # or a cluster joined later from this process, or its subprocesses, must not inherit them.
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes: ray.init retries an unreachable GCS for a long time."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address}: expected 'auto' or host:port, e.g. 10.0.0.1:6379")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise UserError(f"--ray-address {address}: nothing answers there ({err.strerror or err}); start the head "
                        f"with `ray start --head --port {port}` or omit --ray-address for a local run") from None


@dataclass(frozen=True)
class RaySession:
    in_flight: int       # tasks the driver keeps submitted at once
    cpus: int            # CPUs Ray can use for our tasks
    nodes: int
    joined: bool


@contextmanager
def ray_session(address: str | None, workers: int | None):
    import ray

    owned = False
    if ray.is_initialized():  # called from a program that already runs Ray (benchmark, notebook): reuse it
        joined = True
    elif address is None:
        init_local_ray(workers or os.cpu_count() or 1)
        owned, joined = True, False
    else:
        host = address.rsplit(":", 1)[0] if ":" in address else address
        if address != "auto":
            _check_reachable(address)
        kwargs = {"_node_ip_address": "127.0.0.1"} if host in _LOOPBACK else {}
        _reload_ray_auth()
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **kwargs)
        except Exception as err:  # noqa: BLE001 - Ray raises many types here; all mean "cannot join"
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            hint = ("set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token)"
                    if "auth" in first.lower() else
                    "start one with `ray start --head` or omit --ray-address for a local run")
            raise UserError(f"--ray-address {address}: cannot join a Ray cluster there ({first}); {hint}") from None
        owned, joined = True, True
    try:
        resources = ray.cluster_resources()
        cpus = max(1, int(resources.get("CPU", 1)))
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        if joined:
            # --workers caps concurrency exactly; without it, keep every CPU of the cluster busy (x2 so a CPU
            # never waits for the driver's next submission).
            in_flight = workers if workers else 2 * cpus
        else:
            in_flight = 2 * cpus  # Ray itself runs at most num_cpus (= --workers) at once
        yield RaySession(in_flight=in_flight, cpus=cpus if not workers else min(cpus, workers), nodes=nodes,
                         joined=joined)
    finally:
        if owned:
            ray.shutdown()

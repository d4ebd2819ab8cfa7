"""Wait until a Ray cluster has N live nodes (used by launch/ray_cluster.sh and launch/slurm/shard.sbatch).

    python -m launch.ray_nodes --address HEAD:PORT --expect 4 [--timeout 120]

Joins the cluster as a short-lived driver (so run it on a cluster node, e.g. the head), polls
`ray.nodes()` and exits 0 once enough nodes are alive, 1 on timeout. Prints the live node addresses.
A bad option or an address where no cluster can be joined is a user error: one line `error: ...`, exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from core.errors import UserError, cli_main


def _check_args(args: argparse.Namespace) -> None:
    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {args.address}: expected HEAD:PORT of the Ray head, e.g. 10.0.0.1:6379")
    if args.expect < 1 or args.timeout < 0:
        raise UserError(f"--expect {args.expect} --timeout {args.timeout:g}: give at least 1 node and a timeout "
                        f">= 0 seconds")


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.ray_nodes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="HEAD:PORT of the Ray cluster (its GCS)")
    parser.add_argument("--expect", type=int, required=True, help="live nodes to wait for")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up")
    args = parser.parse_args(argv)
    _check_args(args)

    import ray

    host = args.address.rsplit(":", 1)[0]
    local = {"_node_ip_address": "127.0.0.1"} if host in ("127.0.0.1", "localhost") else {}
    try:
        ray.init(address=args.address, log_to_driver=False, logging_level=logging.ERROR, **local)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--address {args.address}: cannot join a Ray cluster there ({first}); start its head "
                        f"with `ray start --head` or check HEAD:PORT") from None
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive"))
            if len(alive) >= args.expect or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        ray.shutdown()
    print(f"{len(alive)} live Ray node(s) at {args.address}: {' '.join(alive)}")
    if len(alive) < args.expect:
        print(f"ray_nodes: only {len(alive)} of {args.expect} nodes joined within {args.timeout:g} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

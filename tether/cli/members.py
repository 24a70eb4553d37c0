"""`tether server` and `tether worker`: one member process each, joined to a run by `--store` and
`--run` (DESIGN §1, §9): what the driver's spawners and any cluster scheduler run."""

from __future__ import annotations

import argparse
from typing import Any

from tether.cli.common import UsageError, add_store_run


def add_parser(sub: Any) -> None:
    server = sub.add_parser("server", help="run one parameter-server shard of a run")
    add_store_run(server)
    server.add_argument("--shard-id", type=int, required=True, help="which shard (0..S-1)")
    server.add_argument(
        "--listen",
        default="127.0.0.1:0",
        help="HOST:PORT to serve on; port 0 picks a free one (127.0.0.1:0)",
    )

    worker = sub.add_parser("worker", help="run one JAX worker of a run")
    add_store_run(worker)
    worker.add_argument("--worker-id", type=int, required=True, help="which worker (0..W-1)")
    worker.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="SHARD=HOST:PORT",
        help="dial shard SHARD at HOST:PORT (a fault proxy) instead of its registered address",
    )


def run(args: argparse.Namespace) -> int:
    return _server(args) if args.command == "server" else _worker(args)


def _server(args: argparse.Namespace) -> int:
    from tether.server.main import ServerOptions, serve

    return serve(ServerOptions(args.store, args.run, args.shard_id, listen=args.listen))


def _worker(args: argparse.Namespace) -> int:
    from tether.worker.loop import WorkerOptions, run_worker

    routes = dict(parse_route(r) for r in args.route)
    return run_worker(WorkerOptions(args.store, args.run, args.worker_id, routes=routes))


def parse_route(text: str) -> tuple[int, str]:
    """`SHARD=HOST:PORT` -> (shard id, address)."""
    shard, sep, address = text.partition("=")
    host, colon, port = address.rpartition(":")
    if not (sep and colon and host and shard.isdigit() and port.isdigit()):
        raise UsageError(f"--route expects SHARD=HOST:PORT (e.g. 0=127.0.0.1:7001), got {text!r}")
    return int(shard), address

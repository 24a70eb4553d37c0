"""`tether server` and `tether worker`: one member process each, joined to a run by `--store` and
`--run` (DESIGN §1, §9): what the driver's spawners and any cluster scheduler run."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tether.cli.common import (
    MEMBER_ID_VARIABLES,
    UsageError,
    add_metrics_port,
    add_store_run,
    add_tls_flags,
    member_id,
    required_store_uri,
    tls_paths,
)
from tether.member.join import DEFAULT_RUN_WAIT_S

if TYPE_CHECKING:
    from tether.config import RunConfig
    from tether.store import Store
    from tether.transport import Security, TlsFiles

_ID_FROM_ENV = f"; without it, from {', '.join(MEMBER_ID_VARIABLES)} (the first one set)"


def _add_member_options(p: Any, what: str) -> None:
    add_store_run(p)
    p.add_argument(
        "--listen",
        default="127.0.0.1:0",
        help=f"HOST:PORT to serve {what} on; port 0 picks a free one, 0.0.0.0 every interface "
        "(127.0.0.1:0)",
    )
    p.add_argument(
        "--advertise",
        default=None,
        metavar="HOST[:PORT]",
        help="the address others dial, published in the store (a pod IP, a node name); the "
        "port defaults to the one bound. Without it: the --listen host, or this host's name "
        "when that is a wildcard",
    )
    add_metrics_port(p)
    p.add_argument(
        "--wait-for-run",
        type=float,
        default=DEFAULT_RUN_WAIT_S,
        metavar="S",
        help="wait this long for the run to be created, e.g. by `tether run create` in "
        f"another job ({DEFAULT_RUN_WAIT_S:.0f})",
    )
    add_tls_flags(p, "instead of the files the run's config names")
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve a run created before runs had tokens without one (said at every start); "
        "without it such a run is refused",
    )


def add_parser(sub: Any) -> None:
    server = sub.add_parser(
        "server",
        help="run one parameter-server shard of a run",
        description="One shard of a run made by `tether launch` or `tether run create`. It "
        "exits 0 once the store marks the run finished.",
    )
    server.add_argument(
        "--shard-id", type=int, default=None, help=f"which shard (0..S-1){_ID_FROM_ENV}"
    )
    _add_member_options(server, "the shard")

    worker = sub.add_parser(
        "worker",
        help="run one JAX worker of a run",
        description="One worker of a run made by `tether launch` or `tether run create`. It "
        "exits 0 when it has done its steps, or once the store marks the run finished.",
    )
    worker.add_argument(
        "--worker-id", type=int, default=None, help=f"which worker (0..W-1){_ID_FROM_ENV}"
    )
    _add_member_options(worker, "its liveness probe")
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

    return serve(
        ServerOptions(
            required_store_uri(args), args.run, member_id(args.shard_id, "--shard-id"),
            listen=args.listen, advertise=args.advertise, run_wait_s=args.wait_for_run,
            spawn=spawn_token(), tls=tls_override(args),
            allow_unauthenticated=args.allow_unauthenticated, metrics_port=args.metrics_port,
        )
    )  # fmt: skip


def _worker(args: argparse.Namespace) -> int:
    from tether.worker.loop import WorkerOptions, run_worker

    routes = dict(parse_route(r) for r in args.route)
    return run_worker(
        WorkerOptions(
            required_store_uri(args), args.run, member_id(args.worker_id, "--worker-id"),
            routes=routes, listen=args.listen, advertise=args.advertise,
            run_wait_s=args.wait_for_run, conclude=_conclude, spawn=spawn_token(),
            tls=tls_override(args), allow_unauthenticated=args.allow_unauthenticated,
            metrics_port=args.metrics_port,
        )
    )  # fmt: skip


def tls_override(args: argparse.Namespace) -> TlsFiles | None:
    """The member's own `--tls-*` files, which replace the run config's; None when none is
    given."""
    from tether.transport import TlsFiles

    paths = tls_paths(args)
    if not paths:
        return None
    return TlsFiles(
        paths.get("tls_cert", ""), paths.get("tls_key", ""), paths.get("tls_ca", ""),
        paths.get("tls_server_name", ""),
    )  # fmt: skip


def spawn_token(env: Mapping[str, str] = os.environ) -> str:
    """The token of the driver's start that made this process, which its heartbeats report so
    that the driver matches the record to its handle (DESIGN §12); "" when another scheduler
    started it. Read here, at the edge, and handed down (STYLE §7)."""
    from tether.driver.spawner import SPAWN_VARIABLE

    return env.get(SPAWN_VARIABLE, "")


def _conclude(store: Store, store_uri: str, config: RunConfig, security: Security) -> int:
    """A worker's last step done: conclude a driverless run if this was its last worker."""
    from tether.driver.conclude import RunFailed, conclude_if_last

    try:
        if conclude_if_last(store, store_uri, config, security):
            print(f"tether worker: concluded run {config.run_id}", file=sys.stderr, flush=True)
    except RunFailed as e:  # exit 1: the scheduler's retry of this worker tries again
        print(f"tether worker: could not conclude run {config.run_id}: {e}", file=sys.stderr)
        return 1
    return 0


def parse_route(text: str) -> tuple[int, str]:
    """`SHARD=HOST:PORT` -> (shard id, address)."""
    shard, sep, address = text.partition("=")
    host, colon, port = address.rpartition(":")
    if not (sep and colon and host and shard.isdigit() and port.isdigit()):
        raise UsageError(f"--route expects SHARD=HOST:PORT (e.g. 0=127.0.0.1:7001), got {text!r}")
    return int(shard), address

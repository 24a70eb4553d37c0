"""The `tether` command line (DESIGN.md §9).

Config is typed and read here, at the edge, and passed down as arguments (STYLE.md §7). Exit codes:
0 success, 1 the run failed (the message names the member), 2 usage error (one sentence, no
traceback). With `--json`, exactly one JSON object is the last line of stdout and human output
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command line or config: reported as one sentence with exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _add_store_run(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--store", required=required, help="store URI, e.g. sqlite:///runs/x/tether.db")
    p.add_argument("--run", required=required, help="run id")


def build_parser() -> Parser:
    parser = Parser(
        prog="tether",
        description="Tether: a fault-tolerant parameter server for distributed SGD.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    launch = sub.add_parser(
        "launch",
        help="train one model across shard and worker processes on this machine",
        description="Start shards and workers as child processes, watch them, print progress "
        "and a summary. With no options: a small MLP on the bundled digits data set, "
        "2 shards, 2 workers, BSP.",
    )
    launch.add_argument("--shards", type=int, default=2, help="parameter-server shards (2)")
    launch.add_argument("--workers", type=int, default=2, help="JAX worker processes (2)")
    launch.add_argument(
        "--mode",
        choices=("bsp", "ssp", "asp"),
        default="bsp",
        help="consistency: bsp (strong), ssp (bounded staleness), asp (eventual)",
    )
    launch.add_argument(
        "--staleness",
        type=int,
        default=None,
        help="SSP bound s: a worker may be at most s clocks ahead (ssp only)",
    )
    launch.add_argument("--model", default="mlp:64", help="logreg | mlp | mlp:H1xH2... (mlp:64)")
    launch.add_argument(
        "--dataset",
        default="digits",
        help="digits (bundled) | synthetic[:FEATURES[:SAMPLES]] (digits)",
    )
    launch.add_argument("--steps", type=int, default=200, help="iterations per worker (200)")
    launch.add_argument("--batch-size", type=int, default=32, help="mini-batch per worker (32)")
    launch.add_argument(
        "--optimizer",
        choices=("sgd", "momentum", "adam"),
        default="adam",
        help="server-side optimizer (adam)",
    )
    launch.add_argument(
        "--lr", type=float, default=None, help="learning rate (adam 0.01, sgd/momentum 0.1)"
    )
    launch.add_argument("--seed", type=int, default=0, help="seed of every random source (0)")
    launch.add_argument(
        "--store", default=None, help="store URI (default sqlite:///<run-dir>/tether.db)"
    )
    launch.add_argument("--run-dir", type=Path, default=None, help="run folder (runs/<run-id>)")
    launch.add_argument(
        "--export",
        type=Path,
        default=None,
        help="write the final parameters to this .npz (flat vector `params`)",
    )
    launch.add_argument(
        "--straggler",
        action="append",
        default=[],
        metavar="ID:MS",
        help="delay worker ID by MS milliseconds per step (repeatable)",
    )
    launch.add_argument(
        "--device",
        choices=("cpu", "gpu", "tpu"),
        default="cpu",
        help="JAX device of the workers (cpu)",
    )
    launch.add_argument(
        "--wait-timeout",
        type=float,
        default=60.0,
        help="deadline in seconds of any wait for slower workers (60)",
    )
    launch.add_argument(
        "--replication",
        choices=("sync", "async", "off"),
        default=None,
        help="shard state to the store: sync (acknowledge only durable updates; default for "
        "bsp), async (in the background; default for ssp/asp), off (no recovery)",
    )
    launch.add_argument(
        "--replicate-every",
        type=int,
        default=50,
        metavar="K",
        help="async: replicate at least every K applied updates (50)",
    )
    launch.add_argument(
        "--replicate-interval-ms",
        type=float,
        default=100.0,
        metavar="T",
        help="async: replicate at most T ms after a change (100)",
    )
    launch.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        metavar="N",
        help="restarts per member before the run fails (3)",
    )
    launch.add_argument(
        "--lease",
        type=float,
        default=5.0,
        metavar="S",
        help="heartbeat silence after which a serving member is probed (5; it adapts upwards to "
        "the intervals observed)",
    )
    launch.add_argument(
        "--probe-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="a suspect member is killed only after its liveness probes failed this long (10)",
    )
    launch.add_argument(
        "--startup-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="deadline from starting a member to its serving (120)",
    )
    launch.add_argument("--json", action="store_true", help="print the summary as JSON")

    server = sub.add_parser("server", help="run one parameter-server shard of a run")
    _add_store_run(server)
    server.add_argument("--shard-id", type=int, required=True, help="which shard (0..S-1)")
    server.add_argument(
        "--listen",
        default="127.0.0.1:0",
        help="HOST:PORT to serve on; port 0 picks a free one (127.0.0.1:0)",
    )

    worker = sub.add_parser("worker", help="run one JAX worker of a run")
    _add_store_run(worker)
    worker.add_argument("--worker-id", type=int, required=True, help="which worker (0..W-1)")
    worker.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="SHARD=HOST:PORT",
        help="dial shard SHARD at HOST:PORT (a fault proxy) instead of its registered address",
    )

    status = sub.add_parser("status", help="members of a run and whether it finished")
    status.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="run folder (its tether.db); the newest run in it",
    )
    _add_store_run(status, required=False)
    status.add_argument("--json", action="store_true", help="print status as JSON")

    from tether.chaos.cli import add_parser as add_chaos_parser
    from tether.consistency.cli import add_parser as add_experiment_parser
    from tether.devtools.replica_set import add_parser as add_mongo_parser

    add_mongo_parser(sub)
    add_chaos_parser(sub)
    add_experiment_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=Parser)
    pushpull = bench_sub.add_parser(
        "pushpull", help="push/pull throughput of shards against raw gRPC bytes"
    )
    pushpull.add_argument("--size-mb", type=float, default=16.0, help="vector size in MiB (16)")
    pushpull.add_argument("--shards", type=int, default=1, help="shards to spread it over (1)")
    pushpull.add_argument("--repeats", type=int, default=20, help="timed rounds (20)")
    pushpull.add_argument(
        "--optimizer",
        choices=("sgd", "momentum", "adam"),
        default="sgd",
        help="optimizer applied on push (sgd)",
    )
    pushpull.add_argument("--json", action="store_true", help="print results as JSON")
    return parser


def emit_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tether.store import StoreError

    try:
        if args.command == "launch":
            return _launch(args)
        if args.command == "server":
            return _server(args)
        if args.command == "worker":
            return _worker(args)
        if args.command == "status":
            return _status(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "experiment":
            from tether.consistency.cli import run as experiment_run

            return experiment_run(args)
        if args.command == "chaos":
            from tether.chaos.cli import run as chaos_run

            return chaos_run(args)
        if args.command == "mongo":
            from tether.devtools.replica_set import run as mongo_run

            return mongo_run(args)
    except (UsageError, ValueError, StoreError) as e:
        print(f"tether {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"tether {args.command}: interrupted", file=sys.stderr)
        return 130
    raise AssertionError(args.command)


def _launch(args: argparse.Namespace) -> int:
    from tether.config import RunConfig, new_run_id, parse_straggler
    from tether.driver.launcher import Launcher, LaunchOptions, RunFailed, resolve_config
    from tether.store import StoreError, default_store_uri

    lr = args.lr if args.lr is not None else (0.01 if args.optimizer == "adam" else 0.1)
    stragglers = dict(parse_straggler(s) for s in args.straggler)
    staleness = args.staleness
    if args.mode == "ssp" and staleness is None:
        raise UsageError("--mode ssp needs --staleness s (the bound, e.g. 2)")
    config = RunConfig(
        run_id=new_run_id(),
        shards=args.shards,
        workers=args.workers,
        mode=args.mode,
        staleness=staleness or 0,
        model=args.model,
        dataset=args.dataset,
        steps=args.steps,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=lr,
        seed=args.seed,
        device=args.device,
        stragglers=stragglers,
        wait_timeout_s=args.wait_timeout,
        replication=args.replication or ("sync" if args.mode == "bsp" else "async"),
        replicate_every=args.replicate_every,
        replicate_interval_ms=args.replicate_interval_ms,
        max_restarts=args.max_restarts,
        lease_s=args.lease,
        probe_timeout_s=args.probe_timeout,
        startup_timeout_s=args.startup_timeout,
    )
    if args.mode != "ssp" and args.staleness not in (None, 0):
        raise UsageError(f"--staleness applies to --mode ssp only, not {args.mode}")
    config = resolve_config(config)
    run_dir = (args.run_dir or Path("runs") / config.run_id).resolve()
    store_uri = args.store or default_store_uri(run_dir)
    opts = LaunchOptions(config=config, run_dir=run_dir, store_uri=store_uri, export=args.export)
    try:
        summary = Launcher(opts).run()
    except RunFailed as e:
        print(f"tether launch: run {config.run_id} failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, UsageError, ValueError, StoreError):
        raise
    except Exception as e:  # an internal error: one line here, the traceback in the run dir
        log = run_dir / "logs" / "launcher.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc())
        print(f"tether launch: run {config.run_id} failed: {e!r} (traceback in {log})",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    if args.json:
        emit_json(summary)
    else:
        _print_summary(summary)
    return EXIT_OK


def _print_summary(s: dict[str, Any]) -> None:
    mode = s["mode"] + (f"({s['staleness']})" if s["mode"] == "ssp" else "")
    print(
        f"run {s['run_id']} finished: {mode}, {s['shards']} shards, {s['workers']} workers, "
        f"seed {s['seed']}\n"
        f"  final loss      {s['final_loss']:.4f}\n"
        f"  test accuracy   {s['test_accuracy']:.4f}\n"
        f"  updates applied {s['updates_applied']}\n"
        f"  max clock gap   {s['max_clock_gap']}\n"
        f"  wall time       {s['wall_s']:.1f}s ({s['samples_per_s']:.0f} samples/s)\n"
        f"  params sha256   {s['params_sha256']}\n"
        f"  restarts        {s['restarts']['server']} shard, {s['restarts']['worker']} worker\n"
        f"  run dir         {s['run_dir']}"
    )
    from tether.driver.supervisor import member_name

    for r in s.get("recoveries", []):
        print(f"    {member_name(r['role'], r['id'])} (epoch {r['epoch']}): {r['detail']}")


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


def _status(args: argparse.Namespace) -> int:
    from tether.status import print_status, run_status

    status = run_status(run_dir=args.run_dir, store_uri=args.store, run_id=args.run)
    if args.json:
        emit_json(status)
    else:
        print_status(status)
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from tether.bench import BenchOptions, bench_pushpull, print_bench

    result = bench_pushpull(
        BenchOptions(
            size_mb=args.size_mb,
            shards=args.shards,
            repeats=args.repeats,
            optimizer=args.optimizer,
        ),
        err=sys.stderr,
    )
    if args.json:
        emit_json(result)
    else:
        print_bench(result)
    return EXIT_OK

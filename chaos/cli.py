"""`tether chaos proxy|run|soak|list` (DESIGN §7, §9).

`tether chaos run` exits 0 when every invariant of every scenario held, 1 when one did not (or a
run failed), 2 for a bad scenario or command line. With `--json` the last line of stdout is one
JSON object: the scenario's result, or with several scenarios `{"ok", "scenarios": [...]}`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tether.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    chaos = subparsers.add_parser(
        "chaos",
        help="fault proxy and chaos scenarios",
        description="Kill processes and break links on a running training job, and check that "
        "nothing acknowledged is lost, bounds hold and training finishes.",
    )
    sub = chaos.add_subparsers(dest="chaos_command", required=True, parser_class=type(chaos))
    proxy = sub.add_parser(
        "proxy",
        help="a TCP fault proxy speaking the Toxiproxy HTTP API",
        description="Serve the Toxiproxy HTTP API (proxies, toxics, /reset, /populate, "
        "/version) so toxiproxy-python and other Toxiproxy clients drive it unchanged.",
    )
    proxy.add_argument(
        "--listen", default="127.0.0.1:8474", help="HOST:PORT of the API (127.0.0.1:8474)"
    )
    proxy.add_argument("--seed", type=int, default=0, help="seed of the toxicity draws (0)")

    run = sub.add_parser(
        "run",
        help="run chaos scenarios and check their invariants",
        description="Run each scenario (a TOML file, or the name of a shipped one): a fault-free "
        "baseline when the invariants compare against one, then the run with its fault "
        "timeline; print every invariant and write a Markdown/PNG report.",
    )
    run.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="file or shipped name")
    run.add_argument("--all", action="store_true", help="every shipped scenario")
    run.add_argument("--ci", action="store_true", help="the shipped scenarios marked ci = true")
    run.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a scenario value, e.g. run.replication=off (repeatable)",
    )
    run.add_argument("--out", type=Path, default=Path("runs/chaos"), help="reports (runs/chaos)")
    run.add_argument(
        "--no-binary",
        action="store_true",
        help="use the built-in proxy even when toxiproxy-server is on PATH",
    )
    run.add_argument("--json", action="store_true", help="print the result as JSON")

    soak = sub.add_parser(
        "soak",
        help="long BSP and SSP runs under seeded random process and link faults",
        description="Run a BSP (sync) and an SSP(2) (async) run under random kills, pauses, "
        "stops, latency and partitions drawn from the seed; check every chaos invariant, that "
        "no process or file descriptor is leaked and that every member's memory stayed flat.",
    )
    soak.add_argument("--minutes", type=float, default=10.0, help="total length (10)")
    soak.add_argument("--seed", type=int, default=0, help="seed of the fault plan and runs (0)")
    soak.add_argument("--out", type=Path, default=Path("runs/soak"), help="results (runs/soak)")
    soak.add_argument("--json", action="store_true", help="print the result as JSON")

    sub.add_parser("list", help="the shipped scenarios")
    return chaos  # type: ignore[no-any-return]


def run(args: argparse.Namespace) -> int:
    from tether.chaos.scenario import ScenarioError

    if args.chaos_command in ("run", "soak"):
        from tether.plotting import missing

        # Checked before any run starts: the report's figure is drawn at the end.
        if (why := missing()) is not None:
            print(f"tether chaos {args.chaos_command}: {why}", file=sys.stderr)
            return EXIT_USAGE
    try:
        if args.chaos_command == "proxy":
            return _proxy(args)
        if args.chaos_command == "list":
            return _list()
        if args.chaos_command == "soak":
            return _soak(args)
        return _run(args)
    except ScenarioError as e:
        print(f"tether chaos {args.chaos_command}: {e}", file=sys.stderr)
        return EXIT_USAGE


def _proxy(args: argparse.Namespace) -> int:
    from tether.chaos.toxiproxy.api import serve

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def ready(address: str) -> None:
        print(f"tether chaos proxy: Toxiproxy API on http://{address}", file=sys.stderr, flush=True)

    try:
        serve(args.listen, ready=ready, stop=stop, seed=args.seed)
    except OSError as e:  # the port is taken, or the address is not this machine's
        print(f"tether chaos proxy: cannot listen on {args.listen}: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _list() -> int:
    from tether.chaos.scenario import load_scenario, shipped

    for path in shipped():
        s = load_scenario(path)
        flags = ", ".join(
            x for x in ("ci" if s.ci else "", "mongod" if s.needs_mongod else "") if x
        )
        print(f"{path.stem:<22} {s.description}" + (f" [{flags}]" if flags else ""))
    return EXIT_OK


def _soak(args: argparse.Namespace) -> int:
    from tether.chaos.scenario import ScenarioError
    from tether.chaos.soak import soak

    if not args.minutes > 0 or args.seed < 0:
        raise ScenarioError("--minutes must be > 0 and --seed >= 0")
    result = soak(args.minutes, args.seed, args.out.resolve(), sys.stderr)
    if args.json:
        print(json.dumps(result, sort_keys=True, default=str), flush=True)
    return EXIT_OK if result["ok"] else EXIT_FAILED


def _run(args: argparse.Namespace) -> int:
    from tether.chaos.runner import BaselineCache, run_scenario
    from tether.chaos.scenario import ScenarioError, load_scenario, resolve_path, shipped

    paths = [resolve_path(name) for name in args.scenarios]
    if args.all or args.ci:
        paths += shipped()
    if not paths:
        raise ScenarioError("name a scenario (see `tether chaos list`), or give --all or --ci")
    # Load every scenario first: a bad one stops the invocation before anything runs.
    scenarios = [load_scenario(p, seed=args.seed, overrides=args.set) for p in paths]
    if args.ci and not args.all:
        scenarios = [s for s in scenarios if s.ci or s.path in paths[: len(args.scenarios)]]
    out = args.out.resolve()
    baselines = BaselineCache()  # one fault-free run per distinct run options, for them all
    results = [
        run_scenario(s, out / s.name, prefer_binary=not args.no_binary, baselines=baselines)
        for s in scenarios
    ]
    failed = [r["scenario"] for r in results if r["ok"] is False]
    if len(results) > 1:
        skipped = [r["scenario"] for r in results if r["ok"] is None]
        print(
            f"chaos: {len(results) - len(failed) - len(skipped)} passed, {len(failed)} failed"
            + (f" ({', '.join(failed)})" if failed else "")
            + (f", {len(skipped)} skipped ({', '.join(skipped)})" if skipped else ""),
            file=sys.stderr,
        )
    if args.json:
        obj = results[0] if len(results) == 1 else {"ok": not failed, "scenarios": results}
        print(json.dumps(obj, sort_keys=True, default=str), flush=True)
    return EXIT_FAILED if failed else EXIT_OK

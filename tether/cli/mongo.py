"""`tether mongo up|down`: a local three-member MongoDB replica set for `--store` (needs mongod).

The replica set itself is a developer tool (tether/devtools/replica_set.py); this is its command
line. `python -m tether.cli.mongo mongo up|down ...` runs it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tether.devtools.replica_set import (
    DEFAULT_DIR,
    MongodMissing,
    ReplicaSetError,
    find_mongod,
    is_running,
    mongo_down,
    mongo_up,
    recorded,
)
from tether.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``mongo up|down`` to the ``tether`` subparsers; dispatch with :func:`run`."""
    mongo = subparsers.add_parser(
        "mongo",
        help="a local MongoDB replica set for --store (needs mongod)",
        description="Start or stop a local three-member MongoDB replica set on 127.0.0.1.",
    )
    sub = mongo.add_subparsers(dest="mongo_command", required=True, parser_class=type(mongo))
    up = sub.add_parser(
        "up",
        help="start the replica set and print its store URI",
        description="Start three mongod processes (--replSet rs0) in the background, initiate "
        "the set, wait for a primary and print the mongodb:// URI.",
    )
    down = sub.add_parser("down", help="stop the replica set started in --dir")
    for p in (up, down):
        p.add_argument(
            "--dir", type=Path, default=DEFAULT_DIR, help=f"data, logs and pids ({DEFAULT_DIR})"
        )
        p.add_argument("--json", action="store_true", help="print the result as JSON")
    up.add_argument(
        "--ports", type=_ports, default=None, help="three ports P1,P2,P3 (default: free ones)"
    )
    return mongo  # type: ignore[no-any-return]


def _ports(text: str) -> tuple[int, int, int]:
    try:
        ports = tuple(int(p) for p in text.split(","))
    except ValueError:
        ports = ()
    if len(ports) != 3 or len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"expected three distinct ports P1,P2,P3; got {text!r}")
    return ports  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    """Execute ``tether mongo up|down``; returns the exit code."""
    prog = f"tether mongo {args.mongo_command}"
    try:
        folder = args.dir.expanduser().resolve()
        if args.mongo_command == "up":
            find_mongod()
            if is_running(folder):
                print(f"{prog}: the replica set in {args.dir} is already running", file=sys.stderr)
            else:
                print(f"{prog}: starting a replica set in {args.dir} ...", file=sys.stderr)
            uri = mongo_up(folder, args.ports)
            pids = (recorded(folder) or {}).get("pids", [])
            hint = f"stop it with `tether mongo down --dir {args.dir}`"
            print(f"{prog}: up, with a primary; {hint}", file=sys.stderr)
            result = {"uri": uri, "pids": pids, "dir": str(folder)}
            print(json.dumps(result, sort_keys=True) if args.json else uri, flush=True)
            return EXIT_OK
        stopped = mongo_down(folder)
        print(f"{prog}: stopped {len(stopped)} mongod process(es)", file=sys.stderr)
        if args.json:
            print(json.dumps({"dir": str(folder), "stopped": stopped}), flush=True)
        return EXIT_OK
    except (MongodMissing, FileNotFoundError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ReplicaSetError, OSError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """``python -m tether.cli.mongo mongo up|down ...`` (the same as ``tether mongo ...``)."""
    parser = argparse.ArgumentParser(prog="tether")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

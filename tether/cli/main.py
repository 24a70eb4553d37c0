"""The `tether` command line (DESIGN §9): the thin top layer that dispatches to one module per
command.

Config is typed and read at the edge, in the command modules, and passed down as arguments
(STYLE §7). Exit codes (tether/exitcodes.py): 0 success, 1 the run failed (the message names the
member), 2 usage error (one sentence, no traceback). With `--json`, exactly one JSON object is
the last line of stdout and human output goes to stderr. Command modules import their heavy
dependencies (JAX, gRPC servers, the store) inside `run`, so `tether --help` stays fast.
"""

from __future__ import annotations

import sys
from types import ModuleType

from tether.chaos import cli as chaos
from tether.cli import bench, certs, data, launch, members, mongo, runs, status
from tether.cli.common import Parser, UsageError
from tether.consistency.experiments import cli as experiment
from tether.exitcodes import EXIT_FAILED, EXIT_USAGE

# command -> the module that adds its parser (`add_parser(subparsers)`) and runs it (`run(args)`)
COMMANDS: dict[str, ModuleType] = {
    "launch": launch,
    "run": runs,
    "server": members,
    "worker": members,
    "status": status,
    "mongo": mongo,
    "chaos": chaos,
    "experiment": experiment,
    "bench": bench,
    "data": data,
    "certs": certs,
}


def build_parser() -> Parser:
    parser = Parser(
        prog="tether",
        description="Tether: a fault-tolerant parameter server for distributed SGD.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in dict.fromkeys(COMMANDS.values()):  # each module once, in order
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tether.store import StoreError, StoreUnavailable

    try:
        return int(COMMANDS[args.command].run(args))
    except StoreUnavailable as e:  # not the input's fault: exit 1, so a scheduler retries
        print(f"tether {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (UsageError, ValueError, StoreError) as e:
        print(f"tether {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"tether {args.command}: interrupted", file=sys.stderr)
        return 130

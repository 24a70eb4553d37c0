"""`tether run create`, `tether run wait` and `tether run rotate-token`: a run for any
scheduler (DESIGN §12, §13).

`tether launch` makes its run and drives it. Under a scheduler of the user's own (a Kubernetes
Job, an sbatch script, a hand-written one), `tether run create` makes the run in the store with
the same flags, then the scheduler starts `tether server` and `tether worker` members, which find
each other through the store, conclude the run when the last worker is done and exit 0 once it
is marked finished. `tether run wait` blocks until then and prints the run's summary.
`tether run rotate-token` replaces the run's secret token while it trains: members accept the
old one for a grace period, and pick the new one up from the store.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from tether.cli.common import UsageError, add_store_run, emit_json, required_store_uri
from tether.cli.launch import add_run_flags, config_from_args, print_summary
from tether.exitcodes import EXIT_FAILED, EXIT_OK
from tether.store.secrets import DEFAULT_GRACE_S, DEFAULT_PROPAGATE_S, current, rotated


def add_parser(sub: Any) -> None:
    runs = sub.add_parser(
        "run", help="create a run for your own scheduler, or wait for one to finish"
    )
    verbs = runs.add_subparsers(dest="verb", required=True, parser_class=type(runs))
    create = verbs.add_parser(
        "create",
        help="create a run in the store and print its id (idempotent)",
        description="Create a run with the config that `tether launch` would use, for members "
        "started by another scheduler. With --run-id, creating the same run again is a no-op; "
        "the same id with another config is refused.",
    )
    add_store_run(create, run=False)
    create.add_argument("--run-id", default=None, help="the run's id (default: a new one)")
    add_run_flags(create)
    create.add_argument("--json", action="store_true", help="print {run_id, created} as JSON")
    create.add_argument(
        "--show-token",
        action="store_true",
        help="also print the run's secret token (for clients of your own; members read it "
        "from the store)",
    )

    wait = verbs.add_parser(
        "wait",
        help="wait until a run has finished and print its summary",
        description="Exit 0 with the run's summary once the store marks it finished, 1 after "
        "--timeout.",
    )
    add_store_run(wait)
    wait.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="give up after S seconds"
    )
    wait.add_argument("--json", action="store_true", help="print the summary as JSON")

    rotate = verbs.add_parser(
        "rotate-token",
        help="give a run a new secret token while it trains",
        description="Members accept the old token until --grace S from now and present the new "
        "one after re-reading the store; no call fails. A run from before tokens gets its "
        "first one.",
    )
    add_store_run(rotate)
    rotate.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_S,
        metavar="S",
        help=f"how long the old token is still accepted ({DEFAULT_GRACE_S:.0f}; at least "
        f"{DEFAULT_PROPAGATE_S:.0f}, the time members take to learn the new one)",
    )
    rotate.add_argument("--show-token", action="store_true", help="print the new token")
    rotate.add_argument(
        "--json", action="store_true", help="print {run_id, tokens, old_expires_at} as JSON"
    )


def run(args: argparse.Namespace) -> int:
    verbs = {"create": _create, "wait": _wait, "rotate-token": _rotate}
    return verbs[args.verb](args)


def _create(args: argparse.Namespace) -> int:
    from tether.store import RunExists, open_store

    config = config_from_args(args, run_id=args.run_id)
    wanted = json.loads(json.dumps(config.to_dict()))  # as the store gives it back
    with open_store(required_store_uri(args)) as store:
        try:
            store.create_run(config.run_id, wanted)
            created = True
        except RunExists:
            stored = store.get_run(config.run_id).config
            differs = sorted(
                k for k in wanted.keys() | stored.keys() if wanted.get(k) != stored.get(k)
            )
            if differs:
                raise UsageError(
                    f"run {config.run_id} exists with another config ({', '.join(differs)} "
                    "differ); choose another --run-id"
                ) from None
            created = False
        token = current(store.run_tokens(config.run_id), time.time()) if args.show_token else None
    print(
        f"tether run create: run {config.run_id} {'created' if created else 'exists already'}",
        file=sys.stderr,
    )
    if args.json:
        emit_json({"run_id": config.run_id, "created": created} | _token_field(token))
    else:
        print(config.run_id, flush=True)
        if token is not None:
            print(token, flush=True)
    return EXIT_OK


def _token_field(token: str | None) -> dict[str, str]:
    return {} if token is None else {"token": token}


def _rotate(args: argparse.Namespace) -> int:
    from tether.store import open_store

    if not math.isfinite(args.grace) or args.grace < DEFAULT_PROPAGATE_S:
        raise UsageError(
            f"--grace must be at least {DEFAULT_PROPAGATE_S:.0f} seconds, the time members take "
            f"to learn the new token; got {args.grace}"
        )
    with open_store(required_store_uri(args)) as store:
        while True:  # another rotation between the read and the write: read again
            old = store.run_tokens(args.run)
            now = time.time()
            new = rotated(old, now, grace_s=args.grace)
            if store.swap_run_tokens(args.run, old, new):
                break
    until = now + args.grace if old else None
    print(
        f"tether run rotate-token: run {args.run} has a new token, used by members from "
        f"{DEFAULT_PROPAGATE_S:.0f}s on"
        + (f"; the old one is accepted for {args.grace:g}s more" if old else ""),
        file=sys.stderr,
    )
    token = new[-1].token if args.show_token else None
    if args.json:
        emit_json(
            {"run_id": args.run, "tokens": len(new), "old_expires_at": until} | _token_field(token)
        )
    elif token is not None:
        print(token, flush=True)
    return EXIT_OK


def _wait(args: argparse.Namespace) -> int:
    from tether.retry import PollTimeout, poll_until
    from tether.store import RunRecord, open_store

    with open_store(required_store_uri(args)) as store:
        store.get_run(args.run)  # an unknown run is an error now, not after the timeout

        def finished() -> RunRecord | None:
            record = store.get_run(args.run)
            return record if record.finished else None

        try:
            record = poll_until(finished, args.timeout, f"run {args.run} to finish", interval_s=0.5)
        except PollTimeout as e:
            print(f"tether run wait: {e}", file=sys.stderr)
            return EXIT_FAILED
    assert record
    summary = record.summary or {}
    if args.json:
        emit_json(summary)
    else:
        print_summary(summary)
    return EXIT_OK

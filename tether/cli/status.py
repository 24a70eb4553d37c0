"""`tether status`: who is in a run, whether they are alive, and whether it finished (DESIGN §9).

Status is a read of the store only; it never talks to the members, so it works while a run goes
on, after it ended, and when members are dead. It renders the run's `RunView`
(`tether.member.view`) as the rows of `tether.member.rows`, which the launcher's progress line
and `--watch` (`tether/cli/watch.py`) draw too: one read, so each member's lease is the run's
`--lease` (a reader that has seen no heartbeat interval yet uses the floor of the adaptive lease,
as the liveness detector does) and no rate is known.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from tether.cli.common import UsageError, add_store_run, emit_json
from tether.cli.watch import watch
from tether.exitcodes import EXIT_OK
from tether.member.rows import COLUMNS, header, reported_recoveries, rows, text_table
from tether.member.view import Here, MemberLife, RunView, member_views, observe, run_liveness
from tether.roles import member_name
from tether.store import RunRecord, Store, default_store_uri, open_store


def run_status(
    *, run_dir: Path | None, store_uri: str | None, run_id: str | None
) -> dict[str, Any]:
    uri = store_uri_of(run_dir, store_uri)
    store = open_store(uri)
    try:
        record, run = read_run(store, uri, run_id)
    finally:
        store.close()
    return status_of(record, run, uri)


def store_uri_of(run_dir: Path | None, store_uri: str | None) -> str:
    """The store a status reads: `--store`, else the run folder's SQLite file."""
    if store_uri is not None:
        return store_uri
    if run_dir is None:
        raise ValueError("give --run-dir DIR, or --store URI and --run ID")
    db = run_dir / "tether.db"
    if not db.exists():
        raise ValueError(f"no Tether run in {run_dir} (no {db.name} there)")
    return default_store_uri(run_dir)


def newest_run(store: Store, store_uri: str) -> str:
    """The newest training run's id: experiment records (DESIGN §8) hold no members."""
    runs = [r for r in store.list_runs() if r.meta.get("kind") != "experiment"]
    if not runs:
        raise ValueError(f"the store {store_uri} holds no runs")
    return runs[0].run_id


def read_run(
    store: Store, store_uri: str, run_id: str | None, previous: RunView | None = None
) -> tuple[RunRecord, RunView]:
    """One read of a run (None: the newest training run): its record and its view, updated from
    `previous` (`observe`). The members are read before the record, so a run the members show
    ended is also seen finished if it did."""
    if run_id is None:
        run_id = newest_run(store, store_uri)
    members = member_views(store.members(run_id))
    record = store.get_run(run_id)
    # The run's own liveness settings, as launched.
    run = observe(
        previous, record.run_id, members, run_liveness(record.config), now=time.time(),
        here=Here.this_host(),
    )  # fmt: skip
    return record, run


def status_of(record: RunRecord, run: RunView, store_uri: str) -> dict[str, Any]:
    """The `--json` object of a run's record and its view."""
    cfg = record.config
    # Every restart and its cause: the launcher reports them as it goes, the summary at the end.
    recoveries = reported_recoveries(run, record.summary)
    return {
        "run_id": record.run_id,
        "store": store_uri,
        "finished": record.finished,
        "mode": cfg.get("mode"),
        "staleness": cfg.get("staleness"),
        "shards": cfg.get("shards"),
        "workers": cfg.get("workers"),
        "steps": cfg.get("steps"),
        "members": [_member(life) for life in run.members],
        "recoveries": recoveries,
        "summary": record.summary,
    }


def _member(life: MemberLife) -> dict[str, Any]:
    m = life.view
    return {
        "role": m.role,
        "id": m.member_id,
        "pid": m.pid,
        "host": m.host,
        "address": m.address,
        "epoch": m.epoch,
        "restarts": m.epoch - 1,  # every replacement registers the next epoch
        "state": m.state,
        "phase": m.phase,
        "alive": life.alive,
        "heartbeat_age_s": round(life.heartbeat_age_s, 3),
        "clock": m.clock,
        "version": m.version,
        # Reported by the member itself (tether.member.heartbeat.peak_rss_bytes).
        "peak_rss_mb": _mb(m.peak_rss_bytes),
        "metrics_url": m.metrics_url,  # its Prometheus endpoint, or None (DESIGN §13)
    }


def print_status(record: RunRecord, run: RunView) -> None:
    """The run as text: its header, one row per member (`tether.member.rows`, the rows
    `--watch` and the launcher's progress draw) with its pid, peak memory and address, and
    every restart with its cause."""
    recoveries = reported_recoveries(run, record.summary)
    print(header(record, run).text())
    table = [
        (*r.cells(), str(r.pid), _dash(r.peak_rss_mb), r.address or "-")
        for r in rows(run, None, recoveries)
    ]
    for line in text_table(table, (*COLUMNS, "pid", "peak MB", "address")):
        print(line)
    for r in recoveries:
        recovered = ""
        if r.get("recovery_s") is not None:
            recovered = f"; serving again {r['recovery_s']:.2f}s later"
        who = member_name(r["role"], r["id"])
        print(f"restart: {who} (epoch {r['epoch']}) {r['detail']}{recovered}")


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)


def _mb(nbytes: Any) -> float | None:
    return None if nbytes is None else round(float(nbytes) / 2**20, 1)


def add_parser(sub: Any) -> None:
    status = sub.add_parser("status", help="members of a run and whether it finished")
    status.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="run folder (its tether.db); the newest run in it",
    )
    add_store_run(status, required=False)
    status.add_argument("--json", action="store_true", help="print status as JSON")
    status.add_argument(
        "--watch",
        action="store_true",
        help="redraw the members every --interval seconds until the run ends (a line per read "
        "when stdout is not a terminal); exit 0 once it finished, 1 if its launcher is gone "
        "first, 130 on Ctrl-C",
    )
    status.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between reads (1)"
    )


def run(args: argparse.Namespace) -> int:
    if args.watch and args.json:
        raise UsageError("--watch draws the run as it goes; --json prints one object")
    if not 0 < args.interval < float("inf"):
        raise UsageError(f"--interval is seconds > 0; got {args.interval}")
    uri = store_uri_of(args.run_dir, args.store)
    store = open_store(uri)
    try:
        if args.watch:
            run_id = args.run or newest_run(store, uri)
            return watch(lambda previous: read_run(store, uri, run_id, previous), args.interval)
        record, run = read_run(store, uri, args.run)
    finally:
        store.close()
    if args.json:
        emit_json(status_of(record, run, uri))
    else:
        print_status(record, run)
    return EXIT_OK

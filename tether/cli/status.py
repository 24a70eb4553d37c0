"""`tether status`: who is in a run, whether they are alive, and whether it finished (DESIGN §9).

Status is a read of the store only; it never talks to the members, so it works while a run goes
on, after it ended, and when members are dead. It renders the run's `RunView`
(`tether.member.view`), which the launcher's progress line renders too: one read, so each
member's lease is the run's `--lease` (a reader that has seen no heartbeat interval yet uses the
floor of the adaptive lease, as the liveness detector does).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from tether.cli.common import add_store_run, emit_json
from tether.exitcodes import EXIT_OK
from tether.member.view import Here, MemberLife, RunView, member_views, observe, run_liveness
from tether.roles import member_name
from tether.store import RunRecord, default_store_uri, open_store


def run_status(
    *, run_dir: Path | None, store_uri: str | None, run_id: str | None
) -> dict[str, Any]:
    if store_uri is None:
        if run_dir is None:
            raise ValueError("give --run-dir DIR, or --store URI and --run ID")
        db = run_dir / "tether.db"
        if not db.exists():
            raise ValueError(f"no Tether run in {run_dir} (no {db.name} there)")
        store_uri = default_store_uri(run_dir)
    store = open_store(store_uri)
    try:
        if run_id is None:
            # The newest training run: experiment records (DESIGN §8) hold no members.
            runs = [r for r in store.list_runs() if r.meta.get("kind") != "experiment"]
            if not runs:
                raise ValueError(f"the store {store_uri} holds no runs")
            record = runs[0]
        else:
            record = store.get_run(run_id)
        members = member_views(store.members(record.run_id))
    finally:
        store.close()
    # The run's own liveness settings, as launched.
    run = observe(
        None, record.run_id, members, run_liveness(record.config), now=time.time(),
        here=Here.this_host(),
    )  # fmt: skip
    return status_of(record, run, store_uri)


def status_of(record: RunRecord, run: RunView, store_uri: str) -> dict[str, Any]:
    """The `--json` object of a run's record and its view."""
    cfg = record.config
    launcher = run.launcher
    summary = record.summary or {}
    # Every restart and its cause: the launcher reports them as it goes, the summary at the end.
    reported = launcher.launcher.recoveries if launcher and launcher.launcher else None
    recoveries = summary.get("recoveries") or [dict(r) for r in reported or ()]
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
        "recoveries": recoveries or [],
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


def print_status(status: dict[str, Any]) -> None:
    state = "finished" if status["finished"] else "not finished"
    print(
        f"run {status['run_id']} ({status['mode']}, {status['shards']} shards, "
        f"{status['workers']} workers, {status['steps']} steps): {state}"
    )
    print(
        f"{'role':<9}{'id':>3} {'pid':>8} {'epoch':>6} {'alive':>6} {'clock':>6} "
        f"{'version':>8} {'peak MB':>8}  address"
    )
    for m in status["members"]:
        print(
            f"{m['role']:<9}{m['id']:>3} {m['pid']:>8} {m['epoch']:>6} "
            f"{'yes' if m['alive'] else 'no':>6} {_dash(m['clock']):>6} "
            f"{_dash(m['version']):>8} {_dash(m['peak_rss_mb']):>8}  {m['address'] or '-'}"
        )
    for r in status["recoveries"]:
        recovered = ""
        if r["recovery_s"] is not None:
            recovered = f"; serving again {r['recovery_s']:.2f}s later"
        who = member_name(r["role"], r["id"])
        print(f"restart: {who} (epoch {r['epoch']}) {r['detail']}{recovered}")


def _mb(nbytes: Any) -> float | None:
    return None if nbytes is None else round(float(nbytes) / 2**20, 1)


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)


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


def run(args: argparse.Namespace) -> int:
    status = run_status(run_dir=args.run_dir, store_uri=args.store, run_id=args.run)
    if args.json:
        emit_json(status)
    else:
        print_status(status)
    return EXIT_OK

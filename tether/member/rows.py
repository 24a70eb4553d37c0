"""A run as a user reads it: the one renderer of a `RunView` into rows (DESIGN §9, §13).

`rows(run, previous)` is pure: a run's view (and the view one read earlier, for rates) in, one
`Row` per member out, with typed numbers and, by `Row.cells`, the text of each column of
`COLUMNS`. `header(record, run)` is the line above them: the run, its mode, its progress and how
long it has run. Every view of a run is drawn from these: plain `tether status` prints them as a
text table, `tether status --watch` draws them in a live table once a second
(`tether/cli/watch.py`), and the launcher's progress line takes its numbers from them
(`tether/driver/progress.py`). Nothing here reads the store or the clock.

A rate is the member's progress between two reads -- a worker's clock, a shard's version -- over
the time between the two heartbeats that reported them, on the store's clock; it is None on the
first read, for a new registration (a restart), and when no heartbeat came between the reads.
Restarts are the epochs a member went through (every replacement registers the next one, DESIGN
§5); their causes are the launcher's record of each restart (`LauncherReport.recoveries` while
it trains, the summary's `recoveries` after).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from tether.member.view import MemberLife, RunView
from tether.roles import member_name
from tether.store import RunRecord

# The columns of every table of a run, in order (`Row.cells`).
COLUMNS: tuple[str, ...] = (
    "member",
    "phase",
    "alive",
    "clock",
    "rate/s",
    "waits",
    "repl lag",
    "restarts",
    "loss",
)

# Shards first, then workers, then the launcher; each by id.
_ROLE_ORDER = {"server": 0, "worker": 1, "launcher": 2}


@dataclass(frozen=True, slots=True)
class Row:
    """One member as a user reads it. A number the member has not reported is None."""

    role: str
    member_id: int
    epoch: int
    phase: str  # "starting", "serving", "training", "train"; or its state once not running
    alive: bool
    why: str | None  # why it is not alive (`MemberLife.why_not_alive`): "exited", "silent 7s"
    clock: int | None  # a worker's clock, a shard's version
    rate: float | None  # clock per second since the previous read (steps or updates)
    samples_per_s: float | None  # a worker's, since it started training
    wait_s: float | None  # a worker's time waiting for pulls so far
    lag_entries: int | None  # a shard's applied updates not yet durable
    lag_max_s: float | None  # a shard's longest replication lag so far
    restarts: int
    causes: tuple[str, ...]  # why each restart happened, in order ("SIGKILL", "probe_failed")
    loss: float | None  # a worker's last mini-batch loss
    pid: int
    address: str
    peak_rss_mb: float | None

    @property
    def name(self) -> str:
        return member_name(self.role, self.member_id)

    def cells(self) -> tuple[str, ...]:
        """The text of each column of `COLUMNS`."""
        lag = "-"
        if self.lag_entries is not None:
            lag = str(self.lag_entries)
            if self.lag_max_s is not None:
                lag += f" (max {self.lag_max_s:.2f}s)"
        restarts = str(self.restarts)
        if self.causes:
            restarts += f" ({', '.join(self.causes)})"
        return (
            self.name,
            self.phase,
            "yes" if self.alive else "no" if self.why in (None, "exited") else self.why,
            _dash(self.clock),
            "-" if self.rate is None else f"{self.rate:.1f}",
            "-" if self.wait_s is None else f"{self.wait_s:.1f}s",
            lag,
            restarts,
            "-" if self.loss is None or math.isnan(self.loss) else f"{self.loss:.4f}",
        )

    def brief(self) -> str:
        """The row in a few words, for a line of a log: what is known and not plain."""
        parts = [self.name]
        if self.clock is not None:
            parts.append(f"{'v' if self.role == 'server' else 'clock '}{self.clock}")
        if self.rate is not None:
            parts.append(f"{self.rate:.1f}/s")
        if self.loss is not None and not math.isnan(self.loss):
            parts.append(f"loss {self.loss:.4f}")
        if self.lag_entries:
            parts.append(f"lag {self.lag_entries}")
        if self.restarts:
            parts.append(f"restarts {self.cells()[7]}")
        if not self.alive and self.why != "exited":
            parts.append(f"({self.why or 'not alive'})")
        return " ".join(parts)


def rows(
    run: RunView,
    previous: RunView | None = None,
    recoveries: Sequence[Mapping[str, Any]] | None = None,
) -> list[Row]:
    """One row per member of `run`, shards, workers, then the launcher. `previous` is the view
    one read earlier (rates); `recoveries` the run's restarts with their causes (None: the ones
    the launcher reports in its record)."""
    if recoveries is None:
        recoveries = reported_recoveries(run)
    before = {} if previous is None else {_registration(life): life for life in previous.members}
    lives = sorted(run.members, key=_order)
    return [_row(life, before.get(_registration(life)), recoveries) for life in lives]


def _order(life: MemberLife) -> tuple[int, int]:
    return (_ROLE_ORDER.get(life.view.role, len(_ROLE_ORDER)), life.view.member_id)


def _registration(life: MemberLife) -> tuple[str, int, int]:
    m = life.view
    return (m.role, m.member_id, m.epoch)


def _row(
    life: MemberLife, before: MemberLife | None, recoveries: Sequence[Mapping[str, Any]]
) -> Row:
    m = life.view
    clock = m.clock if m.role == "worker" else m.version
    rate = None
    if before is not None and clock is not None:
        was = before.view.clock if m.role == "worker" else before.view.version
        dt = m.heartbeat - before.view.heartbeat
        if was is not None and dt > 0:
            rate = max(0, clock - was) / dt
    w, s = m.worker, m.shard
    lag_entries = None
    if s is not None and s.version is not None and s.durable_version is not None:
        lag_entries = max(0, s.version - s.durable_version)
    causes = tuple(
        cause_label(r) for r in recoveries if (r.get("role"), r.get("id")) == (m.role, m.member_id)
    )
    return Row(
        role=m.role,
        member_id=m.member_id,
        epoch=m.epoch,
        phase=_phase(life),
        alive=life.alive,
        why=life.why_not_alive,
        clock=clock,
        rate=rate,
        samples_per_s=None if w is None else w.samples_per_s,
        wait_s=None if w is None else w.wait_s,
        lag_entries=lag_entries,
        lag_max_s=None if s is None else s.replication_lag_max_s,
        restarts=max(m.epoch - 1, len(causes)),
        causes=causes,
        loss=None if w is None else w.loss,
        pid=m.pid,
        address=m.address,
        peak_rss_mb=None if m.peak_rss_bytes is None else round(m.peak_rss_bytes / 2**20, 1),
    )


def _phase(life: MemberLife) -> str:
    m = life.view
    if m.state != "running":
        return m.state
    if m.phase:
        return m.phase
    if m.role == "worker":
        return "training" if m.serving else "starting"
    return "-"


def cause_label(recovery: Mapping[str, Any]) -> str:
    """A restart's cause in a word: the signal or exit code of a crash, else the detector's
    or the engine's cause ("probe_failed", "startup_deadline", "node_lost")."""
    cause, code = recovery.get("cause"), recovery.get("exit_code")
    if cause == "exited" and isinstance(code, int):
        detail = str(recovery.get("detail") or "")
        if code < 0 and detail.endswith(")") and "(" in detail:
            return detail[detail.rindex("(") + 1 : -1]  # "exited with code -9 (SIGKILL)"
        return f"exit {code}"
    return str(cause or "?")


def reported_recoveries(
    run: RunView, summary: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every restart and its cause: the summary's once the run has one, else what the launcher
    reports in its record as it goes (none for a run without a launcher)."""
    if summary and summary.get("recoveries"):
        return [dict(r) for r in summary["recoveries"]]
    launcher = run.launcher
    reported = launcher.launcher.recoveries if launcher and launcher.launcher else None
    return [dict(r) for r in reported or ()]


# -- the line above the rows --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """The run as a whole: what it is, how far it got, how long it has run."""

    run_id: str
    mode: str  # "bsp", "ssp(2)", "asp"
    shards: int | None
    workers: int | None
    steps: int | None  # each worker's iterations
    done: int  # the slowest worker's clock (0 before every worker reported one)
    elapsed_s: float
    finished: bool

    def text(self) -> str:
        progress = f"step {self.done}"
        if self.steps:
            progress += f"/{self.steps} ({100 * min(self.done, self.steps) // self.steps}%)"
        state = "finished" if self.finished else "running"
        return (
            f"run {self.run_id}: {self.mode}, {_dash(self.shards)} shards, "
            f"{_dash(self.workers)} workers; {progress}; {self.elapsed_s:.1f}s; {state}"
        )


def header(record: RunRecord, run: RunView) -> Header:
    """The header of a run's record and its view. Elapsed is the summary's wall time once the
    run finished, else the time since the run was created, at the read."""
    cfg = record.config
    mode = str(cfg.get("mode") or "-")
    if mode == "ssp":
        mode += f"({cfg.get('staleness')})"
    workers = [life.view for life in run.workers]
    expected = _int(cfg.get("workers"))
    clocks = [w.clock or 0 for w in workers]
    done = min(clocks) if clocks and (expected is None or len(clocks) >= expected) else 0
    summary = record.summary or {}
    wall = summary.get("wall_s")
    finished_wall = float(wall) if record.finished and isinstance(wall, int | float) else None
    elapsed = finished_wall if finished_wall is not None else run.at - record.created_at
    return Header(
        run_id=record.run_id,
        mode=mode,
        shards=_int(cfg.get("shards")),
        workers=expected,
        steps=_int(cfg.get("steps")),
        done=done,
        elapsed_s=max(0.0, elapsed),
        finished=record.finished,
    )


def finished_line(record: RunRecord) -> str:
    """One line once a run finished: its outcome from the summary."""
    s = record.summary or {}
    parts = []
    for key, label in (("final_loss", "final loss"), ("test_accuracy", "test accuracy")):
        if isinstance(s.get(key), int | float):
            parts.append(f"{label} {s[key]:.4f}")
    if isinstance(s.get("wall_s"), int | float):
        parts.append(f"{s['wall_s']:.1f}s")
    restarts = s.get("restarts")
    if isinstance(restarts, Mapping):
        parts.append(
            f"restarts {restarts.get('server', 0)} shard, {restarts.get('worker', 0)} worker"
        )
    return f"run {record.run_id} finished" + (f": {', '.join(parts)}" if parts else "")


def text_table(table: Sequence[Sequence[str]], columns: Sequence[str] = COLUMNS) -> list[str]:
    """Rows of cells as aligned plain-text lines under their column names."""
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (tuple(columns), *table)
    ]


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)


def rich_table(table_rows: Sequence[Row], title: str | None = None) -> Table:
    """The rows as a rich table (the launcher's live progress, `tether status --watch`), each
    member that is not alive, and had not exited, in red; the restarts and their causes below."""
    table = Table(title=title, title_justify="left", expand=False)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("member", "phase", "alive") else "right")
    for row in table_rows:
        gone = not row.alive and row.why != "exited"
        table.add_row(*row.cells(), style="red" if gone else None)
    return table

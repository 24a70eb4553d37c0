"""Progress of a run on a terminal: steps, loss and throughput per worker (DESIGN §9).

On a terminal a live table redraws in place; otherwise (logs, CI, `--json`) one line is printed
every few seconds, so long runs never look hung. It renders the run's `RunView`
(`tether.member.view`), the view `tether status` renders too: a member that view does not take
as alive is marked, with why ("silent 7s", "no process", "failed").
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import NamedTuple, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from tether.config import RunConfig
from tether.member.view import MemberLife, RunView
from tether.roles import member_name

_PLAIN_EVERY_S = 2.0


class ProgressView:
    def __init__(self, config: RunConfig, out: TextIO) -> None:
        self.config = config
        self.console = Console(file=out, stderr=True)
        self.out = out
        self.live: Live | None = None
        self._last_plain = 0.0
        self._last_line = ""
        self._printed = ""  # the last line printed: the same state is not printed twice

    def __enter__(self) -> ProgressView:
        if self.console.is_terminal:
            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.live is not None:
            self.live.__exit__(exc_type, exc, tb)
        elif self._last_line and self._last_line != self._printed:
            print(self._last_line, file=self.out, flush=True)

    def update(self, run: RunView) -> None:
        if self.live is not None:
            self.live.update(self._table(run))
            return
        line = self._line(run)
        now = time.monotonic()
        self._last_line = line
        if not run.workers and line == self._printed:
            return  # "starting workers" says nothing new when said again
        if now - self._last_plain >= _PLAIN_EVERY_S:
            self._last_plain = now
            self._printed = line
            print(line, file=self.out, flush=True)

    def _table(self, run: RunView) -> Table:
        steps = self.config.steps
        table = Table(title=f"run {self.config.run_id}", expand=False)
        for col in ("worker", "step", "loss", "samples/s", "waiting", "alive"):
            table.add_column(col, justify="right")
        for life in run.workers:
            r = _report(life)
            table.add_row(
                str(life.view.member_id),
                f"{r.clock}/{steps}",
                f"{r.loss:.4f}",
                f"{r.samples_per_s:.0f}",
                f"{r.wait_s:.1f}s",
                _why(life) or "yes",
            )
        if others := _others(run):
            table.caption = "; ".join(others)
        return table

    def _line(self, run: RunView) -> str:
        parts = []
        for life in run.workers:
            r = _report(life)
            why = _why(life)
            parts.append(
                f"w{life.view.member_id} {r.clock}/{self.config.steps} loss {r.loss:.3f} "
                f"{r.samples_per_s:.0f}/s" + (f" ({why})" if why else "")
            )
        return "tether: " + " | ".join((parts or ["starting workers"]) + _others(run))


class _Shown(NamedTuple):
    clock: int
    loss: float
    samples_per_s: float
    wait_s: float


def _report(life: MemberLife) -> _Shown:
    """A worker's numbers as shown: what it has not reported yet as 0 (its loss as nan)."""
    w = life.view.worker
    if w is None:
        return _Shown(0, float("nan"), 0.0, 0.0)
    return _Shown(
        w.clock or 0,
        float("nan") if w.loss is None else w.loss,
        w.samples_per_s or 0.0,
        w.wait_s or 0.0,
    )


def _why(life: MemberLife) -> str | None:
    """Why a member is shown as not alive; a member that exited (a worker done, a shard stopped
    at the end) is not news."""
    why = life.why_not_alive
    return None if why == "exited" else why


def _others(run: RunView) -> list[str]:
    """The shards (and the launcher) that the run's view does not take as alive, and why."""
    return [
        f"{member_name(life.view.role, life.view.member_id)} ({why})"
        for life in run.members
        if life.view.role != "worker" and (why := _why(life))
    ]

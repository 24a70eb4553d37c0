"""Progress of a run on a terminal: steps, loss and throughput per worker (DESIGN §9).

On a terminal a live table redraws in place; otherwise (logs, CI, `--json`) one line is printed
every few seconds, so long runs never look hung. Both are drawn from the rows of the run's
`RunView` (`tether.member.rows`), which `tether status` and `tether status --watch` draw too: a
member that view does not take as alive is marked, with why ("silent 7s", "no process",
"failed").
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from tether.config import RunConfig
from tether.member.rows import Row, rich_table, rows
from tether.member.view import RunView

_PLAIN_EVERY_S = 2.0
_RATE_OVER_S = 1.0


class ProgressView:
    def __init__(self, config: RunConfig, out: TextIO) -> None:
        self.config = config
        self.console = Console(file=out, stderr=True)
        self.out = out
        self.live: Live | None = None
        self._last_plain = 0.0
        self._last_line = ""
        self._printed = ""  # the last line printed: the same state is not printed twice
        self._previous: RunView | None = None  # the read rates are taken over

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

    def _rows(self, run: RunView) -> list[Row]:
        """The run's rows (`tether.member.rows`), with rates over a read at least a second
        before this one."""
        previous = self._previous
        if previous is None or run.at - previous.at >= _RATE_OVER_S:
            self._previous = run
        return rows(run, previous)

    def _table(self, run: RunView) -> Table:
        return rich_table(self._rows(run), title=f"run {self.config.run_id}")

    def _line(self, run: RunView) -> str:
        parts, others = [], []
        for row in self._rows(run):
            why = None if row.why == "exited" else row.why  # a member done is not news
            if row.role != "worker":
                if why:
                    others.append(f"{row.name} ({why})")
                continue
            loss = float("nan") if row.loss is None else row.loss
            parts.append(
                f"w{row.member_id} {row.clock or 0}/{self.config.steps} loss {loss:.3f} "
                f"{row.samples_per_s or 0.0:.0f}/s" + (f" ({why})" if why else "")
            )
        return "tether: " + " | ".join((parts or ["starting workers"]) + others)

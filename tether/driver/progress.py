"""Progress of a run on a terminal: steps, loss and throughput per worker (DESIGN §9).

On a terminal a live table redraws in place; otherwise (logs, CI, `--json`) one line is printed
every few seconds, so long runs never look hung.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from tether.config import RunConfig
from tether.store import Member

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

    def update(self, workers: list[Member]) -> None:
        if self.live is not None:
            self.live.update(self._table(workers))
            return
        line = self._line(workers)
        now = time.monotonic()
        self._last_line = line
        starting_again = not workers and line == self._printed  # said once is enough
        if now - self._last_plain >= _PLAIN_EVERY_S and not starting_again:
            self._last_plain = now
            self._printed = line
            print(line, file=self.out, flush=True)

    def _table(self, workers: list[Member]) -> Table:
        steps = self.config.steps
        table = Table(title=f"run {self.config.run_id}", expand=False)
        for col in ("worker", "step", "loss", "samples/s", "waiting"):
            table.add_column(col, justify="right")
        for m in workers:
            info = m.info
            clock = info.get("clock", 0)
            table.add_row(
                str(m.member_id),
                f"{clock}/{steps}",
                f"{info.get('loss', float('nan')):.4f}",
                f"{info.get('samples_per_s', 0.0):.0f}",
                f"{info.get('wait_s', 0.0):.1f}s",
            )
        return table

    def _line(self, workers: list[Member]) -> str:
        parts = [
            f"w{m.member_id} {m.info.get('clock', 0)}/{self.config.steps} "
            f"loss {m.info.get('loss', float('nan')):.3f} "
            f"{m.info.get('samples_per_s', 0.0):.0f}/s"
            for m in workers
        ]
        return "tether: " + (" | ".join(parts) if parts else "starting workers")

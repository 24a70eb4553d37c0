"""`tether status --watch`: the run redrawn once a second until it ends (DESIGN §9, §13).

Each read is the one `tether status` makes (`read_run`), kept going: the view is updated from the
previous one (`observe`), so each member's lease adapts to the heartbeat intervals it has seen,
and the rows (`tether.member.rows`) carry rates between the two reads. On a terminal a rich
`Live` redraws the header and the members' table in place; otherwise (a pipe, a log) a plain line
is printed per read, with no ANSI codes, so it can be logged.

It ends when the store marks the run finished: the last frame stays and one line gives the
outcome, exit 0. A run whose launcher is gone (its record no longer running, or its process gone
on this host) without the run finishing has ended too: exit 1, naming the launcher. A run with
no launcher (members started by another scheduler, DESIGN §12) is watched until it finishes.
Ctrl-C stops the live table cleanly and exits 130, as a shell reports an interrupted command.
The loop takes its read as a function (`tether status` passes `read_run` over its open store),
so it is driven in tests with records made by hand.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from tether.exitcodes import EXIT_FAILED, EXIT_OK
from tether.member.rows import Row, finished_line, header, reported_recoveries, rich_table, rows
from tether.member.view import Here, RunView
from tether.store import RunRecord

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports an interrupted command

# One read of the run, given the view of the read before (None at the first).
Read = Callable[[RunView | None], tuple[RunRecord, RunView]]


def watch(
    read: Read,
    interval_s: float,
    *,
    out: TextIO | None = None,
    here: Here | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Read and draw the run every `interval_s` seconds until it ends; the exit code."""
    console = Console(file=out if out is not None else sys.stdout, highlight=False)
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None
    here = here or Here.this_host()
    previous: RunView | None = None
    try:
        if live is not None:
            live.start()
        while True:
            record, run = read(previous)
            table_rows = rows(run, previous, reported_recoveries(run, record.summary))
            if live is not None:
                frame = Group(Text(header(record, run).text()), rich_table(table_rows))
                live.update(frame, refresh=True)
            else:
                console.print(Text(plain_line(record, run, table_rows)), soft_wrap=True)
            if record.finished:
                outcome, code = finished_line(record), EXIT_OK
                break
            if (gone := launcher_gone(run, here)) is not None:
                outcome, code = f"run {record.run_id} ended without finishing: {gone}", EXIT_FAILED
                break
            previous = run
            sleep(interval_s)
    except KeyboardInterrupt:
        if live is not None:
            live.stop()  # before the message, below the last frame
        print("tether status: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        # The last frame stays; the cursor comes back, whatever ended the loop (a store error
        # too, which the command line reports).
        if live is not None:
            live.stop()
    console.print(Text(outcome), soft_wrap=True)
    return code


def plain_line(record: RunRecord, run: RunView, table_rows: list[Row]) -> str:
    """A read as one line of a log: the header, then each member in a few words."""
    return " | ".join([header(record, run).text(), *(r.brief() for r in table_rows)])


def launcher_gone(run: RunView, here: Here) -> str | None:
    """Why the run's launcher is gone, or None (alive, or not a run with a launcher). Silence
    alone is not gone: a launcher reading the final parameters stops beating for a while."""
    for life in run.role("launcher"):
        m = life.view
        if m.state != "running":
            return f"launcher 0 {m.state}"
        if m.host == here.host and not here.pid_alive(m.pid):
            return f"launcher 0 (pid {m.pid}) is no longer running"
    return None

"""A member's heartbeat: a thread with its own store connection (DESIGN §5 Liveness).

Heartbeats must never queue behind the member's real work. So the thread owns its connection
(a shard's replication writes and a worker's metric flushes hold their own), a SQLite write
waits at most ``busy_timeout_s`` for another process's write lock (a large state save elsewhere)
and is skipped rather than queued when it cannot get it -- the next beat tries again -- and the
``info`` callback must not block (a shard takes its lock with a timeout and beats without
statistics when the lock is busy). A late beat is no longer fatal anyway: the launcher only
suspects a member whose heartbeats stop and confirms with a direct probe before acting.

Each beat also reads whether the store marks the run finished; `on_run_finished` is then called
once and the beats stop: that is how every member, whoever started it, exits 0 when the run is
done (DESIGN §12).

What the thread adds to every beat is a `BeatReport` (`tether.member.report`): the beats it
skipped, the process's peak memory, the token of the driver's start that made it and the URL of
its metrics endpoint, if it serves one. The token
is read at the edge (the member's command line, from `TETHER_SPAWN`) and handed in (STYLE §7).
"""

from __future__ import annotations

import resource
import threading
from collections.abc import Callable
from typing import Any

from tether.member.report import BeatReport
from tether.roles import Role
from tether.store import Fenced, Store, StoreError, open_store

BUSY_TIMEOUT_S = 1.0


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Heartbeat:
    def __init__(
        self,
        store_uri: str,
        run_id: str,
        role: Role,
        member_id: int,
        epoch: int,
        *,
        interval_s: float,
        info: Callable[[], dict[str, Any]] = dict,
        after_beat: Callable[[Store], None] | None = None,
        on_fenced: Callable[[Fenced], None] | None = None,
        on_run_finished: Callable[[], None] | None = None,
        spawn: str = "",
        metrics_url: str | None = None,
    ) -> None:
        self.store_uri, self.run_id, self.role = store_uri, run_id, role
        self.member_id, self.epoch, self.interval_s = member_id, epoch, interval_s
        self.info, self.after_beat, self.on_fenced = info, after_beat, on_fenced
        self.on_run_finished = on_run_finished
        # The driver's token for the start that made this process (tether.driver.spawner), or
        # "" when no driver started it.
        self.spawn = spawn
        self.metrics_url = metrics_url  # the member's /metrics, if it serves one (DESIGN §13)
        self.stop = threading.Event()
        self.beats = 0
        self.skipped = 0  # beats that could not be written (store busy or unreachable)
        self._thread = threading.Thread(target=self._run, name=f"{role}-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        self.stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        store: Store | None = None
        try:
            while True:
                try:
                    if store is None:  # opened here, so a busy store at start is retried too
                        store = open_store(self.store_uri, busy_timeout_s=BUSY_TIMEOUT_S)
                    beat = BeatReport(
                        self.skipped, peak_rss_bytes(), self.spawn or None, self.metrics_url
                    )
                    info = {**self.info(), **beat.to_info()}
                    store.heartbeat(self.run_id, self.role, self.member_id, self.epoch, info)
                    self.beats += 1
                    if self.on_run_finished is not None and store.get_run(self.run_id).finished:
                        self.on_run_finished()
                        return
                except Fenced as e:
                    if self.on_fenced is not None:
                        self.on_fenced(e)
                    return
                except StoreError:
                    self.skipped += 1  # busy or unreachable: the next beat tries again
                if store is not None and self.after_beat is not None:
                    self.after_beat(store)
                if self.stop.wait(self.interval_s):
                    return
        finally:
            if store is not None:
                store.close()

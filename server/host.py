"""The one lock around a shard's state, shared by its adapters (DESIGN §5, STYLE §2).

`ShardHost` holds the `ShardState` and the one Condition that guards it. The gRPC servicer and the
replicator both work through it, so neither depends on the other: each takes the lock, feeds the
core an event, and wakes the other side's waiters when the core's answer says something moved
(clocks, durability, a stop). No I/O happens while the lock is held except copying bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tether.server.messages import Stop
from tether.server.state import ShardState


class ShardHost:
    def __init__(self, state: ShardState) -> None:
        self.state = state
        self._cond = threading.Condition()

    @contextmanager
    def locked(self) -> Iterator[ShardState]:
        """Hold the shard's lock; the state may only be read or fed events inside."""
        with self._cond:
            yield self.state

    @contextmanager
    def locked_within(self, timeout_s: float) -> Iterator[ShardState | None]:
        """Hold the lock if it can be had within `timeout_s`; None when it could not."""
        if not self._cond.acquire(timeout=timeout_s):
            yield None
            return
        try:
            yield self.state
        finally:
            self._cond.release()

    def wait(self, timeout_s: float) -> None:
        """Release the lock until notified or `timeout_s` passed (lock held)."""
        self._cond.wait(timeout_s)

    def notify_all(self) -> None:
        """Wake every waiting call so it asks the core again (lock held)."""
        self._cond.notify_all()

    def stop(self, *, fenced: bool) -> Stop:
        """Feed the core a stop (fenced: a newer epoch replaced this shard) and wake every
        waiting call, which the core now refuses."""
        with self._cond:
            stopped = self.state.stop(fenced=fenced)
            self._cond.notify_all()
        return stopped

"""Test helpers shared by several test modules (imported as `helpers`: tests/ is on sys.path)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tether.store import Member, open_store

RUN = "run-t"
REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    """Poll a condition with a deadline; fail the test with `what` if it never holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(0.01)


class RunWatch:
    """Reads a running launch's members from its store."""

    def __init__(self, run_dir: Path) -> None:
        self.db = run_dir / "tether.db"
        self.store = None

    def members(self) -> list[Member]:
        if self.store is None:
            if not self.db.exists():
                return []
            self.store = open_store(f"sqlite:///{self.db}")
        runs = self.store.list_runs()
        return self.store.members(runs[0].run_id) if runs else []

    def member(self, role: str, mid: int) -> Member | None:
        return next((m for m in self.members() if (m.role, m.member_id) == (role, mid)), None)

    def min_clock(self) -> int:
        workers = [m for m in self.members() if m.role == "worker"]
        return min((m.info.get("clock", 0) for m in workers), default=0) if workers else 0

    def addresses_at(self, clock: int, timeout_s: float = 300) -> dict[tuple[str, int], str]:
        """Once every worker reached `clock`: (role, id) -> the address each member advertised."""
        wait_until(lambda: self.min_clock() >= clock, timeout_s, f"workers to reach clock {clock}")
        return {(m.role, m.member_id): m.address for m in self.members() if m.address}

    def kill_at(self, clock: int, role: str, mid: int, sig: int = signal.SIGKILL) -> int:
        """Once every worker reached `clock`, send `sig` to the member; returns its pid."""
        wait_until(lambda: self.min_clock() >= clock, 120, f"workers to reach clock {clock}")
        m = self.member(role, mid)
        assert m is not None and m.state == "running"
        os.kill(m.pid, sig)
        return m.pid

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

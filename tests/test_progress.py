"""Progress lines of a run when stderr is not a terminal (DESIGN §9)."""

from __future__ import annotations

import io

import tether.driver.progress
from tether.config import LivenessPolicy, RunConfig
from tether.driver.progress import ProgressView
from tether.member.view import Here, MemberView, RunView, observe
from tether.store import Member


def worker(clock: int) -> Member:
    return Member("r", "worker", 0, 1, "", 1, "h", 0.0, 0.0, "running",
                  {"clock": clock, "loss": 0.5, "samples_per_s": 100.0})  # fmt: skip


def seen(members: list[Member]) -> RunView:
    """The run as read when the records were written (every heartbeat is fresh)."""
    views = [MemberView.of(m) for m in members]
    return observe(None, "r", views, LivenessPolicy(), now=0.0, here=Here("h", lambda pid: True))


def line(clock: int) -> str:
    return f"tether: w0 {clock}/10 loss 0.500 100/s"


def run_view(monkeypatch, updates: list[tuple[float, int]]) -> list[str]:
    """Feed (time, clock) updates to a plain (non-terminal) view; return the printed lines."""
    now = [0.0]
    monkeypatch.setattr(tether.driver.progress.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    with ProgressView(RunConfig(run_id="r", steps=10), out) as view:
        for t, clock in updates:
            now[0] = 100.0 + t
            view.update(seen([worker(clock)]))
    return out.getvalue().splitlines()


def test_plain_progress_prints_every_two_seconds_and_the_final_state(monkeypatch):
    # A held-back last state is printed when the view closes.
    assert run_view(monkeypatch, [(0, 3), (0.5, 7), (1.0, 10)]) == [line(3), line(10)]
    # A state already printed last is not printed again at the close.
    assert run_view(monkeypatch, [(0, 3), (3, 10), (3.1, 10)]) == [line(3), line(10)]
    # A stalled run keeps printing (it does not look hung).
    assert run_view(monkeypatch, [(0, 3), (2, 3), (4, 3)]) == [line(3)] * 3

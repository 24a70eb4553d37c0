"""Controlling a driver from another thread (chaos runs): requests only while it trains.

The driver's watch loop serves its `Mailbox` between passes; these tests drive a mailbox from a
stand-in loop thread, and check that a launcher outside training refuses requests at once.
"""

from __future__ import annotations

import io
import signal
import threading
from pathlib import Path

import pytest

from helpers import wait_until
from tether.config import RunConfig
from tether.driver.control import Mailbox
from tether.driver.launcher import Child, Launcher, LaunchOptions


def launcher(tmp_path: Path) -> Launcher:
    opts = LaunchOptions(RunConfig(run_id="r"), tmp_path, f"sqlite:///{tmp_path / 'db'}")
    return Launcher(opts, io.StringIO())


def test_a_request_outside_training_fails_at_once(tmp_path):
    with pytest.raises(LookupError, match="not training now"):
        launcher(tmp_path).call(lambda: 1, timeout_s=30)


def test_requests_are_served_by_the_loop_and_failed_when_it_ends():
    mailbox = Mailbox()
    finish = threading.Event()
    served_by: list[str] = []
    late = []

    def watch_loop():  # stands in for the driver's loop: serve until told to end
        with mailbox.open():
            while not finish.is_set():
                mailbox.serve()
            late.append(mailbox.post(lambda: "late"))  # arrived just as the loop ended

    loop = threading.Thread(target=watch_loop, name="watch")
    loop.start()
    wait_until(lambda: mailbox.is_open, what="the watch loop to start")
    assert mailbox.call(lambda: served_by.append(threading.current_thread().name) or 42) == 42
    assert served_by == ["watch"]  # run by the loop's thread
    finish.set()
    loop.join(30)
    with pytest.raises(LookupError, match="finished before the request was served"):
        late[0].result(timeout=1)
    with pytest.raises(LookupError, match="not training now"):
        mailbox.call(lambda: 1)


def test_an_exception_in_a_request_goes_to_the_caller_and_the_loop_goes_on():
    mailbox = Mailbox()
    finish = threading.Event()

    def watch_loop():
        with mailbox.open():
            while not finish.is_set():
                mailbox.serve()

    loop = threading.Thread(target=watch_loop)
    loop.start()
    wait_until(lambda: mailbox.is_open, what="the watch loop to start")
    with pytest.raises(ZeroDivisionError):
        mailbox.call(lambda: 1 / 0)
    assert mailbox.call(lambda: "still serving") == "still serving"
    finish.set()
    loop.join(30)


class _Process:
    """A stand-in handle: runs until `exit_after` polls have passed (never, when None)."""

    def __init__(self, pid: int, exit_after: int | None, code: int = 1) -> None:
        self.pid, self.exit_after, self.code = pid, exit_after, code
        self.polls = 0
        self.signals: list[int] = []

    def poll(self) -> int | None:
        self.polls += 1
        done = self.exit_after is not None and self.polls > self.exit_after
        return self.code if done else None

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)


def test_a_resumed_zombie_s_exit_is_recorded_even_after_the_workers_finished(tmp_path):
    """A replaced process resumed near the end is fenced a moment later: the driver waits for
    that exit and records it with its code; one still paused is not waited for."""
    lau = launcher(tmp_path)
    zombie = Child("server", 1, _Process(101, exit_after=5), superseded=True)
    paused = Child("server", 0, _Process(102, exit_after=None), superseded=True)
    lau.children = [zombie, paused]
    lau.signal_pid(102, signal.SIGSTOP)
    lau.signal_pid(101, signal.SIGSTOP)
    lau.signal_pid(101, signal.SIGCONT)  # resumed: it runs, and will be fenced
    assert paused.stopped and not zombie.stopped
    lau._await_replaced(None, set())  # the watch loop's last step
    exits = [e for e in lau.events if e["kind"] == "exit"]
    assert exits == [{**exits[0], "pid": 101, "exit_code": 1, "superseded": True}]
    assert lau.children == [paused]  # still paused: left for the end of the run to stop

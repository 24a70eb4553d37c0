"""Controlling a driver from another thread (chaos runs): requests only while it trains.

The driver's watch loop serves its `Mailbox` between passes; these tests drive a mailbox from a
stand-in loop thread, and check that a launcher outside training refuses requests at once.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest

from helpers import wait_until
from tether.config import RunConfig
from tether.driver.control import Mailbox
from tether.driver.launcher import Launcher, LaunchOptions


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

"""Controlling a launcher from another thread (chaos runs): requests only while it trains."""

from __future__ import annotations

import io
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from helpers import wait_until
from tether.config import RunConfig
from tether.driver.launcher import Launcher, LaunchOptions


def launcher(tmp_path: Path) -> Launcher:
    opts = LaunchOptions(RunConfig(run_id="r"), tmp_path, f"sqlite:///{tmp_path / 'db'}")
    return Launcher(opts, io.StringIO())


def test_a_request_outside_training_fails_at_once(tmp_path):
    with pytest.raises(LookupError, match="not training now"):
        launcher(tmp_path).call(lambda: 1, timeout_s=30)


def test_requests_are_served_by_the_loop_and_failed_when_it_ends(tmp_path):
    la = launcher(tmp_path)
    finish = threading.Event()
    late: Future[object] = Future()

    def watch_members(store, view):  # stands in for the real loop: serve until told to end
        while not finish.is_set():
            la._serve_requests()
        la._requests.put((lambda: "late", late))  # arrived just as the loop ended

    la._watch_members = watch_members  # type: ignore[method-assign]
    loop = threading.Thread(target=la._watch, args=(None, None))
    loop.start()
    wait_until(lambda: la._watching, what="the watch loop to start")
    assert la.call(lambda: 42, timeout_s=30) == 42  # run by the loop's thread
    finish.set()
    loop.join(30)
    with pytest.raises(LookupError, match="finished before the request was served"):
        late.result(timeout=1)
    with pytest.raises(LookupError, match="not training now"):
        la.call(lambda: 1)

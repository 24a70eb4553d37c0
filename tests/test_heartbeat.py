"""Heartbeats never queue behind real work (tether/heartbeat.py, server heartbeat_info)."""

from __future__ import annotations

import sqlite3
import threading

import numpy as np

from helpers import RUN, wait_until
from tether.config import OptimizerConfig
from tether.consistency import Consistency, Mode
from tether.member.heartbeat import BUSY_TIMEOUT_S, Heartbeat
from tether.server.host import ShardHost
from tether.server.servicer import ShardServicer
from tether.server.state import ShardSpec, ShardState
from tether.store import default_store_uri, open_store


def make_run(tmp_path):
    uri = default_store_uri(tmp_path)
    store = open_store(uri)
    store.create_run(RUN, {})
    epoch = store.register(RUN, "server", 0, address="a:1", pid=1, host="h")
    return uri, store, epoch


def test_a_heartbeat_skips_rather_than_queues_behind_another_writer(tmp_path):
    uri, store, epoch = make_run(tmp_path)
    beat = Heartbeat(uri, RUN, "server", 0, epoch, interval_s=0.05, info=lambda: {"n": 1})
    # Another process-like writer holds SQLite's write lock, as a large state save does.
    blocker = sqlite3.connect(tmp_path / "tether.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    beat.start()
    try:
        # Each attempt gives up after BUSY_TIMEOUT_S instead of the store's default 10 s.
        wait_until(lambda: beat.skipped >= 2, 20 * BUSY_TIMEOUT_S, "beats to be skipped")
        assert beat.beats == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_until(lambda: beat.beats >= 2, 30, "beats to resume once the lock is free")
    wait_until(
        lambda: store.member(RUN, "server", 0).info.get("heartbeats_skipped", 0) >= 2,
        30,
        "the skipped count to be reported",
    )
    beat.close()
    store.close()


def test_a_fenced_heartbeat_stops_and_says_so(tmp_path):
    uri, store, epoch = make_run(tmp_path)
    store.register(RUN, "server", 0, address="a:2", pid=2, host="h")  # a replacement
    fenced = threading.Event()
    beat = Heartbeat(uri, RUN, "server", 0, epoch, interval_s=0.05,
                     on_fenced=lambda e: fenced.set())  # fmt: skip
    beat.start()
    assert fenced.wait(30)
    beat.close()
    assert beat.beats == 0
    store.close()


def test_shard_heartbeat_info_does_not_wait_for_a_held_lock():
    spec = ShardSpec(RUN, 0, 0, 10, 2, Consistency(Mode.BSP, 0), OptimizerConfig("sgd", lr=0.1),
                     1 << 12)  # fmt: skip
    state = ShardState(spec, np.zeros(10, np.float32))
    servicer = ShardServicer(ShardHost(state), wait_timeout_s=5.0)
    servicer.serving_since = 123.0
    first = servicer.heartbeat_info(lock_timeout_s=1.0)
    assert first["version"] == 0 and first["serving_since"] == 123.0
    held, release = threading.Event(), threading.Event()

    def hold() -> None:  # a long apply or state copy under the shard's lock
        with servicer.host.locked():
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        again = servicer.heartbeat_info(lock_timeout_s=0.01)  # returns, lock still held
        assert again == first and t.is_alive()
    finally:
        release.set()
        t.join()

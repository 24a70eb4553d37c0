"""The replication adapter against a scripted store (DESIGN §5): it executes the core's decisions.

A store that is unavailable for a while is retried until the write lands; a Fenced write becomes a
fenced stop of the core, which then refuses every push and pull itself.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from helpers import RUN, wait_until
from tether.config import OptimizerConfig, ReplicationPolicy
from tether.consistency import Consistency, Mode
from tether.server.host import ShardHost
from tether.server.replication import STORE_BACKOFF, Replicator
from tether.server.state import Ack, Code, PushHeader, Reject, ShardSpec, ShardState
from tether.store import Fenced, LogEntry, ShardSnapshot, StoreUnavailable

pytestmark = pytest.mark.timeout(60)


class ScriptedStore:
    """Raises the scripted errors, one per write, then appends (or saves a base)."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.saved: list[LogEntry] = []
        self.bases: list[ShardSnapshot] = []
        self.attempts = 0

    def append_shard_log(
        self, run_id: str, shard_id: int, epoch: int, entries: list[LogEntry]
    ) -> None:
        self.attempts += 1
        if self.errors:
            raise self.errors.pop(0)
        self.saved.extend(entries)

    def save_shard_state(self, snap: ShardSnapshot) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.bases.append(snap)


def sync_host() -> ShardHost:
    spec = ShardSpec(
        RUN, 0, 0, 10, 1, Consistency(Mode.ASP, 0), OptimizerConfig("sgd", lr=0.1),
        replication=ReplicationPolicy("sync"),
    )  # fmt: skip
    return ShardHost(ShardState(spec, np.zeros(10, np.float32)))


def push(host: ShardHost, seq: int) -> Ack | Reject:
    with host.locked() as state:
        h = PushHeader(RUN, 0, seq, seq, state.version, state.epoch, 10)
        result = state.push(h, np.ones(10, np.float32), 0.0)
        state.validate()
        host.notify_all()
    return result


def test_the_store_backoff_keeps_its_caps():
    assert [STORE_BACKOFF.cap_s(f) for f in range(7)] == [0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5]


def test_an_unavailable_store_is_retried_until_the_write_lands():
    host = sync_host()
    store = ScriptedStore([StoreUnavailable("down"), StoreUnavailable("still down")])
    failures: list[BaseException] = []
    replicator = Replicator(host, store, on_failure=failures.append)  # type: ignore[arg-type]
    replicator.start()
    try:
        assert isinstance(push(host, 0), Ack)
        wait_until(lambda: host.state.durable_version == 1, what="the write to land")
    finally:
        replicator.stop()
    assert store.attempts == 3 and [e.position for e in store.saved] == [1] and not failures
    with host.locked() as state:
        state.validate()
        assert state.status == "serving" and state.stats.replications == 1


def test_a_fenced_write_stops_the_core_fenced():
    host = sync_host()
    fenced = Fenced(RUN, "server", 0, 1, 2)
    store = ScriptedStore([fenced])
    failed = threading.Event()
    failures: list[BaseException] = []

    def on_failure(e: BaseException) -> None:
        failures.append(e)
        failed.set()

    replicator = Replicator(host, store, on_failure=on_failure)  # type: ignore[arg-type]
    replicator.start()
    try:
        assert isinstance(push(host, 0), Ack)
        assert failed.wait(30)
    finally:
        replicator.stop()
    assert failures == [fenced] and not store.saved
    with host.locked() as state:
        state.validate()
        assert state.status == "fenced" and state.durable_version == 0
    refused = push(host, 1)
    assert isinstance(refused, Reject) and refused.code is Code.FAILED_PRECONDITION
    assert "replaced by a newer epoch" in refused.message

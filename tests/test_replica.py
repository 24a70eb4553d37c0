"""Replication decisions and state round trips of the sans-I/O shard (DESIGN §5), no I/O."""

from __future__ import annotations

import numpy as np
import pytest

from tether.config import OptimizerConfig
from tether.consistency import Consistency, Mode
from tether.driver.policy import GiveUp, Restart, Supervisor
from tether.server.codec import from_replica, to_replica
from tether.server.state import (
    Ack,
    Code,
    PushHeader,
    ReplicationPolicy,
    Serve,
    ShardSpec,
    ShardState,
    Wait,
)
from tether.store import Member

RUN = "run-r"


def make(mode=Mode.SSP, replication="sync", workers=2, n=50, optimizer="adam", **policy):
    consistency = Consistency(mode, 1 if mode is Mode.SSP else 0)
    spec = ShardSpec(
        RUN, 0, 0, n, workers, consistency, OptimizerConfig(optimizer, lr=0.05),
        replication=ReplicationPolicy(replication, **policy),
    )  # fmt: skip
    return ShardState(spec, np.linspace(0, 1, n, dtype=np.float32))


def push(state, w, clock, now=0.0):
    g = np.random.default_rng([w, clock]).standard_normal(state.spec.length).astype(np.float32)
    h = PushHeader(RUN, w, clock, clock, state.version, state.epoch, state.spec.length)
    result = state.push(h, g, now)
    state.validate()
    return result


def replicate(state, now=0.0):
    meta, arrays = to_replica(state)
    state.replicated(state.version, now)
    return meta, arrays


def test_sync_acks_wait_for_the_version_that_includes_the_push():
    state = make(Mode.SSP, "sync")
    ack = push(state, 0, 0)
    assert ack.durable_needed == 1 and state.replication_due(0.0)
    replicate(state)
    assert state.durable_version == 1 and not state.replication_due(0.0)
    # A retry of an acknowledged push waits for the current version, never less.
    again = push(state, 0, 0)
    assert again.duplicate and again.durable_needed == state.version


def test_bsp_sync_acks_wait_for_the_clock_to_be_applied_and_durable():
    state = make(Mode.BSP, "sync")
    first = push(state, 0, 0)
    assert not first.applied and first.durable_needed == 1  # clock 0 applied -> version 1
    second = push(state, 1, 0)
    assert second.applied and second.durable_needed == 1


@pytest.mark.parametrize("replication", ["async", "off"])
def test_without_sync_nothing_waits_for_durability(replication):
    state = make(Mode.SSP, replication)
    assert push(state, 0, 0).durable_needed == 0


def test_async_replicates_every_k_updates_or_t_seconds_after_a_change():
    state = make(Mode.ASP, "async", every_updates=3, interval_s=0.5)
    assert not state.replication_due(0.0)  # nothing changed
    push(state, 0, 0, now=10.0)
    assert not state.replication_due(10.1)
    assert state.replication_wait_s(10.1) == pytest.approx(0.4)
    assert state.replication_due(10.5)  # t elapsed
    push(state, 0, 1, now=10.2)
    push(state, 0, 2, now=10.3)
    assert state.replication_due(10.3)  # k updates
    replicate(state, now=10.4)
    assert not state.replication_due(100.0)
    assert state.stats.replications == 1
    assert state.stats.replication_lag_max_s == pytest.approx(0.4)


def test_off_never_replicates():
    state = make(Mode.ASP, "off")
    push(state, 0, 0)
    assert not state.replication_due(1e9)


@pytest.mark.parametrize("mode", [Mode.BSP, Mode.SSP, Mode.ASP])
def test_a_restored_shard_continues_bit_identically(mode):
    original = make(mode, "sync")
    for clock in range(3):
        for w in (0, 1):
            push(original, w, clock)
    meta, arrays = replicate(original)
    restored = from_replica(original.spec, 2, meta, arrays)
    restored.validate()
    assert restored.epoch == 2 and restored.version == original.version
    assert restored.clocks == original.clocks
    assert restored.params.tobytes() == original.params.tobytes()
    restored.epoch = original.epoch = 1
    for state in (original, restored):
        push(state, 0, 3)
        push(state, 1, 3)
    assert restored.params.tobytes() == original.params.tobytes()
    # The de-dup table came along: the retried push is a no-op on the replacement.
    assert push(restored, 0, 3).duplicate


def test_replica_arrays_are_copies():
    state = make(Mode.ASP, "sync")
    push(state, 0, 0)
    _, named = to_replica(state)
    arrays = {name.removeprefix("dense."): a for name, a in named.items()}  # the dense table's
    before = arrays["params"].copy()
    push(state, 0, 1)
    assert np.array_equal(arrays["params"], before)


def test_bsp_serves_the_previous_version_to_a_worker_redoing_an_applied_clock():
    """Worker 0 pushed clock 0 to this shard, then died before reaching another shard; the
    others completed clock 0 here. Redoing clock 0 must read the parameters of version 0."""
    state = make(Mode.BSP, "sync")
    v0 = state.params.copy()
    push(state, 0, 0)
    push(state, 1, 0)
    assert state.version == 1
    served = state.pull(RUN, 0, 0, 0.0)
    assert isinstance(served, Serve) and served.version == 0
    assert b"".join(served.chunks) == v0.tobytes()
    assert push(state, 0, 0).duplicate
    current = state.pull(RUN, 0, 1, 0.0)
    assert isinstance(current, Serve) and current.version == 1


def test_push_timeout_names_the_missing_workers():
    state = make(Mode.BSP, "sync", workers=3)
    push(state, 0, 0)
    rejected = state.push_timed_out(0, 0, 5.0)
    assert rejected.code is Code.DEADLINE_EXCEEDED and "misses workers [1, 2]" in rejected.message


def member(role, mid, epoch, **info):
    return Member(RUN, role, mid, epoch, "", 1, "h", 0.0, 0.0, "running", info)


def test_supervisor_restarts_up_to_the_limit_and_times_recoveries():
    sup = Supervisor(max_restarts=2)
    assert sup.member_exited("server", 0, -9, now=100.0, epoch=1) == Restart(1)
    assert sup.observed(member("server", 0, 1, serving_since=100.5)) is None  # old epoch
    assert sup.observed(member("server", 0, 2)) is None  # registered, not serving yet
    rec = sup.observed(member("server", 0, 2, serving_since=100.4))
    assert rec is not None and rec.recovery_s == pytest.approx(0.4)
    assert sup.member_exited("server", 0, -9, now=200.0, epoch=2) == Restart(2)
    give_up = sup.member_exited("server", 0, 1, now=300.0, epoch=3)
    assert isinstance(give_up, GiveUp) and "shard 0" in give_up.message
    assert "--max-restarts 2" in give_up.message
    assert sup.counts() == {"server": 2, "worker": 0}
    assert isinstance(sup.member_exited("worker", 1, -9, 0.0, 1), Restart)
    assert sup.counts() == {"server": 2, "worker": 1}


def test_ack_type_default_needs_nothing():
    assert Ack(1, 1, applied=True).durable_needed == 0


# ---- the acknowledgement after durability (what the servicer sends once it waited) ----------


def durable_ack(state, ack, waited):
    before = (state.version, state.durable_version, state.revision, state.params.tobytes())
    result = state.durable_ack(ack, waited=waited)
    state.validate()
    assert (state.version, state.durable_version, state.revision, state.params.tobytes()) == before
    return result


def test_a_sync_ack_waits_for_durability_then_reports_the_current_version():
    state = make(Mode.SSP, "sync")
    ack = push(state, 0, 0)
    assert durable_ack(state, ack, waited=False) == Wait(())
    push(state, 1, 0)  # another worker's push lands while the first waits
    replicate(state)
    assert durable_ack(state, ack, waited=True) == Ack(2, 1, applied=True, duplicate=False)


def test_an_ack_already_durable_is_sent_as_push_gave_it():
    state = make(Mode.SSP, "sync")
    push(state, 0, 0)
    replicate(state)
    again = push(state, 0, 0)
    assert durable_ack(state, again, waited=False) is again
    for replication in ("async", "off"):
        other = make(Mode.SSP, replication)
        ack = push(other, 0, 0)
        assert ack.durable_needed == 0 and durable_ack(other, ack, waited=False) is ack


def test_a_held_bsp_push_is_acknowledged_applied_once_its_clock_is_durable():
    state = make(Mode.BSP, "sync")
    first = push(state, 0, 0)
    assert not first.applied and durable_ack(state, first, waited=False) == Wait(())
    push(state, 1, 0)
    assert durable_ack(state, first, waited=True) == Wait(())  # applied, not durable yet
    replicate(state)
    assert durable_ack(state, first, waited=True) == Ack(1, 1, applied=True, duplicate=False)
    retry = push(state, 0, 0)
    assert durable_ack(state, retry, waited=True) == Ack(1, 1, applied=True, duplicate=True)


@pytest.mark.parametrize(
    "fenced, code", [(False, Code.UNAVAILABLE), (True, Code.FAILED_PRECONDITION)]
)
def test_a_stop_fails_the_acks_still_waiting_for_durability(fenced, code):
    state = make(Mode.SSP, "sync")
    ack = push(state, 0, 0)
    stopped = state.stop(fenced=fenced)
    state.validate()
    assert durable_ack(state, ack, waited=True) == stopped.refusal and stopped.refusal.code is code
    replicate(state)  # the final flush of a graceful stop: what became durable is acknowledged
    assert durable_ack(state, ack, waited=True) == Ack(1, 1, applied=True, duplicate=False)


def test_a_restored_shard_reports_the_version_it_started_from():
    original = make(Mode.ASP, "sync")
    assert original.restored_version == -1
    push(original, 0, 0)
    push(original, 1, 0)
    meta, arrays = replicate(original)
    restored = from_replica(original.spec, 2, meta, arrays)
    restored.validate()
    assert restored.restored_version == 2 and restored.status == "serving"

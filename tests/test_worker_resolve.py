"""Which failures make a worker look the shards up again, and finding them (DESIGN §5).

Pure decisions and the store-reading helpers, with a fake store: no shard processes.
"""

from __future__ import annotations

import random

import grpc
import pytest

from tether.config import RunConfig
from tether.member.view import member_views
from tether.retry import RetryPolicy
from tether.store import Member, StoreUnavailable
from tether.transport import Security
from tether.worker.resolve import (
    MAX_RESOLVES_WITHOUT_PROGRESS,
    Fatal,
    GiveUp,
    Resolve,
    ResolvedShards,
    StaleShard,
    WorkerFailed,
    after_failure,
    classify,
    replaced_shards,
    status_of,
    wait_for_shards,
)

RUN = "run-r"
Code = grpc.StatusCode


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def member(shard: int, epoch: int = 1, state: str = "running", serving: bool = True) -> Member:
    info = {"serving_since": 1.0} if serving else {}
    return Member(RUN, "server", shard, epoch, f"h:{shard}", 1, "h", 0.0, 0.0, state, info)


class FakeStore:
    def __init__(self, members: list[Member]) -> None:
        self.servers = members
        self.calls = 0

    def members(self, run_id: str, role: str | None = None) -> list[Member]:
        assert run_id == RUN and role == "server"
        self.calls += 1
        return list(self.servers)


class DownStore:
    def members(self, run_id: str, role: str | None = None) -> list[Member]:
        raise StoreUnavailable("the store is down")


class FakeClient:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("code", "decision"),
    [
        (None, Resolve()),  # a stale reply or a channel closed under the call
        (Code.CANCELLED, Resolve()),  # the shard's server shut down under the call
        (Code.UNAVAILABLE, Resolve()),
        (Code.FAILED_PRECONDITION, Resolve()),  # fenced or stale epoch
        (Code.ABORTED, Resolve()),
        (Code.INVALID_ARGUMENT, Fatal()),
        (Code.DEADLINE_EXCEEDED, Fatal()),  # a wait for other workers ran out
        (Code.NOT_FOUND, Fatal()),
        (Code.INTERNAL, Fatal()),
        (Code.UNKNOWN, Fatal()),
    ],
)
def test_classify(code, decision):
    assert classify(code) == decision


def test_status_of_reads_the_code_of_rpc_errors_only():
    assert status_of(FakeRpcError(Code.ABORTED)) is Code.ABORTED
    assert status_of(StaleShard("shard 0 answered at epoch 1 < 2")) is None


def test_after_failure_gives_up_once_re_resolving_stops_making_progress():
    assert after_failure(Code.UNAVAILABLE, 0) == Resolve()
    assert after_failure(None, MAX_RESOLVES_WITHOUT_PROGRESS - 1) == Resolve()
    limit = MAX_RESOLVES_WITHOUT_PROGRESS
    assert after_failure(Code.UNAVAILABLE, limit) == GiveUp(resolutions=limit)
    assert after_failure(Code.INVALID_ARGUMENT, 0) == Fatal()
    assert after_failure(Code.INVALID_ARGUMENT, limit) == Fatal()  # fatal before giving up


def test_wait_for_shards_returns_the_running_shards_in_order():
    store = FakeStore([member(1), member(0), member(2, state="failed")])
    config = RunConfig(run_id=RUN, shards=2)
    got = wait_for_shards(store, config, timeout_s=1.0)  # type: ignore[arg-type]
    assert [m.member_id for m in got] == [0, 1]


def test_wait_for_shards_fails_naming_the_shards_it_found():
    # Shard 1 is still at its old epoch: not yet replaced, so not what the worker waits for.
    store = FakeStore([member(0, epoch=2), member(1, epoch=1)])
    config = RunConfig(run_id=RUN, shards=2)
    with pytest.raises(WorkerFailed) as failed:
        wait_for_shards(store, config, 0.0, min_epochs={0: 2, 1: 2})  # type: ignore[arg-type]
    assert str(failed.value) == (
        "worker could not reach all 2 shards within 0s: only shards [0] are registered and running"
    )
    assert failed.value.__cause__ is None and failed.value.__suppress_context__
    assert store.calls == 1


def test_replaced_shards_are_those_whose_newer_epoch_serves():
    members = [
        member(0, epoch=1),  # as resolved
        member(1, epoch=3),  # replaced and serving
        member(2, epoch=2, serving=False),  # replaced, still loading its state
        member(3, epoch=9),  # a shard this worker has not resolved
    ]
    members = member_views(members)  # the records as a reader parses them
    assert replaced_shards(members, [1, 2, 1]) == [1]
    assert replaced_shards(members, []) == []


def shards_with_clients(store, epochs: list[int]) -> tuple[ResolvedShards, list[FakeClient]]:
    config = RunConfig(run_id=RUN, shards=len(epochs))
    shards = ResolvedShards(store, config, {}, RetryPolicy(), random.Random(0), Security.insecure())
    clients = [FakeClient() for _ in epochs]
    shards.clients, shards.epochs = clients, epochs  # type: ignore[assignment]
    return shards, clients


def test_close_replaced_closes_only_the_replaced_shards_channel():
    store = FakeStore([member(0, epoch=1), member(1, epoch=2)])
    shards, clients = shards_with_clients(store, [1, 1])
    shards.close_replaced(store)  # type: ignore[arg-type]
    assert [c.closed for c in clients] == [False, True]


def test_close_replaced_does_nothing_while_the_store_is_down():
    shards, clients = shards_with_clients(FakeStore([]), [1, 1])
    shards.close_replaced(DownStore())  # type: ignore[arg-type]
    assert [c.closed for c in clients] == [False, False]

"""The replication log (DESIGN §5): appends, bases, fencing, compaction and recovery by replay.

Against both stores -- SQLite with its payload files, MongoDB through mongomock with the fault
seam -- and the real shard core: recovery (the base plus the log replayed through the same
optimizer code) must give the live shard's state bit for bit, at every point a crash can cut an
append or a base switch, and a zombie's writes must never reach what a recovery reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mongomock
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mongo_fixture import (  # noqa: F401  (mongodb_uri is a fixture used by `backend`)
    drop_database,
    fresh_database_name,
    mongodb_uri,
    with_database,
)

import tether.store.sqlite_state as sqlite_state
from helpers import wait_until
from tether.config import OptimizerConfig, ReplicationPolicy
from tether.consistency import Consistency, Mode
from tether.server.codec import recover, to_replica
from tether.server.host import ShardHost
from tether.server.replication import Compactor, Replicator
from tether.server.state import PushHeader, ShardSpec, ShardState
from tether.store import (
    Fenced,
    LogEntry,
    MongoStore,
    ShardSnapshot,
    SQLiteStore,
    StoreError,
    StoreUnavailable,
)
from tether.store.testing import FaultPlan

pytestmark = pytest.mark.timeout(300)

RUN = "run-log"
N = 37  # not a multiple of anything the optimizer blocks by


class CrashingSQLite(SQLiteStore):
    """A SQLite store that can be made to fail at one step of its next write transaction:
    before its COMMIT (rolled back) or after it (done, but the caller hears of a failure)."""

    crash_at: str | None = None

    @contextlib.contextmanager
    def _tx(self, *, write: bool) -> Iterator[Any]:
        with super()._tx(write=write) as conn:
            yield conn
            if write and self.crash_at == "before_commit":
                self.crash_at = None
                raise StoreUnavailable("crash before the commit (injected)")
        if write and self.crash_at == "after_commit":
            self.crash_at = None
            raise StoreUnavailable("crash after the commit (injected)")


SQLITE_POINTS = ("files", "before_commit", "after_commit")
MONGO_POINTS = ("before_chunks", "chunks", "after_chunks", "before_head", "after_head")


@pytest.fixture(params=["sqlite", "mongomock", "mongodb"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(open a handle, arm a crash at a point) for one store; every handle shares the data."""
    if request.param == "sqlite":
        path = tmp_path / "t.db"
        real_write = sqlite_state.write_payload
        armed: list[bool] = []

        def write(target: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
            layout = real_write(target, arrays)
            if armed:
                armed.clear()
                raise OSError(5, "I/O error after a payload was written (injected)")
            return layout

        monkeypatch.setattr(sqlite_state, "write_payload", write)
        handles: list[CrashingSQLite] = []

        def open_() -> CrashingSQLite:
            handles.append(CrashingSQLite(path))
            return handles[-1]

        def crash(store: Any, point: str) -> None:
            if point == "files":
                armed.append(True)
            else:
                store.crash_at = point

        def disarm(store: Any) -> None:
            armed.clear()
            store.crash_at = None

        def stored(store: Any) -> tuple[list[int], list[int]]:
            """(versions of the bases, positions of the entries) of shard 0 of RUN on disk."""
            folder = store.state_dir / RUN / "0"
            names = [p.name for p in folder.glob("*.bin")]
            bases = [int(n.split("-")[1]) for n in names if n.startswith("base-")]
            logs = [int(n.split("-")[1]) for n in names if n.startswith("log-")]
            return sorted(bases), sorted(logs)

        yield open_, crash, disarm, SQLITE_POINTS, stored
        for h in handles:
            h.close()
        return
    faults = FaultPlan()
    if request.param == "mongodb":  # a real replica set, where mongod exists (else skipped)
        uri = with_database(request.getfixturevalue("mongodb_uri"), fresh_database_name())
        request.addfinalizer(lambda: drop_database(uri))
        factory = None
    else:
        client: Any = mongomock.MongoClient()
        uri = "mongodb://mongomock.invalid/tether_test?replicaSet=rs0"
        factory = lambda: client  # noqa: E731
    handles_m: list[MongoStore] = []

    def open_mongo() -> MongoStore:
        handles_m.append(MongoStore(uri, client_factory=factory, faults=faults, chunk_bytes=64))
        return handles_m[-1]

    request.addfinalizer(lambda: [h.close() for h in handles_m])

    def crash_mongo(_store: Any, point: str) -> None:
        faults.fail(point, "auto_reconnect")

    def stored_mongo(store: Any) -> tuple[list[int], list[int]]:
        shard = {"run_id": RUN, "shard_id": 0}
        bases = {d["version"] for d in store._chunks.find(shard | {"kind": "base"})}
        return sorted(bases), sorted(d["position"] for d in store._log.find(shard))

    yield open_mongo, crash_mongo, lambda _store: faults.clear(), MONGO_POINTS, stored_mongo


def spec_of(mode: Mode, replication: str = "sync", workers: int = 2, **policy: Any) -> ShardSpec:
    consistency = Consistency(mode, 1 if mode is Mode.SSP else 0)
    return ShardSpec(
        RUN, 0, 5, N, workers, consistency, OptimizerConfig("adam", lr=0.05),
        replication=ReplicationPolicy(replication, **policy),
    )  # fmt: skip


def initial() -> np.ndarray:
    return np.linspace(-1, 1, N, dtype=np.float32)


def grad(w: int, clock: int) -> np.ndarray:
    return np.random.default_rng([w, clock, 7]).standard_normal(N).astype(np.float32)


def push(state: ShardState, w: int) -> bool:
    """Worker `w` pushes its next clock; False if BSP holds it back (it already pushed)."""
    clock = state.workers[w].clock
    if state.spec.consistency.aggregates and clock > state.version:
        return False
    h = PushHeader(RUN, w, clock, clock, state.version, state.epoch, N)
    state.push(h, grad(w, clock), time.time())
    state.validate()
    return True


def image(state: ShardState) -> tuple[Any, ...]:
    """Everything a replacement must have bit for bit: version, tables, every array."""
    meta, arrays = to_replica(state)
    # What the replicator measured of the process (appends made, their lag) is not state.
    meta["stats"] = {k: v for k, v in meta["stats"].items() if not k.startswith("replication")}
    return state.version, meta, {k: a.tobytes() for k, a in sorted(arrays.items())}


def append(store: Any, state: ShardState) -> None:
    batch = state.log_batch()
    if batch:
        store.append_shard_log(RUN, 0, state.epoch, batch)
        state.replicated(batch[-1].position, time.time())


def entry(position: int, epoch_tag: float = 0.0) -> LogEntry:
    return LogEntry(position, {"p": position, "tag": epoch_tag}, {"grad": grad(0, position)})


# ---- the store contract ---------------------------------------------------------------------


def test_appends_and_a_base_load_back_as_one_log(backend) -> None:
    open_, *_ = backend
    store = open_()
    store.create_run(RUN, {})
    assert store.load_shard_log(RUN, 0) is None
    store.claim_shard(RUN, 0, 1)
    empty = store.load_shard_log(RUN, 0)
    assert empty is not None and empty.base is None and empty.entries == []
    store.append_shard_log(RUN, 0, 1, [entry(1), entry(2)])
    store.append_shard_log(RUN, 0, 1, [entry(3)])
    log = store.load_shard_log(RUN, 0)
    assert [e.position for e in log.entries] == [1, 2, 3] and log.last_epoch == 1
    assert all(e.arrays["grad"].tobytes() == grad(0, e.position).tobytes() for e in log.entries)
    assert log.entries[1].meta == {"p": 2, "tag": 0.0}
    base = ShardSnapshot(RUN, 0, 1, 2, {"at": 2}, {"params": np.arange(5, dtype=np.float32)})
    store.save_shard_state(base)
    log = store.load_shard_log(RUN, 0)
    assert log.base is not None and log.base.version == 2 and log.base.meta == {"at": 2}
    assert [e.position for e in log.entries] == [3]
    assert store.shard_heads(RUN)[0]["last"] == 3 and store.shard_heads(RUN)[0]["log_entries"] == 1


def test_a_gap_or_a_foreign_overlap_is_refused_and_a_retry_is_idempotent(backend) -> None:
    open_, *_ = backend
    store = open_()
    store.create_run(RUN, {})
    store.claim_shard(RUN, 0, 1)
    store.append_shard_log(RUN, 0, 1, [entry(1), entry(2)])
    with pytest.raises(StoreError, match="does not follow"):
        store.append_shard_log(RUN, 0, 1, [entry(4)])  # 3 is missing
    store.append_shard_log(RUN, 0, 1, [entry(1), entry(2)])  # the same batch again: done
    store.append_shard_log(RUN, 0, 1, [entry(2), entry(3)])  # a retry that grew: 3 is new
    assert [e.position for e in store.load_shard_log(RUN, 0).entries] == [1, 2, 3]
    store.claim_shard(RUN, 0, 2)
    with pytest.raises(StoreError, match="does not follow"):  # 3 is epoch 1's, not a retry
        store.append_shard_log(RUN, 0, 2, [entry(3, 2.0), entry(4, 2.0)])
    with pytest.raises(ValueError, match="contiguous"):
        store.append_shard_log(RUN, 0, 2, [entry(4), entry(6)])
    assert store.load_shard_log(RUN, 0).last == 3


def test_a_zombie_append_is_fenced_and_never_read(backend) -> None:
    open_, *_ = backend
    zombie, successor = open_(), open_()
    zombie.create_run(RUN, {})
    zombie.claim_shard(RUN, 0, 1)
    zombie.append_shard_log(RUN, 0, 1, [entry(1)])
    successor.claim_shard(RUN, 0, 2)
    with pytest.raises(Fenced) as err:
        zombie.append_shard_log(RUN, 0, 1, [entry(2, 1.0)])
    assert err.value.current_epoch == 2
    with pytest.raises(Fenced):
        zombie.save_shard_state(ShardSnapshot(RUN, 0, 1, 1, {}, {"params": np.zeros(3, "f4")}))
    successor.append_shard_log(RUN, 0, 2, [entry(2, 2.0)])
    log = successor.load_shard_log(RUN, 0)
    assert [(e.position, e.meta["tag"]) for e in log.entries] == [(1, 0.0), (2, 2.0)]
    assert log.last_epoch == 2


def test_compaction_keeps_what_a_reader_of_the_previous_head_needs(backend) -> None:
    open_, *_, stored = backend
    store = open_()
    store.create_run(RUN, {})
    store.claim_shard(RUN, 0, 1)

    def base(v: int) -> ShardSnapshot:
        return ShardSnapshot(RUN, 0, 1, v, {"at": v}, {"params": np.full(4, v, np.float32)})

    position = 0
    for round_ in range(1, 5):
        store.append_shard_log(RUN, 0, 1, [entry(position + 1), entry(position + 2)])
        position += 2
        before = store.load_shard_log(RUN, 0)
        store.save_shard_state(base(position))
        after = store.load_shard_log(RUN, 0)
        assert after.base.version == position and after.entries == []
        # What a reader of the previous head needs is all still stored -- its base and the
        # entries after it -- and nothing older: the store stays bounded.
        assert before.base_version == position - 2 and before.last == position
        kept_bases = [position - 2, position] if round_ > 1 else [position]
        assert stored(store) == (kept_bases, [position - 1, position])
    heads = store.shard_heads(RUN)[0]
    assert heads["version"] == position and heads["log_entries"] == 0


def test_a_recovery_reading_while_the_log_is_compacted_is_never_torn(backend) -> None:
    """A reader loads the log again and again while the owner appends and compacts: every load
    is a complete base plus the contiguous entries after it (a retry at most), never an error."""
    open_, *_ = backend
    writer, reader = open_(), open_()
    writer.create_run(RUN, {})
    writer.claim_shard(RUN, 0, 1)
    done = threading.Event()
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not done.is_set():
                log = reader.load_shard_log(RUN, 0)
                base = log.base_version
                assert [e.position for e in log.entries] == list(range(base + 1, log.last + 1))
                if log.base is not None:
                    assert log.base.arrays["params"][0] == base  # the base's own bytes
                for e in log.entries:
                    assert e.arrays["grad"].tobytes() == grad(0, e.position).tobytes()
                seen.append((base, log.last))
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    t = threading.Thread(target=read)
    t.start()
    try:
        for position in range(1, 61):
            writer.append_shard_log(RUN, 0, 1, [entry(position)])
            if position % 3 == 0:
                params = np.full(4, position, np.float32)
                writer.save_shard_state(ShardSnapshot(RUN, 0, 1, position, {}, {"params": params}))
    finally:
        done.set()
        t.join(60)
    assert not errors, errors[0]
    assert seen and [last for _, last in seen] == sorted(last for _, last in seen)


def test_a_torn_entry_is_never_replayed(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.create_run(RUN, {})
    store.claim_shard(RUN, 0, 1)
    store.append_shard_log(RUN, 0, 1, [entry(1), entry(2)])
    [second] = (store.state_dir / RUN / "0").glob("log-000000000002-*.bin")
    second.write_bytes(second.read_bytes()[:-4])  # a lost tail
    with pytest.raises(StoreError, match="has 144 bytes, not 148"):
        store.load_shard_log(RUN, 0)
    store.close()


# ---- recovery by replay ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.BSP, Mode.SSP, Mode.ASP])
def test_recovery_replays_to_the_live_state_bit_for_bit(backend, mode: Mode) -> None:
    open_, *_ = backend
    store = open_()
    store.create_run(RUN, {})
    store.claim_shard(RUN, 0, 1)
    live = ShardState(spec_of(mode), initial())
    for step in range(12):
        push(live, step % 2)
        push(live, (step + 1) % 2)
        append(store, live)
        if step == 5:  # a base half-way; the rest is replayed on it
            meta, arrays = to_replica(live)
            store.save_shard_state(ShardSnapshot(RUN, 0, 1, live.version, meta, arrays))
    store.claim_shard(RUN, 0, 2)
    stored = store.load_shard_log(RUN, 0)
    got = recover(live.spec, 2, stored, initial)
    got.validate()
    assert image(got) == image(live) and got.restored_version == live.version
    # It knows the log it replayed, so its compactor goes on with the budget where it was.
    assert got.base_version == stored.base.version and len(got.since_base) == len(stored.entries)
    # ... and it goes on as the live shard would have.
    for state in (live, got):
        state.epoch = 2
        push(state, 0)
        push(state, 1)
    assert image(got) == image(live)


def test_bsp_keeps_no_pending_gradient_in_the_log() -> None:
    live = ShardState(spec_of(Mode.BSP), initial())
    push(live, 0)
    assert live.unlogged == [] and 0 in live.pending  # held for the clock: not an update yet
    push(live, 1)
    [logged] = live.unlogged
    arrays = {name.removeprefix("dense."): a for name, a in logged.arrays.items()}
    logged = dataclasses.replace(logged, arrays=arrays)  # the dense table's arrays, by name
    assert logged.position == 1 and logged.meta["clocks"] == [1, 1]
    expected = (grad(0, 0) + grad(1, 0)) / np.float32(2)
    assert logged.arrays["grad"].tobytes() == expected.tobytes()  # the aggregate, unscratched


def test_async_acknowledgements_wait_only_when_the_log_is_k_behind() -> None:
    state = ShardState(spec_of(Mode.ASP, "async", every_updates=3), initial())
    needed = []
    for clock in range(5):
        h = PushHeader(RUN, 0, clock, clock, state.version, state.epoch, N)
        needed.append(state.push(h, grad(0, clock), 0.0).durable_needed)
    assert needed == [0, 0, 0, 1, 2]


def test_the_compaction_budget_counts_replay_time_of_durable_entries() -> None:
    state = ShardState(spec_of(Mode.ASP, compact_replay_s=0.01), initial())
    push(state, 0)
    assert not state.compaction_due()  # nothing durable yet
    state.replicated(1, 0.0)
    for _ in range(3):
        push(state, 0)
    state.apply_s = 0.004  # as if each update took 4 ms to apply
    state.replicated(4, 0.0)
    assert state.replay_estimate_s() >= 0.01
    # ... but four entries are not yet two bases' worth of bytes: a base now would cost more
    # than half of what the log writes.
    assert 4 * N * 4 < 2 * state.state_nbytes and not state.compaction_due()
    for _ in range(3):
        push(state, 0)
    state.replicated(7, 0.0)
    assert 7 * N * 4 >= 2 * state.state_nbytes and state.compaction_due()
    state.base_saved(7)
    assert not state.compaction_due() and state.replay_estimate_s() == 0


# ---- the adapters against a real store -----------------------------------------------------


@pytest.mark.parametrize("torn", [False, True])
def test_the_compactor_writes_a_base_a_recovery_starts_from(
    tmp_path: Path, torn: bool, request: pytest.FixtureRequest
) -> None:
    """A base comes from a copy taken outside the lock or, when updates keep tearing the copy,
    from a replay of the store's log; either way a recovery from it equals the live shard."""
    store = SQLiteStore(tmp_path / "t.db")
    request.addfinalizer(store.close)
    store.create_run(RUN, {})
    store.claim_shard(RUN, 0, 1)
    host = ShardHost(ShardState(spec_of(Mode.ASP, compact_replay_s=1e-6), initial()))
    failures: list[BaseException] = []
    replicator = Replicator(host, store, on_failure=failures.append)
    compactor = Compactor(host, store, initial=initial, on_failure=failures.append)
    if torn:
        compactor._copy = lambda: None  # type: ignore[method-assign]
    replicator.start()
    compactor.start()
    try:
        for clock in range(10):  # past two bases' worth of log (three arrays of N floats)
            with host.locked() as state:
                push(state, 0)
                host.notify_all()
            wait_until(lambda c=clock: host.state.durable_version == c + 1, what="the append")
        wait_until(lambda: host.state.base_version >= 1, what="a base")
    finally:
        compactor.stop()
        replicator.stop()
    assert not failures
    assert (compactor.rebuilt > 0) == torn and compactor.bases >= 1
    log = store.load_shard_log(RUN, 0)
    assert log.base is not None and log.base.version >= 1
    with host.locked() as state:
        assert image(recover(state.spec, 1, log, initial)) == image(state)
    store.close()


# ---- property: any sequence of pushes, appends, bases, crashes and zombies ---------------------

OPS = st.one_of(
    st.tuples(st.just("push"), st.integers(0, 2)),
    st.tuples(st.just("append"), st.sampled_from([None, 0, 1, 2, 3, 4])),
    st.tuples(st.just("base"), st.sampled_from([None, 0, 1, 2, 3, 4])),
    st.tuples(st.just("crash"), st.just(None)),
    st.tuples(st.just("zombie"), st.just(None)),
)


@settings(
    max_examples=200, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)  # fmt: skip
@given(mode=st.sampled_from([Mode.BSP, Mode.ASP]), ops=st.lists(OPS, max_size=24))
def test_recovery_equals_the_live_state_whatever_happened(backend, mode, ops) -> None:
    """The live shard is the model: after every crash (of the shard, or of a write at any of
    its steps) a recovery must be bit-identical to the live shard at the recovered version,
    which is never below what the store acknowledged. A zombie's writes change nothing."""
    open_, arm, disarm, points, _ = backend
    store = open_()
    run = f"{RUN}-{time.monotonic_ns()}"  # one store for every example: a run each
    store.create_run(run, {})
    spec = spec_of(mode, workers=3)
    spec = ShardSpec(run, 0, spec.offset, N, 3, spec.consistency, spec.optimizer,
                     replication=spec.replication)  # fmt: skip
    epoch = 1
    store.claim_shard(run, 0, epoch)
    live = ShardState(spec, initial(), epoch=epoch)
    history = {0: image(live)}
    zombie: ShardState | None = None
    acked = 0  # the log position the store acknowledged

    def restart() -> None:
        nonlocal live, epoch
        epoch += 1
        store.claim_shard(run, 0, epoch)
        got = recover(spec, epoch, store.load_shard_log(run, 0), initial)
        got.validate()
        assert acked <= got.version <= live.version
        assert image(got) == history[got.version]
        for v in [v for v in history if v > got.version]:
            del history[v]  # lost, never acknowledged: redone from here
        live = got

    for op, arg in ops:
        if op == "push":
            if push(live, arg) and live.version not in history:
                history[live.version] = image(live)
        elif op in ("append", "base"):
            if arg is not None:
                arm(store, points[arg % len(points)])
            try:
                batch = live.log_batch()
                if batch:
                    store.append_shard_log(run, 0, live.epoch, batch)
                    live.replicated(batch[-1].position, 0.0)
                    acked = batch[-1].position
                if op == "base" and live.durable_version == live.version:
                    meta, arrays = to_replica(live)
                    snap = ShardSnapshot(run, 0, live.epoch, live.version, meta, arrays)
                    store.save_shard_state(snap)
                    live.base_saved(live.version)
            except StoreUnavailable:
                disarm(store)
                zombie = live
                restart()  # the write failed part-way: the shard dies, a successor recovers
            disarm(store)  # a crash armed for a write that did not happen
        elif op == "crash":
            zombie = live
            restart()
        elif op == "zombie" and zombie is not None:
            before = store.load_shard_log(run, 0)
            with pytest.raises(Fenced):
                zombie_batch = zombie.log_batch() or [
                    LogEntry(zombie.version + 1, {}, {"grad": grad(9, 9)})
                ]
                store.append_shard_log(run, 0, zombie.epoch, zombie_batch)
            after = store.load_shard_log(run, 0)
            assert after.last == before.last and after.last_epoch == before.last_epoch
    restart()  # at the end, whatever happened, a recovery equals the live shard

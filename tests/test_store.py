"""The store contract (DESIGN §1, §5, §6), run against every backend.

Backend-generic tests take ``store_factory`` (or ``backend``); each backend is one entry of
``BACKENDS``: SQLite, MongoDB through mongomock (its failure handling is tested with the fault seam
in test_store_mongo.py), and a real MongoDB replica set -- started for the session when ``mongod``
is on PATH, or named by ``TETHER_TEST_MONGODB_URI`` -- which is skipped with a reason otherwise,
never faked. Tests that need a second OS process open the store by URI (``Backend.uri``); a
backend without one skips them.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import pickle
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mongomock
import mongomock.collection
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mongo_fixture import (  # noqa: F401  (mongodb_uri is a fixture used through BACKENDS)
    drop_database,
    fresh_database_name,
    mongodb_uri,
    with_database,
)

import tether.store.sqlite_schema as sqlite_schema
import tether.store.sqlite_state as sqlite_state
from tether.store import (
    Fenced,
    MongoStore,
    RunExists,
    ShardSnapshot,
    SQLiteStore,
    Store,
    StoreError,
    StoreUnavailable,
    UnknownRun,
    default_store_uri,
    open_store,
)
from tether.store.base import TornState, assemble_state, state_chunks, state_layout
from tether.store.sqlite_schema import SCHEMA_VERSION
from tether.store.testing import FaultPlan

RUN = "run-1"
SMALL_CHUNK = 64 << 10  # tests force many chunks per state


class FakeClock:
    """Store-side time under the test's control, so times are checked exactly without sleeps."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float = 1.0) -> float:
        self.now += dt
        return self.now


Clock = Callable[[], float]


@dataclass(frozen=True)
class Backend:
    name: str
    # open(clock, chunk_bytes) -> a new handle on the test's one store; two calls give two
    # handles (connections) on the same data, like two processes.
    open: Callable[[Clock | None, int], Store]
    # a URI that another OS process can open, or None
    uri: str | None
    # how many shard-state pieces (payload files, chunk documents) the store holds
    chunk_count: Callable[[], int]
    # make the next save fail (StoreUnavailable) after it wrote some of its chunks
    break_next_save: Callable[[pytest.MonkeyPatch], None]
    cleanup: Callable[[], None] = lambda: None
    # how many pieces one state is stored in (None: its chunks of SMALL_CHUNK bytes)
    pieces: Callable[[ShardSnapshot], int] | None = None

    def per_state(self, snap: ShardSnapshot) -> int:
        return self.pieces(snap) if self.pieces else _chunks_per_state(snap)


def _sqlite_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    path = tmp_path / "store" / "tether.db"

    def open_(clock: Clock | None, chunk_bytes: int) -> Store:
        return SQLiteStore(path, clock=clock or time.time, chunk_bytes=chunk_bytes)

    def chunk_count() -> int:
        # One payload file per base or log entry (tether.store.sqlite_state).
        return len(list((path.parent / (path.name + "-state")).glob("*/*/*.bin")))

    def break_next_save(monkeypatch: pytest.MonkeyPatch) -> None:
        real = sqlite_state.write_payload

        def failing(target: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
            monkeypatch.setattr(sqlite_state, "write_payload", real)  # once
            with open(target, "wb") as f:  # a partial file, as a full disk leaves it
                f.write(b"\0" * 100)
            raise OSError(28, "No space left on device (injected)")

        monkeypatch.setattr(sqlite_state, "write_payload", failing)

    return Backend(
        "sqlite", open_, default_store_uri(tmp_path / "store"), chunk_count, break_next_save,
        pieces=lambda snap: 1,
    )  # fmt: skip


def _mongo_backend(
    name: str, uri: str, client_factory: Callable[[], Any] | None, counter: Callable[[], Any]
) -> Backend:
    faults = FaultPlan()  # shared by the handles; armed by break_next_save

    def open_(clock: Clock | None, chunk_bytes: int) -> Store:
        return MongoStore(
            uri,
            client_factory=client_factory,
            faults=faults,
            chunk_bytes=chunk_bytes,
            clock=clock or time.time,
        )

    def break_next_save(_monkeypatch: pytest.MonkeyPatch) -> None:
        faults.fail("chunks", "auto_reconnect", skip=1)  # the first batch of chunks gets in

    def chunk_count() -> int:
        return int(counter().shard_chunks.count_documents({}))

    real = client_factory is None
    return Backend(name, open_, uri if real else None, chunk_count, break_next_save)


def _mongomock_takes_sort() -> None:
    """Let mongomock run pymongo's UpdateOne/ReplaceOne in ``bulk_write``.

    pymongo 4.11 passes ``sort=`` to the bulk builder, which mongomock 4.3 (the latest) does not
    take; the store never sorts a bulk update, so the argument is dropped when it is None.
    """
    builder: Any = mongomock.collection.BulkOperationBuilder
    for name in ("add_update", "add_replace"):
        real = getattr(builder, name)
        if "sort" in inspect.signature(real).parameters:
            continue

        def without_sort(
            self: Any, *args: Any, sort: Any = None, _real: Any = real, **kwargs: Any
        ) -> Any:
            if sort is not None:
                raise NotImplementedError("mongomock cannot sort a bulk update")
            return _real(self, *args, **kwargs)

        setattr(builder, name, without_sort)


_mongomock_takes_sort()


def _mongomock_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    client: Any = mongomock.MongoClient()
    uri = "mongodb://mongomock.invalid/tether_test?replicaSet=rs0"
    return _mongo_backend("mongomock", uri, lambda: client, lambda: client["tether_test"])


def _mongodb_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    from pymongo import MongoClient

    uri = with_database(request.getfixturevalue("mongodb_uri"), fresh_database_name())
    client: MongoClient[dict[str, Any]] = MongoClient(uri)
    request.addfinalizer(client.close)
    request.addfinalizer(lambda: drop_database(uri))
    return _mongo_backend("mongodb", uri, None, client.get_default_database)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Backend]] = {
    "sqlite": _sqlite_backend,
    "mongomock": _mongomock_backend,
    "mongodb": _mongodb_backend,  # a real replica set; skipped without one
}

StoreFactory = Callable[..., Store]


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return BACKENDS[request.param](request, tmp_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store_factory(backend: Backend) -> Iterator[StoreFactory]:
    opened: list[Store] = []

    def factory(clock: Clock | None = None, chunk_bytes: int = SMALL_CHUNK) -> Store:
        s = backend.open(clock, chunk_bytes)
        opened.append(s)
        return s

    yield factory
    for s in opened:
        s.close()


@pytest.fixture
def store(store_factory: StoreFactory, clock: FakeClock) -> Store:
    return store_factory(clock)


def _register(store: Store, role: str = "server", member_id: int = 0, **kw: object) -> int:
    args: dict[str, object] = {"address": "127.0.0.1:5000", "pid": 100, "host": "h"} | kw
    return store.register(RUN, role, member_id, **args)  # type: ignore[arg-type]


# -- runs ---------------------------------------------------------------------------------------


def test_satisfies_protocol(store: Store) -> None:
    assert isinstance(store, Store)


def test_create_and_get_run(store: Store, clock: FakeClock) -> None:
    config = {"mode": "ssp", "staleness": 3, "shards": [{"lo": 0, "hi": 10}], "lr": 0.1}
    store.create_run(RUN, config)
    rec = store.get_run(RUN)
    assert rec.run_id == RUN
    assert rec.config == config
    assert rec.created_at == clock.now
    assert rec.finished is False
    assert rec.summary is None


def test_create_existing_run_raises_and_keeps_config(store: Store) -> None:
    store.create_run(RUN, {"seed": 1})
    with pytest.raises(RunExists, match=RUN):
        store.create_run(RUN, {"seed": 2})
    assert store.get_run(RUN).config == {"seed": 1}


def test_unknown_run_everywhere(store: Store) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.get_run("nope"),
        lambda: store.register("nope", "server", 0, address="a:1", pid=1, host="h"),
        lambda: store.heartbeat("nope", "server", 0, 1, {}),
        lambda: store.set_member_state("nope", "server", 0, 1, "exited"),
        lambda: store.members("nope"),
        lambda: store.member("nope", "server", 0),
        lambda: store.finish_run("nope", {}),
        lambda: store.claim_shard("nope", 0, 1),
        lambda: store.save_shard_state(_snapshot(1, 1, run_id="nope")),
        lambda: store.load_shard_state("nope", 0),
        lambda: store.shard_heads("nope"),
        lambda: store.set_run_meta("nope", {"a": 1}),
        lambda: store.log_metrics("nope", []),
        lambda: store.metrics("nope"),
        lambda: store.put_artifact("nope", "a.txt", b"", "text/plain"),
        lambda: store.artifacts("nope"),
        lambda: store.get_artifact("nope", "a.txt"),
        lambda: store.delete_run("nope"),
    ]
    for call in calls:
        with pytest.raises(UnknownRun) as err:
            call()
        # the message names the run and the store, so a typo in --run or --store is obvious
        assert "'nope'" in str(err.value) and store.uri in str(err.value)


def test_list_runs_newest_first(store: Store, clock: FakeClock) -> None:
    assert store.list_runs() == []
    for run_id in ("a", "b", "c"):
        clock.advance()
        store.create_run(run_id, {"name": run_id})
    # a tie in created_at is broken by creation order, newest first
    store.create_run("d", {})
    runs = store.list_runs()
    assert [r.run_id for r in runs] == ["d", "c", "b", "a"]
    assert runs[1].config == {"name": "c"}


def test_finish_run(store: Store, clock: FakeClock) -> None:
    store.create_run(RUN, {})
    store.create_run("other", {})
    store.finish_run(RUN, {"final_loss": 0.25, "restarts": {"server": 1, "worker": 0}})
    rec = store.get_run(RUN)
    assert rec.finished is True
    assert rec.summary == {"final_loss": 0.25, "restarts": {"server": 1, "worker": 0}}
    assert store.get_run("other").finished is False
    store.finish_run(RUN, {"final_loss": 0.5})
    assert store.get_run(RUN).summary == {"final_loss": 0.5}
    assert {r.run_id: r.finished for r in store.list_runs()} == {RUN: True, "other": False}


def test_bad_input_is_rejected(store: Store) -> None:
    with pytest.raises(ValueError, match="JSON"):
        store.create_run(RUN, {"x": object()})
    with pytest.raises(ValueError, match="run_id"):
        store.create_run("", {})
    assert store.list_runs() == []
    store.create_run(RUN, {})
    with pytest.raises(ValueError, match="role"):
        store.register(RUN, "boss", 0, address="", pid=1, host="h")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="member_id"):
        store.register(RUN, "worker", -1, address="", pid=1, host="h")
    epoch = _register(store)
    with pytest.raises(ValueError, match="state"):
        store.set_member_state(RUN, "server", 0, epoch, "sleeping")
    with pytest.raises(ValueError, match="JSON"):
        store.heartbeat(RUN, "server", 0, epoch, {"x": {1, 2}})
    assert store.members(RUN)[0].info == {}


# -- membership and epochs ----------------------------------------------------------------------


def test_register_takes_increasing_epochs_and_replaces_the_row(
    store: Store, clock: FakeClock
) -> None:
    store.create_run(RUN, {})
    assert _register(store, address="127.0.0.1:5001", pid=11, host="h1") == 1
    store.heartbeat(RUN, "server", 0, 1, {"clock": 7})
    store.set_member_state(RUN, "server", 0, 1, "failed")
    clock.advance(5)
    assert _register(store, address="127.0.0.1:5002", pid=22, host="h2") == 2
    assert _register(store, address="127.0.0.1:5003", pid=33, host="h3") == 3
    m = store.member(RUN, "server", 0)
    assert m is not None
    assert (m.epoch, m.address, m.pid, m.host) == (3, "127.0.0.1:5003", 33, "h3")
    # a new registration is a fresh member: running, no info, started now
    assert (m.state, m.info, m.started_at, m.heartbeat) == ("running", {}, clock.now, clock.now)
    assert (m.run_id, m.role, m.member_id) == (RUN, "server", 0)


def test_epochs_are_per_run_role_and_member(store: Store) -> None:
    store.create_run(RUN, {})
    store.create_run("run-2", {})
    assert _register(store, "server", 0) == 1
    assert _register(store, "server", 0) == 2
    assert _register(store, "server", 1) == 1
    assert _register(store, "worker", 0, address="") == 1
    assert store.register("run-2", "server", 0, address="a:1", pid=1, host="h") == 1


def test_heartbeat_updates_time_and_merges_info(store: Store, clock: FakeClock) -> None:
    store.create_run(RUN, {})
    epoch = _register(store)
    started = clock.now
    t1 = clock.advance(2)
    store.heartbeat(RUN, "server", 0, epoch, {"clock": 1, "version": 10, "loss": 2.5})
    m = store.member(RUN, "server", 0)
    assert m is not None and m.heartbeat == t1 and m.started_at == started
    assert m.info == {"clock": 1, "version": 10, "loss": 2.5}
    t2 = clock.advance(2)
    store.heartbeat(RUN, "server", 0, epoch, {"clock": 2, "samples_per_s": 900.0})
    m = store.member(RUN, "server", 0)
    assert m is not None and m.heartbeat == t2
    # top-level keys replace, keys not mentioned stay
    assert m.info == {"clock": 2, "version": 10, "loss": 2.5, "samples_per_s": 900.0}
    t3 = clock.advance(2)
    store.heartbeat(RUN, "server", 0, epoch, {})
    m = store.member(RUN, "server", 0)
    assert m is not None and m.heartbeat == t3 and m.info["clock"] == 2


def test_stale_epoch_is_fenced_and_changes_nothing(
    store_factory: StoreFactory, clock: FakeClock
) -> None:
    # Two handles on one store: the zombie (old shard) and its replacement (DESIGN §5).
    zombie, replacement = store_factory(clock), store_factory(clock)
    zombie.create_run(RUN, {})
    old = _register(zombie, address="127.0.0.1:5001")
    zombie.heartbeat(RUN, "server", 0, old, {"version": 5})
    new = _register(replacement, address="127.0.0.1:5002")
    assert (old, new) == (1, 2)
    replacement.heartbeat(RUN, "server", 0, new, {"version": 6})
    before = replacement.member(RUN, "server", 0)
    clock.advance(10)

    with pytest.raises(Fenced) as err:
        zombie.heartbeat(RUN, "server", 0, old, {"version": 99, "zombie": True})
    e = err.value
    assert (e.run_id, e.role, e.member_id, e.epoch, e.current_epoch) == (RUN, "server", 0, 1, 2)
    assert "server 0" in str(e) and "epoch 2" in str(e) and "epoch 1" in str(e)
    with pytest.raises(Fenced):
        zombie.set_member_state(RUN, "server", 0, old, "exited")
    # an epoch from the future is no better than an old one
    with pytest.raises(Fenced):
        zombie.heartbeat(RUN, "server", 0, new + 1, {"version": 99})

    assert replacement.member(RUN, "server", 0) == before
    assert zombie.member(RUN, "server", 0) == before
    replacement.set_member_state(RUN, "server", 0, new, "exited")
    m = zombie.member(RUN, "server", 0)
    assert m is not None and m.state == "exited"


def test_unregistered_member_is_fenced(store: Store) -> None:
    store.create_run(RUN, {})
    with pytest.raises(Fenced, match="not registered") as err:
        store.heartbeat(RUN, "worker", 3, 1, {"clock": 0})
    assert err.value.current_epoch is None
    assert store.members(RUN) == []


def test_set_member_state(store: Store) -> None:
    store.create_run(RUN, {})
    epoch = _register(store)
    for state in ("exited", "failed", "running"):
        store.set_member_state(RUN, "server", 0, epoch, state)
        m = store.member(RUN, "server", 0)
        assert m is not None and m.state == state


def test_members_sorted_and_filtered(store: Store) -> None:
    store.create_run(RUN, {})
    store.create_run("run-2", {})
    for role, member_id in [
        ("worker", 1),
        ("server", 2),
        ("launcher", 0),
        ("worker", 0),
        ("server", 0),
        ("server", 1),
    ]:
        _register(store, role, member_id, address="" if role == "worker" else f"h:{member_id}")
    store.register("run-2", "server", 9, address="x:1", pid=1, host="h")

    keys = [(m.role, m.member_id) for m in store.members(RUN)]
    assert keys == [
        ("launcher", 0),
        ("server", 0),
        ("server", 1),
        ("server", 2),
        ("worker", 0),
        ("worker", 1),
    ]
    assert [(m.role, m.member_id) for m in store.members(RUN, "worker")] == [
        ("worker", 0),
        ("worker", 1),
    ]
    assert [m.address for m in store.members(RUN, "server")] == ["h:0", "h:1", "h:2"]
    assert store.members(RUN, "launcher")[0].run_id == RUN
    assert [m.member_id for m in store.members("run-2")] == [9]
    assert store.member(RUN, "server", 2) == store.members(RUN, "server")[2]
    assert store.member(RUN, "server", 3) is None


def test_writes_are_visible_to_another_handle(store_factory: StoreFactory) -> None:
    a, b = store_factory(), store_factory()
    a.create_run(RUN, {"k": 1})
    assert b.get_run(RUN).config == {"k": 1}
    epoch = _register(b)
    a.heartbeat(RUN, "server", 0, epoch, {"clock": 3})
    m = b.member(RUN, "server", 0)
    assert m is not None and m.info == {"clock": 3}


def test_threads_share_one_store(store: Store) -> None:
    # A shard's heartbeat thread and request threads share one store object.
    store.create_run(RUN, {})
    epoch = _register(store)
    errors: list[BaseException] = []

    def beat(t: int) -> None:
        try:
            for i in range(20):
                store.heartbeat(RUN, "server", 0, epoch, {f"t{t}": i})
                store.members(RUN)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=beat, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert errors == []
    m = store.member(RUN, "server", 0)
    # every merge saw the previous one: no lost update
    assert m is not None and m.info == {f"t{t}": 19 for t in range(8)}


def test_close(store_factory: StoreFactory) -> None:
    s = store_factory()
    s.create_run(RUN, {})
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.get_run(RUN)
    with store_factory() as s2:
        assert s2.get_run(RUN).run_id == RUN
    with pytest.raises(StoreError, match="closed"):
        s2.list_runs()


# -- across OS processes ------------------------------------------------------------------------


def _race_child(uri: str, barrier: object, results: object, reps: int) -> None:
    """Open the store in a fresh process, then create the run and register server 0 repeatedly."""
    try:
        barrier.wait(30)  # type: ignore[attr-defined]
        with open_store(uri) as store:  # every process races on the (new) file's schema too
            try:
                store.create_run(RUN, {})
                created = True
            except RunExists:
                created = False
            address = f"127.0.0.1:{os.getpid()}"
            epochs = [
                store.register(RUN, "server", 0, address=address, pid=os.getpid(), host="h")
                for _ in range(reps)
            ]
        results.put((created, address, epochs, None))  # type: ignore[attr-defined]
    except BaseException as e:  # sent to the parent
        results.put((False, "", [], f"{type(e).__name__}: {e}"))  # type: ignore[attr-defined]


def test_concurrent_processes_get_distinct_epochs(backend: Backend) -> None:
    uri = backend.uri
    if uri is None:
        pytest.skip(f"the {backend.name} backend cannot be opened from another process")
    procs, reps = 8, 10
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    children = [
        ctx.Process(target=_race_child, args=(uri, barrier, results, reps)) for _ in range(procs)
    ]
    try:
        for c in children:
            c.start()
        outcomes = [results.get(timeout=60) for _ in children]
    finally:
        for c in children:
            c.join(timeout=10)
            if c.is_alive():
                c.kill()
    assert [o[3] for o in outcomes if o[3]] == []
    assert sum(o[0] for o in outcomes) == 1  # exactly one create_run won
    epochs = sorted(e for o in outcomes for e in o[2])
    assert epochs == list(range(1, procs * reps + 1))
    # the stored row is the last registration's
    last_address = next(o[1] for o in outcomes if procs * reps in o[2])
    with open_store(uri) as store:
        m = store.member(RUN, "server", 0)
    assert m is not None and (m.epoch, m.address) == (procs * reps, last_address)


# -- open_store and the SQLite file -------------------------------------------------------------


def test_open_store_relative_and_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///rel/dir/a.db") as s:
        # relative to the cwd; the stored URI is absolute so children in other dirs find it
        assert isinstance(s, SQLiteStore)
        assert s.uri == f"sqlite:///{tmp_path / 'rel' / 'dir' / 'a.db'}"
        assert s.uri.startswith("sqlite:////")
        s.create_run(RUN, {})
    assert (tmp_path / "rel" / "dir" / "a.db").is_file()
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    with open_store(f"sqlite:///{tmp_path / 'rel' / 'dir' / 'a.db'}") as s:
        assert [r.run_id for r in s.list_runs()] == [RUN]


def test_default_store_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_store_uri(tmp_path / "run") == f"sqlite:///{tmp_path / 'run' / 'tether.db'}"
    monkeypatch.chdir(tmp_path)
    uri = default_store_uri("runs/r1")
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'r1' / 'tether.db'}"
    with open_store(uri) as s:
        assert s.uri == uri
    assert (tmp_path / "runs" / "r1" / "tether.db").is_file()


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("postgresql://db/x", "sqlite:///PATH.*mongodb://"),
        ("runs/tether.db", "sqlite:///PATH.*mongodb://"),
        ("sqlite://tether.db", "three slashes"),
        ("sqlite:///", "names no file"),
        ("sqlite:///:memory:", "in-memory"),
        ("sqlite:///x.db?mode=ro", "query"),
    ],
)
def test_open_store_rejects_bad_uris(
    uri: str, match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=match):
        open_store(uri)
    assert list(tmp_path.iterdir()) == []


def test_open_store_mongodb_unreachable_is_unavailable_fast_and_redacted() -> None:
    uri = "mongodb://alice:s3cret@127.0.0.1:1/?serverSelectionTimeoutMS=300&connectTimeoutMS=300"
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="connect failed") as err:
        open_store(uri)
    assert time.monotonic() - t0 < 5
    assert "s3cret" not in str(err.value) and "ServerSelectionTimeoutError" in str(err.value)
    with pytest.raises(StoreError) as srv_err:  # no DNS here; a store error either way
        open_store("mongodb+srv://alice:s3cret@cluster.invalid/?connectTimeoutMS=300")
    assert "s3cret" not in str(srv_err.value)


def test_sqlite_file_is_wal_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert version == (str(SCHEMA_VERSION),)
    finally:
        conn.close()


class _BusyConnection:
    """Answers the WAL switch with an OperationalError of ``code`` ``fails`` times, then "wal"."""

    def __init__(self, fails: int, code: int = sqlite3.SQLITE_BUSY) -> None:
        self.fails = fails
        self.code = code
        self.calls = 0

    def execute(self, sql: str) -> Any:
        assert sql == "PRAGMA journal_mode = WAL"
        self.calls += 1
        if self.calls <= self.fails:
            error = sqlite3.OperationalError("database is locked (injected)")
            error.sqlite_errorcode = self.code
            raise error
        return self

    def fetchone(self) -> tuple[str]:
        return ("wal",)


def test_sqlite_wal_switch_retries_busy_until_its_deadline() -> None:
    busy: Any = _BusyConnection(fails=3)
    assert sqlite_schema.enable_wal(busy, 10.0) == "wal"
    assert busy.calls == 4
    stuck: Any = _BusyConnection(fails=1 << 30)
    with pytest.raises(sqlite3.OperationalError, match="locked"):  # SQLite's error, as before
        sqlite_schema.enable_wal(stuck, 0.05)
    assert stuck.calls > 1
    broken: Any = _BusyConnection(fails=1, code=sqlite3.SQLITE_IOERR)
    with pytest.raises(sqlite3.OperationalError):  # not busy: raised at once
        sqlite_schema.enable_wal(broken, 10.0)
    assert broken.calls == 1


def test_sqlite_data_survives_reopen(tmp_path: Path) -> None:
    uri = default_store_uri(tmp_path)
    with open_store(uri) as s:
        s.create_run(RUN, {"seed": 3})
        _register(s)
    with open_store(uri) as s:
        assert s.get_run(RUN).config == {"seed": 3}
        assert _register(s) == 2  # the epoch continues across restarts of everything


def test_sqlite_refuses_newer_schema_and_foreign_files(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    SQLiteStore(newer).close()
    conn = sqlite3.connect(newer)
    with conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        SQLiteStore(newer)

    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    with conn:
        conn.execute("CREATE TABLE things (x)")
    conn.close()
    with pytest.raises(StoreError, match="not a tether store"):
        SQLiteStore(foreign)

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="garbage.db"):
        SQLiteStore(garbage)


def test_sqlite_store_cannot_be_pickled(tmp_path: Path) -> None:
    # Children get the URI, never the connection (DESIGN §1: spawn, no shared connections).
    with SQLiteStore(tmp_path / "t.db") as s, pytest.raises(TypeError, match="store.uri"):
        pickle.dumps(s)


# -- replicated shard state (DESIGN §5) ---------------------------------------------------------


def _snapshot(
    epoch: int, version: int, *, run_id: str = RUN, shard_id: int = 0, n: int = 300_000
) -> ShardSnapshot:
    """A state whose every value says which version it is, so a mix of two is detectable."""
    arrays: dict[str, np.ndarray] = {
        "params": np.full(n, version, dtype=np.float32),  # ~1.2 MB: many 64 KiB chunks
        "opt.mu": np.full(n // 3, version, dtype=np.float32),
        "counters": np.full(5, version, dtype=np.int64),
    }
    meta = {"version": version, "clocks": [version, version], "last_seq": {"0": version}}
    return ShardSnapshot(run_id, shard_id, epoch, version, meta, arrays)


def _check_consistent(snap: ShardSnapshot) -> None:
    """Every array and the meta belong to the snapshot's own version (never a torn state)."""
    v = snap.version
    assert snap.meta["version"] == v, (snap.meta, v)
    for name, a in snap.arrays.items():
        assert a.size and (a == v).all(), f"array {name!r} mixes versions (head at {v})"


def _chunks_per_state(snap: ShardSnapshot, chunk_bytes: int = SMALL_CHUNK) -> int:
    return sum(-(-a.nbytes // chunk_bytes) for a in snap.arrays.values())


def _assert_same(loaded: ShardSnapshot | None, saved: ShardSnapshot) -> None:
    assert loaded is not None
    assert (loaded.run_id, loaded.shard_id, loaded.epoch, loaded.version, loaded.meta) == (
        saved.run_id,
        saved.shard_id,
        saved.epoch,
        saved.version,
        saved.meta,
    )
    assert loaded.arrays.keys() == saved.arrays.keys()
    for name, a in saved.arrays.items():
        b = loaded.arrays[name]
        assert b.dtype == a.dtype and b.shape == a.shape, name
        assert b.tobytes() == a.tobytes(), name  # bit-identical, NaNs included


def test_shard_state_round_trip(store: Store, clock: FakeClock) -> None:
    store.create_run(RUN, {})
    assert store.load_shard_state(RUN, 0) is None  # nothing claimed or saved yet
    assert store.shard_heads(RUN) == {}
    store.claim_shard(RUN, 0, 3)
    assert store.load_shard_state(RUN, 0) is None  # claimed, not saved
    assert store.shard_heads(RUN) == {
        0: {
            "owner_epoch": 3, "epoch": None, "version": None, "saved_at": None, "nbytes": None,
            "last": 0, "log_entries": 0,
        }
    }  # fmt: skip
    rng = np.random.default_rng(0)
    params = rng.standard_normal(1_000_003).astype(np.float32)  # ~4 MB: 62 chunks
    params[7] = np.nan
    arrays: dict[str, np.ndarray] = {
        "params": params,
        "opt.nu": rng.random(1000),  # float64
        "opt.count": np.arange(3, dtype=np.int64),
        "pending.1": np.zeros(0, dtype=np.float32),  # empty arrays survive too
        "flags": np.array([True, False, True]),
        "odd": np.arange(17, dtype=np.uint8),
        "big_endian": np.arange(5, dtype=">i4"),
        "strided": np.arange(20, dtype=np.float32)[::2],  # not C-contiguous on the way in
    }
    meta = {"clocks": [4, 5], "last_seq": {"0": 9, "1": 12}, "stats": {"updates": 7}}
    snap = ShardSnapshot(RUN, 0, 3, 42, meta, arrays)
    clock.advance(5)
    store.save_shard_state(snap)
    loaded = store.load_shard_state(RUN, 0)
    _assert_same(loaded, snap)
    assert loaded is not None
    for a in loaded.arrays.values():
        assert a.flags.c_contiguous and a.flags.writeable
    heads = store.shard_heads(RUN)
    assert heads == {
        0: {
            "owner_epoch": 3,
            "epoch": 3,
            "version": 42,
            "saved_at": clock.now,
            "nbytes": snap.nbytes,
            "last": 42,  # a base past the log's end moves it up
            "log_entries": 0,
        }
    }


def test_shard_states_are_per_run_and_shard(store_factory: StoreFactory) -> None:
    store = store_factory()
    store.create_run(RUN, {})
    store.create_run("run-2", {})
    for run_id, shard_id, version in ((RUN, 0, 1), (RUN, 1, 2), ("run-2", 0, 3)):
        store.claim_shard(run_id, shard_id, 1)
        store.save_shard_state(_snapshot(1, version, run_id=run_id, shard_id=shard_id, n=100))
    for run_id, shard_id, version in ((RUN, 0, 1), (RUN, 1, 2), ("run-2", 0, 3)):
        loaded = store.load_shard_state(run_id, shard_id)
        assert loaded is not None and loaded.version == version
        _check_consistent(loaded)
    assert sorted(store.shard_heads(RUN)) == [0, 1]
    assert store.load_shard_state(RUN, 2) is None


def test_shard_state_version_never_goes_back(store: Store) -> None:
    store.create_run(RUN, {})
    store.claim_shard(RUN, 0, 1)
    store.save_shard_state(_snapshot(1, 5))
    with pytest.raises(StoreError, match="go back from version 5 to 4") as err:
        store.save_shard_state(_snapshot(1, 4))
    assert not isinstance(err.value, Fenced)
    _assert_same(store.load_shard_state(RUN, 0), _snapshot(1, 5))
    # the same version again is a rewrite (e.g. more pending gradients at the same step)
    again = _snapshot(1, 5)
    again.arrays["pending.0"] = np.ones(10, dtype=np.float32)
    store.save_shard_state(again)
    _assert_same(store.load_shard_state(RUN, 0), again)
    store.save_shard_state(_snapshot(1, 6))
    assert store.shard_heads(RUN)[0]["version"] == 6


def test_claim_fences_the_previous_owner(store_factory: StoreFactory) -> None:
    # Two handles: the old shard (a zombie once replaced) and its replacement (DESIGN §5).
    zombie, replacement = store_factory(), store_factory()
    zombie.create_run(RUN, {})
    with pytest.raises(Fenced, match="not registered") as err:  # never claimed
        zombie.save_shard_state(_snapshot(1, 1))
    assert err.value.current_epoch is None
    zombie.claim_shard(RUN, 0, 1)
    zombie.save_shard_state(_snapshot(1, 1))

    replacement.claim_shard(RUN, 0, 2)  # before it loads: from now on epoch 1 cannot write
    before = zombie.shard_heads(RUN)
    with pytest.raises(Fenced) as err:
        zombie.save_shard_state(_snapshot(1, 2))
    e = err.value
    assert (e.run_id, e.role, e.member_id, e.epoch, e.current_epoch) == (RUN, "server", 0, 1, 2)
    assert replacement.shard_heads(RUN) == before  # the head is untouched
    loaded = replacement.load_shard_state(RUN, 0)
    _assert_same(loaded, _snapshot(1, 1))  # the zombie's last complete state, not its refused one
    with pytest.raises(Fenced):  # an older claim cannot take it back
        zombie.claim_shard(RUN, 0, 1)
    replacement.claim_shard(RUN, 0, 2)  # the same claim again is a no-op (a retried call)
    replacement.save_shard_state(_snapshot(2, 1))  # same version, new epoch: a rewrite
    replacement.save_shard_state(_snapshot(2, 2))
    with pytest.raises(Fenced):  # an epoch from the future is no better than an old one
        replacement.save_shard_state(_snapshot(3, 3))
    _assert_same(zombie.load_shard_state(RUN, 0), _snapshot(2, 2))
    assert zombie.shard_heads(RUN)[0] | {"saved_at": 0} == {
        "owner_epoch": 2, "epoch": 2, "version": 2, "saved_at": 0, "nbytes": _snapshot(2, 2).nbytes,
        "last": 2, "log_entries": 0,
    }  # fmt: skip


def test_failed_save_leaves_the_previous_state(
    backend: Backend, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create_run(RUN, {})
    store.claim_shard(RUN, 0, 1)
    v1 = _snapshot(1, 1)
    store.save_shard_state(v1)
    backend.break_next_save(monkeypatch)
    with pytest.raises(StoreUnavailable):
        store.save_shard_state(_snapshot(1, 2))  # dies after writing some of its chunks
    _assert_same(store.load_shard_state(RUN, 0), v1)
    assert store.shard_heads(RUN)[0]["version"] == 1
    v3 = _snapshot(1, 3)
    store.save_shard_state(v3)
    _assert_same(store.load_shard_state(RUN, 0), v3)
    # the orphans of the failed save are gone: only the head's chunks and the previous head's
    assert backend.chunk_count() == backend.per_state(v3) + backend.per_state(v1)


def test_old_chunks_are_collected(backend: Backend, store: Store) -> None:
    store.create_run(RUN, {})
    store.claim_shard(RUN, 0, 1)
    store.claim_shard(RUN, 1, 1)
    other = _snapshot(1, 1, shard_id=1, n=1000)
    store.save_shard_state(other)
    per_state = backend.per_state(_snapshot(1, 1))
    for version in range(1, 7):
        store.save_shard_state(_snapshot(1, version))
        kept = min(version, 2) * per_state  # the head's chunks and the previous head's
        assert backend.chunk_count() == kept + backend.per_state(other)
    _assert_same(store.load_shard_state(RUN, 1), other)  # other shards are left alone


def test_a_concurrent_reader_never_sees_a_torn_state(
    backend: Backend, store_factory: StoreFactory
) -> None:
    if backend.name == "mongomock":
        # mongomock applies an update to the stored document field by field, in place, so a
        # thread reading meanwhile can copy half of it; MongoDB's single-document writes are
        # atomic. The MongoDB backend runs this test against a real replica set (mongod).
        pytest.skip("mongomock's in-place updates are not atomic across threads")
    writer, reader = store_factory(), store_factory()
    writer.create_run(RUN, {})
    writer.claim_shard(RUN, 0, 1)
    writer.save_shard_state(_snapshot(1, 0, n=50_000))
    errors: list[BaseException] = []
    done = threading.Event()
    seen: list[int] = []
    deadline = time.monotonic() + 20

    def write() -> None:
        # Saves go on until the reader has loaded many times meanwhile, so the two overlap:
        # each new version waits for one more load (thread scheduling may favour the writer).
        version = 0
        try:
            while (len(seen) < 50 or version < 20) and time.monotonic() < deadline:
                loads = len(seen)
                version += 1
                writer.save_shard_state(_snapshot(1, version, n=50_000))
                while len(seen) == loads and time.monotonic() < deadline:
                    time.sleep(0)  # yield the GIL to the reader
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            written.append(version)
            done.set()

    written: list[int] = []
    thread = threading.Thread(target=write)
    thread.start()
    while not done.is_set():
        snap = reader.load_shard_state(RUN, 0)
        assert snap is not None
        _check_consistent(snap)
        seen.append(snap.version)
    thread.join(30)
    assert errors == []
    assert len(seen) >= 50 and len(set(seen)) > 1  # the reader saw the head move
    assert seen == sorted(seen)  # a reader never goes back either
    final = reader.load_shard_state(RUN, 0)
    assert final is not None and final.version == written[0] >= 20
    _check_consistent(final)


def _writer_process(uri: str, loads: Any, started: Any, done: Any, results: Any) -> None:
    try:
        version = 0
        deadline = time.monotonic() + 30
        with open_store(uri) as store:
            store.claim_shard(RUN, 0, 1)
            store.save_shard_state(_snapshot(1, 0, n=100_000))
            started.set()
            # Until the reader has loaded many times meanwhile, so the two really overlap: each
            # new version waits for one more load (the reader may start late on a busy machine).
            while (loads.value < 30 or version < 20) and time.monotonic() < deadline:
                seen = loads.value
                version += 1
                store.save_shard_state(_snapshot(1, version, n=100_000))
                while loads.value == seen and time.monotonic() < deadline:
                    pass
        results.put(("writer", None, version))
    except BaseException as e:  # sent to the parent
        results.put(("writer", f"{type(e).__name__}: {e}", 0))
    finally:
        started.set()
        done.set()


def _reader_process(uri: str, loads: Any, started: Any, done: Any, results: Any) -> None:
    try:
        started.wait(60)
        versions = []
        with open_store(uri) as store:
            while True:
                finished = done.is_set()
                snap = store.load_shard_state(RUN, 0)
                assert snap is not None
                _check_consistent(snap)
                versions.append(snap.version)
                loads.value += 1
                if finished:
                    break
        assert versions == sorted(versions), "the reader went back"
        results.put(("reader", None, (len(set(versions)), versions[-1])))
    except BaseException as e:  # sent to the parent
        results.put(("reader", f"{type(e).__name__}: {e}", None))


def test_a_reader_process_sees_only_complete_states(backend: Backend) -> None:
    uri = backend.uri
    if uri is None:
        pytest.skip(f"the {backend.name} backend cannot be opened from another process")
    with open_store(uri) as store:
        store.create_run(RUN, {})
    ctx = multiprocessing.get_context("spawn")
    started, done, results = ctx.Event(), ctx.Event(), ctx.Queue()
    loads = ctx.Value("i", 0)
    children = [
        ctx.Process(target=_writer_process, args=(uri, loads, started, done, results)),
        ctx.Process(target=_reader_process, args=(uri, loads, started, done, results)),
    ]
    try:
        for c in children:
            c.start()
        replies = [results.get(timeout=60) for _ in children]
        outcomes = {who: (err, value) for who, err, value in replies}
    finally:
        for c in children:
            c.join(timeout=10)
            if c.is_alive():
                c.kill()
    err, versions = outcomes["writer"]
    assert err is None and versions >= 20
    err, value = outcomes["reader"]
    assert err is None
    distinct, final_version = value
    assert loads.value >= 30 and distinct > 1  # the reader saw the head move under it
    assert final_version == versions


# -- the stored layout of a state (pure) --------------------------------------------------------

_DTYPES = ["<f4", "<f8", "<i8", ">i4", "|u1", "|b1", "<f2"]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 400), min_size=1, max_size=5),
    dtypes=st.lists(st.sampled_from(_DTYPES), min_size=5, max_size=5),
    chunk_bytes=st.integers(1, 300),
    order=st.randoms(use_true_random=False),
)
def test_layout_round_trip_in_any_chunk_order(
    sizes: list[int], dtypes: list[str], chunk_bytes: int, order: Any
) -> None:
    rng = np.random.default_rng(len(sizes))
    arrays = {
        f"a{i}": rng.integers(0, 255, size * np.dtype(dt).itemsize, dtype=np.uint8).view(dt)
        for i, (size, dt) in enumerate(zip(sizes, dtypes, strict=False))
    }
    snap = ShardSnapshot(RUN, 0, 1, 1, {}, arrays)
    layout = state_layout(snap, chunk_bytes)
    chunks = [(name, idx, bytes(data)) for name, idx, data in state_chunks(snap, chunk_bytes)]
    assert all(len(c[2]) <= chunk_bytes for c in chunks)
    order.shuffle(chunks)
    out = assemble_state(layout, chunks, "test")
    assert out.keys() == arrays.keys()
    for name, a in arrays.items():
        assert out[name].dtype == a.dtype and out[name].tobytes() == a.tobytes()
    if chunks:
        with pytest.raises(TornState, match="missing"):
            assemble_state(layout, chunks[1:], "test")
        with pytest.raises(TornState, match="repeated"):
            assemble_state(layout, chunks + chunks[:1], "test")
        name, idx, data = chunks[0]
        with pytest.raises(TornState, match="bytes"):
            assemble_state(layout, [(name, idx, data + b"x"), *chunks[1:]], "test")


def test_bad_snapshots_are_rejected_before_anything_is_written(store: Store) -> None:
    store.create_run(RUN, {})
    store.claim_shard(RUN, 0, 1)
    bad = [
        ({"x": np.zeros((2, 2))}, {}, "1-D"),
        ({"x": np.array([object()])}, {}, "plain data"),
        ({"": np.zeros(2)}, {}, "names"),
        ({"x": [1.0, 2.0]}, {}, "numpy"),
        ({"x": np.zeros(2)}, {"k": object()}, "JSON"),
    ]
    for arrays, meta, match in bad:
        with pytest.raises((TypeError, ValueError), match=match):
            store.save_shard_state(ShardSnapshot(RUN, 0, 1, 1, meta, arrays))  # type: ignore[arg-type]
    assert store.load_shard_state(RUN, 0) is None
    with pytest.raises(ValueError, match="chunk_bytes"):
        SQLiteStore(Path("/nonexistent/never-created.db"), chunk_bytes=32 << 20)


@pytest.mark.parametrize("old_version", [1, 2, 3])
def test_sqlite_upgrades_older_files(tmp_path: Path, old_version: int) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    with conn:
        for stmt in sqlite_schema.SCHEMA[:3]:  # meta, runs, members: the version 1 schema
            conn.execute(stmt)
        if old_version == 2:  # the development layout of the shard-state tables
            conn.execute("CREATE TABLE shard_heads (run_id, shard_id, owner_epoch, prev_epoch)")
            conn.execute("CREATE TABLE shard_chunks (run_id, shard_id, epoch, version, data)")
        if old_version == 3:  # shard state as version 3 wrote it
            for stmt in sqlite_schema.SHARD_STATE_TABLES:
                conn.execute(stmt)
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(old_version),))
        conn.execute("INSERT INTO runs VALUES (?, '{\"seed\": 4}', 1.0, 0, NULL)", (RUN,))
    conn.close()
    with SQLiteStore(path, chunk_bytes=SMALL_CHUNK) as s:
        assert s.get_run(RUN).config == {"seed": 4}  # runs and members are kept
        assert s.get_run(RUN).meta == {}  # version 4: results (DESIGN §8)
        s.claim_shard(RUN, 0, 1)
        s.save_shard_state(_snapshot(1, 1, n=1000))
        _assert_same(s.load_shard_state(RUN, 0), _snapshot(1, 1, n=1000))
    conn = sqlite3.connect(path)
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    conn.close()
    assert version == (str(SCHEMA_VERSION),)


# -- run tokens (DESIGN §13) ----------------------------------------------------------------------


def test_a_new_run_has_one_secret_token_kept_apart_from_its_record(store: Store) -> None:
    from tether.store.secrets import rotated

    store.create_run(RUN, {"k": 1})
    (token,) = store.run_tokens(RUN)
    assert len(token.token) >= 40 and token.expires_at is None
    record = store.get_run(RUN)
    assert token.token not in repr(record) and token.token not in repr(store.list_runs())
    store.create_run("run-2", {})
    assert store.run_tokens("run-2")[0].token != token.token  # random per run
    with pytest.raises(RunExists):
        store.create_run(RUN, {})
    assert store.run_tokens(RUN) == [token]  # a refused create changes nothing
    newer = rotated([token], token.created_at + 1)
    assert not store.swap_run_tokens(RUN, [], newer)  # not what is stored: nothing changes
    assert store.run_tokens(RUN) == [token]
    assert store.swap_run_tokens(RUN, [token], newer)
    assert store.run_tokens(RUN) == newer
    with pytest.raises(UnknownRun):
        store.run_tokens("nope")
    with pytest.raises(UnknownRun):
        store.swap_run_tokens("nope", [], newer)
    store.delete_run(RUN)
    store.create_run(RUN, {})
    assert store.run_tokens(RUN)[0].token not in {t.token for t in newer}  # none left behind

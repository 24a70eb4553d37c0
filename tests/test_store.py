"""The store contract (DESIGN §1, §5, §6), run against every backend.

Backend-generic tests take ``store_factory``; each backend is one entry of ``BACKENDS``. Only
SQLite exists today; the MongoDB issue adds a mongomock entry and a real-replica-set entry (skipped
with a reason when no ``mongod``/``TETHER_TEST_MONGODB_URI`` is available). Tests that need a
second OS process open the store by URI (``Backend.uri``); a backend without one skips them.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tether.store import (
    Fenced,
    RunExists,
    SQLiteStore,
    Store,
    StoreError,
    UnknownRun,
    default_store_uri,
    open_store,
)
from tether.store.sqlite import SCHEMA_VERSION

RUN = "run-1"


class FakeClock:
    """Store-side time under the test's control, so times are checked exactly without sleeps."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float = 1.0) -> float:
        self.now += dt
        return self.now


@dataclass(frozen=True)
class Backend:
    name: str
    # open(tmp_path, clock) -> a new handle on the test's one store; two calls give two handles
    # (connections) on the same data, like two processes.
    open: Callable[[Path, Callable[[], float] | None], Store]
    # a URI that another OS process can open, or None
    uri: Callable[[Path], str | None]


def _sqlite_open(tmp_path: Path, clock: Callable[[], float] | None) -> Store:
    path = tmp_path / "store" / "tether.db"
    return SQLiteStore(path) if clock is None else SQLiteStore(path, clock=clock)


BACKENDS = {
    "sqlite": Backend(
        "sqlite", _sqlite_open, lambda tmp_path: default_store_uri(tmp_path / "store")
    ),
}

StoreFactory = Callable[..., Store]


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store_factory(backend: Backend, tmp_path: Path) -> Iterator[StoreFactory]:
    opened: list[Store] = []

    def factory(clock: Callable[[], float] | None = None) -> Store:
        s = backend.open(tmp_path, clock)
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


def test_concurrent_processes_get_distinct_epochs(backend: Backend, tmp_path: Path) -> None:
    uri = backend.uri(tmp_path)
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


def test_open_store_mongodb_is_not_available_yet() -> None:
    with pytest.raises(StoreError, match="MongoDB backend is not available") as err:
        open_store("mongodb://alice:s3cret@h1,h2,h3/?replicaSet=rs0")
    assert "s3cret" not in str(err.value)
    with pytest.raises(StoreError, match="MongoDB"):
        open_store("mongodb+srv://cluster.example.com/")


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

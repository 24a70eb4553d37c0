"""Replicated shard state in the SQLite store: bases and log entries in payload files, atomic
head, fencing, compaction, no torn reads (DESIGN §5)."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest

from tether.store import Fenced, LogEntry, ShardSnapshot, SQLiteStore, StoreError

RUN = "r"


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "t.db", chunk_bytes=1024)
    s.create_run(RUN, {})
    yield s
    s.close()


def snap(epoch, version, n=1000, fill=None, shard=0):
    fill = float(version) if fill is None else fill
    arrays = {
        "params": np.full(n, fill, dtype=np.float32),
        "opt.mu": np.arange(n, dtype=np.float32) * fill,
        "counter": np.array([version], dtype=np.int64),
        "empty": np.zeros(0, dtype=np.float32),
    }
    return ShardSnapshot(RUN, shard, epoch, version, {"version": version, "clocks": [1, 2]}, arrays)


def same(a: ShardSnapshot, b: ShardSnapshot) -> bool:
    return (
        (a.epoch, a.version, a.meta) == (b.epoch, b.version, b.meta)
        and a.arrays.keys() == b.arrays.keys()
        and all(a.arrays[k].dtype == b.arrays[k].dtype for k in a.arrays)
        and all(a.arrays[k].tobytes() == b.arrays[k].tobytes() for k in a.arrays)
    )


def payloads(store, kind="base") -> list[str]:
    """The payload files of shard 0 of kind "base" or "log", sorted."""
    folder = store.state_dir / RUN / "0"
    return sorted(p.name for p in folder.glob(f"{kind}-*.bin")) if folder.exists() else []


def test_nothing_saved_loads_as_none(store):
    assert store.load_shard_state(RUN, 0) is None
    store.claim_shard(RUN, 0, 1)
    assert store.load_shard_state(RUN, 0) is None


def test_round_trip_across_many_chunks(store):
    store.claim_shard(RUN, 0, 1)
    s = snap(1, 5, n=10_000)  # 40 KB arrays in 1 KiB chunks
    store.save_shard_state(s)
    [name] = payloads(store)
    assert (store.state_dir / RUN / "0" / name).stat().st_size == s.nbytes
    loaded = store.load_shard_state(RUN, 0)
    assert loaded is not None and same(loaded, s)
    assert store.shard_heads(RUN)[0]["version"] == 5


def test_a_save_without_the_claim_or_after_a_newer_claim_is_fenced(store):
    with pytest.raises(Fenced):
        store.save_shard_state(snap(1, 1))
    store.claim_shard(RUN, 0, 1)
    store.save_shard_state(snap(1, 1))
    store.claim_shard(RUN, 0, 2)  # a replacement took over
    with pytest.raises(Fenced):
        store.save_shard_state(snap(1, 2))  # the zombie's write changes nothing
    assert same(store.load_shard_state(RUN, 0), snap(1, 1))
    with pytest.raises(Fenced):
        store.claim_shard(RUN, 0, 1)  # an older epoch cannot claim back
    store.save_shard_state(snap(2, 2))
    assert store.load_shard_state(RUN, 0).epoch == 2


def test_the_version_never_goes_back_and_an_equal_rewrite_is_idempotent(store):
    store.claim_shard(RUN, 0, 1)
    store.save_shard_state(snap(1, 3))
    with pytest.raises(StoreError, match="go back"):
        store.save_shard_state(snap(1, 2))
    store.save_shard_state(snap(1, 3))
    assert same(store.load_shard_state(RUN, 0), snap(1, 3))


def test_old_states_are_garbage_collected_keeping_the_previous_one(store):
    store.claim_shard(RUN, 0, 1)
    for v in range(1, 6):
        store.save_shard_state(snap(1, v))
    assert [name.split("-")[1] for name in payloads(store)] == ["4", "5"]  # versions 5 and 4


def test_shards_are_independent(store):
    for shard in (0, 1):
        store.claim_shard(RUN, shard, 1)
        store.save_shard_state(snap(1, shard + 1, shard=shard))
    assert store.load_shard_state(RUN, 0).version == 1
    assert store.load_shard_state(RUN, 1).version == 2


def test_a_concurrent_reader_never_sees_a_torn_state(tmp_path):
    writer = SQLiteStore(tmp_path / "t.db", chunk_bytes=512)
    writer.create_run(RUN, {})
    writer.claim_shard(RUN, 0, 1)
    writer.save_shard_state(snap(1, 0))
    reader = SQLiteStore(tmp_path / "t.db")
    done = threading.Event()
    seen = []

    def read() -> None:
        while not done.is_set():
            s = reader.load_shard_state(RUN, 0)
            # Every array of one state carries that state's version.
            assert np.all(s.arrays["params"] == s.version), "torn: params of another version"
            assert np.array_equal(s.arrays["opt.mu"], np.arange(1000, dtype=np.float32) * s.version)
            assert s.arrays["counter"][0] == s.version == s.meta["version"]
            seen.append(s.version)

    t = threading.Thread(target=read)
    t.start()
    try:
        for v in range(1, 60):
            writer.save_shard_state(snap(1, v))
    finally:
        done.set()
        t.join(30)
    assert seen and seen == sorted(seen)  # the reader only moved forward
    reader.close()
    writer.close()


def _write_versions(path: str, start: multiprocessing.synchronize.Event, n: int) -> None:
    s = SQLiteStore(path, chunk_bytes=512)
    start.wait(30)
    for v in range(1, n):
        s.save_shard_state(snap(1, v))
    s.close()


def test_a_writer_process_and_a_reader_process_share_the_file(tmp_path):
    path = str(tmp_path / "t.db")
    store = SQLiteStore(path)
    store.create_run(RUN, {})
    store.claim_shard(RUN, 0, 1)
    store.save_shard_state(snap(1, 0))
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    proc = ctx.Process(target=_write_versions, args=(path, start, 40))
    proc.start()
    start.set()
    last = 0
    while proc.is_alive() or last < 39:
        s = store.load_shard_state(RUN, 0)
        assert np.all(s.arrays["params"] == s.version) and s.version >= last
        last = s.version
        if not proc.is_alive() and proc.exitcode != 0:
            break
    proc.join(30)
    assert proc.exitcode == 0 and last == 39
    store.close()


def test_shard_state_bytes_never_pass_through_the_wal(tmp_path):
    """Bases and log entries are megabytes per write; a WAL database writes each page twice
    and, while a reader holds an old snapshot (the launcher and heartbeats read all the time),
    cannot restart its WAL, which then grows by every write. In payload files the WAL only sees
    the head and the rows (a few pages per transaction), not the 120 MB of bases and entries."""
    import sqlite3

    store = SQLiteStore(tmp_path / "t.db")
    store.create_run(RUN, {})
    store.claim_shard(RUN, 0, 1)
    wal = tmp_path / "t.db-wal"
    reader = sqlite3.connect(tmp_path / "t.db")
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM meta").fetchone()  # holds its snapshot throughout
    grad = np.ones(250_000, dtype=np.float32)
    total = 0
    for version in range(1, 41):
        store.append_shard_log(RUN, 0, 1, [LogEntry(version, {"v": version}, {"grad": grad})])
        base = snap(1, version, n=250_000)
        store.save_shard_state(base)
        total += grad.nbytes + base.nbytes
    size = wal.stat().st_size
    reader.execute("COMMIT")
    reader.close()
    written = sum(p.stat().st_size for p in (store.state_dir / RUN / "0").iterdir())
    store.close()
    assert written >= 2 * 2 * 10**6  # two bases and some entries, a megabyte each, are on disk
    assert size < total / 4, (size, total)  # through the WAL it would be at least `total`


def test_a_version_5_file_is_upgraded_to_the_log_layout(tmp_path):
    """Schema 5 kept whole states as BLOB chunks; the upgrade drops that replicated state (it
    only matters to a run in progress), keeps the runs, and the shard state works as a log."""
    import sqlite3

    from tether.store import sqlite_schema

    path = tmp_path / "v5.db"
    conn = sqlite3.connect(path)
    with conn:
        for stmt in sqlite_schema.SCHEMA[: -len(sqlite_schema.SECRETS_SCHEMA)]:
            conn.execute(stmt)
        conn.execute("DROP TABLE shard_log")
        conn.execute("DROP TABLE shard_heads")
        conn.execute(
            "CREATE TABLE shard_heads (run_id TEXT NOT NULL, shard_id INTEGER NOT NULL, "
            "owner_epoch INTEGER NOT NULL, epoch INTEGER, version INTEGER, save_id INTEGER, "
            "layout TEXT, meta TEXT, nbytes INTEGER, saved_at REAL, PRIMARY KEY (run_id, shard_id))"
        )
        conn.execute(
            "CREATE TABLE shard_chunks (run_id TEXT NOT NULL, shard_id INTEGER NOT NULL, "
            "save_id INTEGER NOT NULL, epoch INTEGER NOT NULL, version INTEGER NOT NULL, "
            "name TEXT NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL)"
        )
        conn.execute("INSERT INTO meta VALUES ('schema_version', '5')")
        conn.execute("INSERT INTO runs VALUES (?, '{}', 1.0, 0, NULL, '{}')", (RUN,))
        conn.execute(
            "INSERT INTO shard_heads (run_id, shard_id, owner_epoch) VALUES (?, 0, 3)", (RUN,)
        )
    conn.close()
    with SQLiteStore(path) as store:
        assert store.get_run(RUN).config == {}
        assert store.shard_heads(RUN) == {}  # the old replicated state is gone
        store.claim_shard(RUN, 0, 1)
        store.append_shard_log(RUN, 0, 1, [LogEntry(1, {}, {"grad": np.ones(3, np.float32)})])
        assert store.load_shard_log(RUN, 0).last == 1
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    conn.close()
    assert "shard_chunks" not in tables and "shard_log" in tables and version == ("7",)

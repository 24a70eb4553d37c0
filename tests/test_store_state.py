"""Replicated shard state in the store: chunks, atomic head, fencing, no torn reads (DESIGN §5)."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest

from tether.store import Fenced, ShardSnapshot, SQLiteStore, StoreError

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


def chunk_rows(store) -> int:
    return store._conn.execute("SELECT COUNT(*) FROM shard_chunks").fetchone()[0]


def test_nothing_saved_loads_as_none(store):
    assert store.load_shard_state(RUN, 0) is None
    store.claim_shard(RUN, 0, 1)
    assert store.load_shard_state(RUN, 0) is None


def test_round_trip_across_many_chunks(store):
    store.claim_shard(RUN, 0, 1)
    s = snap(1, 5, n=10_000)  # 40 KB arrays in 1 KiB chunks
    store.save_shard_state(s)
    assert chunk_rows(store) > 70
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
    store.save_shard_state(snap(1, 1))
    one = chunk_rows(store)
    for v in range(2, 6):
        store.save_shard_state(snap(1, v))
    assert chunk_rows(store) == 2 * one  # versions 5 and 4 only
    versions = {r[0] for r in store._conn.execute("SELECT DISTINCT version FROM shard_chunks")}
    assert versions == {4, 5}


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


def test_the_wal_shrinks_back_once_readers_let_it_reset(tmp_path, monkeypatch):
    """Shard states are megabytes per save; while a reader holds an old snapshot (the launcher
    and heartbeats read all the time) the WAL cannot restart and grows. Once it can, it is cut
    back to `WAL_SIZE_LIMIT` instead of keeping its high-water size on disk for good."""
    import sqlite3

    from tether.store import sqlite_schema

    monkeypatch.setattr(sqlite_schema, "WAL_SIZE_LIMIT", 1 << 20)
    store = SQLiteStore(tmp_path / "t.db")
    store.create_run(RUN, {})
    store.claim_shard(RUN, 0, 1)
    wal = tmp_path / "t.db-wal"
    reader = sqlite3.connect(tmp_path / "t.db")
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM meta").fetchone()  # holds its snapshot
    sizes = []
    for version in range(1, 41):
        if version == 6:
            reader.execute("COMMIT")  # the reader lets go: the next checkpoint can reset the WAL
            reader.close()
        store.save_shard_state(snap(1, version, n=250_000))
        sizes.append(wal.stat().st_size)
    store.close()
    assert max(sizes) > 16 << 20  # it did grow, by megabytes per save
    # ... and after a reset the file was cut back (kept at its high-water size, it never shrinks)
    shrunk = [b for a, b in zip(sizes, sizes[1:], strict=False) if b < a]
    assert shrunk and min(shrunk) < max(sizes) / 4, sizes

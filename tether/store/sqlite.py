"""The embedded store: one SQLite file shared by the processes of one machine (DESIGN §6).

Each process (shard, worker, launcher) opens its own :class:`SQLiteStore` on the same file. The
file is in WAL mode, so readers never block the one writer, and every connection waits up to
``busy_timeout_s`` for the write lock instead of failing. Read-modify-write calls (``register``,
``heartbeat``) run inside ``BEGIN IMMEDIATE``, which takes the write lock before the read, so two
processes can never both read epoch e and both write e+1.

``synchronous=NORMAL`` in WAL mode keeps every committed transaction across a crash or SIGKILL of
any process; only an OS crash or power loss can drop the last few commits, which is acceptable for
membership data.

Fork safety: a SQLite connection must never be used in a forked child. Open the store in each
process after it starts (children are started with ``spawn``/``subprocess``, DESIGN §1) and pass
``store.uri`` to the child, never the store object; nothing is opened at import time.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tether.store.base import (
    DEFAULT_STATE_CHUNK_BYTES,
    Fenced,
    Member,
    ProcessLocal,
    Role,
    RunExists,
    RunRecord,
    ShardSnapshot,
    StoreError,
    StoreUnavailable,
    UnknownRun,
    assemble_state,
    check_chunk_bytes,
    check_member_id,
    check_role,
    check_state,
    state_chunks,
    state_layout,
    version_regression,
)
from tether.store.sqlite_results import RESULTS_SCHEMA, SQLiteResults

SCHEMA_VERSION = 4

# The latest schema, created in one go on a fresh file. An older file is brought up to date by
# _MIGRATIONS[v] (the statements that take version v to v+1), in the same transaction that reads
# the version, so a file is never left half upgraded.
_SCHEMA: tuple[str, ...] = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        config TEXT NOT NULL,
        created_at REAL NOT NULL,
        finished INTEGER NOT NULL DEFAULT 0,
        summary TEXT
    )""",
    """CREATE TABLE members (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        role TEXT NOT NULL,
        member_id INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        address TEXT NOT NULL,
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat REAL NOT NULL,
        state TEXT NOT NULL,
        info TEXT NOT NULL,
        PRIMARY KEY (run_id, role, member_id)
    )""",
)
# Version 3: replicated shard state (DESIGN §5): a head per shard and the chunks of the states it
# points at. Chunks are keyed by a per-shard save id, so a new state never overwrites the one the
# head points at; epoch and version say which state a chunk belongs to. Head columns other than
# owner_epoch are NULL until a state is saved. (Version 2 was a development layout of the same
# tables; its replicated state is dropped on upgrade -- it only matters to a run in progress.)
_SHARD_STATE_TABLES: tuple[str, ...] = (
    """CREATE TABLE shard_heads (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        shard_id INTEGER NOT NULL,
        owner_epoch INTEGER NOT NULL,
        epoch INTEGER,
        version INTEGER,
        save_id INTEGER,
        layout TEXT,
        meta TEXT,
        nbytes INTEGER,
        saved_at REAL,
        PRIMARY KEY (run_id, shard_id)
    )""",
    """CREATE TABLE shard_chunks (
        run_id TEXT NOT NULL,
        shard_id INTEGER NOT NULL,
        save_id INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        version INTEGER NOT NULL,
        name TEXT NOT NULL,
        idx INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (run_id, shard_id, save_id, name, idx)
    )""",
)
# Version 4: results (DESIGN §8): runs.meta, metrics, artifacts. The statements that upgrade a
# version 3 file also finish a new one, so both have the same layout.
_SCHEMA = _SCHEMA + _SHARD_STATE_TABLES + RESULTS_SCHEMA
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: _SHARD_STATE_TABLES,
    2: ("DROP TABLE shard_chunks", "DROP TABLE shard_heads", *_SHARD_STATE_TABLES),
    3: RESULTS_SCHEMA,
}

_PAGE_SIZE = 65536

_MEMBER_COLUMNS = (
    "run_id, role, member_id, epoch, address, pid, host, started_at, heartbeat, state, info"
)
_RUN_COLUMNS = "run_id, config, created_at, finished, summary, meta"


def _dumps(value: Any, what: str) -> str:
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict; got {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serializable: {e}") from e


def _enable_wal(conn: sqlite3.Connection, timeout_s: float) -> str:
    """Switch the file to WAL mode (a no-op once it is) and return the resulting mode.

    When several processes open a new file at once, the switch fails with SQLITE_BUSY at once
    instead of waiting on busy_timeout (seen with 8 spawned processes), so it is retried here,
    jittered, until the same deadline.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as e:
            busy = e.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(random.uniform(0.001, 0.01))


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"run_id must be a non-empty string; got {run_id!r}")
    return run_id


class SQLiteStore(ProcessLocal, SQLiteResults):
    """A :class:`tether.store.base.Store` on a SQLite file (created, with its parents, if absent).

    One connection per object, shared by the object's threads under one lock (a shard's heartbeat
    thread and its request threads use the same store). ``clock`` gives the times written to the
    store (tests pass a fake one). Shard state is stored in BLOB chunks of at most
    ``chunk_bytes``. See the module docstring for fork safety; results (run meta, metrics,
    artifacts) are in :mod:`tether.store.sqlite_results`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        chunk_bytes: int = DEFAULT_STATE_CHUNK_BYTES,
    ) -> None:
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.path = Path(path).expanduser().resolve()
        # Absolute path after "sqlite:///", so the URI opens the same file from any cwd.
        self.uri = f"sqlite:///{self.path}"
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=busy_timeout_s,
                isolation_level=None,  # autocommit; transactions are explicit BEGINs below
                check_same_thread=False,  # guarded by self._lock instead
            )
        except (OSError, sqlite3.Error) as e:
            raise StoreUnavailable(f"cannot open store {self.uri}: {e}") from e
        self._conn: sqlite3.Connection | None = conn
        try:
            with self._translate_errors():
                conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                # Only takes effect on a new file: shard state is megabytes of BLOBs, which 64 KiB
                # pages write and free 2-3x faster than 4 KiB ones (16 MiB saves: ~45 vs ~115
                # ms); a small write such as a heartbeat stays ~0.1 ms.
                conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
                mode = _enable_wal(conn, busy_timeout_s)
                if str(mode).lower() != "wal":
                    raise StoreError(
                        f"store {self.uri} cannot use WAL journal mode (got {mode!r}); "
                        "put it on a local file system"
                    )
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA foreign_keys = ON")
            self._init_schema()
        except BaseException:
            conn.close()
            self._conn = None
            raise

    def __repr__(self) -> str:
        return f"SQLiteStore({self.uri!r})"

    # -- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as e:
            # "database is locked" after busy_timeout, I/O errors, unreadable file: transient
            # from the caller's point of view.
            raise StoreUnavailable(f"store {self.uri}: {e}") from e
        except sqlite3.Error as e:
            raise StoreError(f"store {self.uri}: {e}") from e

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction under the object lock.

        ``write=True`` takes SQLite's write lock up front (BEGIN IMMEDIATE), so a read followed
        by a write cannot interleave with another process's; a plain BEGIN gives readers one
        consistent snapshot across several SELECTs.
        """
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"store {self.uri} is closed")
            with self._translate_errors():
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise

    def _init_schema(self) -> None:
        with self._tx(write=True) as conn:
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if not tables:
                for stmt in _SCHEMA:
                    conn.execute(stmt)
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                return
            row = None
            if "meta" in tables:
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                raise StoreError(f"{self.path} is a SQLite file but not a tether store")
            version = int(row[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.uri} has schema version {version}, newer than this tether "
                    f"supports ({SCHEMA_VERSION}); upgrade tether"
                )
            while version < SCHEMA_VERSION:
                for stmt in _MIGRATIONS[version]:
                    conn.execute(stmt)
                version += 1
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))

    def _require_run(self, conn: sqlite3.Connection, run_id: str) -> None:
        if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
            raise UnknownRun(run_id, self.uri)

    def _fenced_write(
        self,
        run_id: str,
        role: Role,
        member_id: int,
        epoch: int,
        update: Callable[[dict[str, Any]], tuple[str, tuple[Any, ...]]],
    ) -> None:
        """Run ``update`` on the member's row only if its stored epoch is ``epoch`` (DESIGN §5).

        ``update(stored_info)`` returns the SET clause and its parameters.
        """
        key = (run_id, role, member_id)
        with self._tx(write=True) as conn:
            row = conn.execute(
                "SELECT epoch, info FROM members WHERE run_id = ? AND role = ? AND member_id = ?",
                key,
            ).fetchone()
            if row is None:
                self._require_run(conn, run_id)
                raise Fenced(run_id, role, member_id, epoch, None)
            if row[0] != epoch:
                raise Fenced(run_id, role, member_id, epoch, row[0])
            set_clause, params = update(json.loads(row[1]))
            conn.execute(
                f"UPDATE members SET {set_clause} WHERE run_id = ? AND role = ? AND member_id = ?",
                (*params, *key),
            )

    # -- runs ---------------------------------------------------------------------------------

    def create_run(self, run_id: str, config: dict[str, Any]) -> None:
        _check_run_id(run_id)
        config_json = _dumps(config, "run config")
        with self._tx(write=True) as conn:
            if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
                raise RunExists(run_id, self.uri)
            conn.execute(
                "INSERT INTO runs (run_id, config, created_at, finished, summary) "
                "VALUES (?, ?, ?, 0, NULL)",
                (run_id, config_json, self._clock()),
            )

    def get_run(self, run_id: str) -> RunRecord:
        with self._tx(write=False) as conn:
            row = conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        if row is None:
            raise UnknownRun(run_id, self.uri)
        return _run_record(row)

    def list_runs(self) -> list[RunRecord]:
        with self._tx(write=False) as conn:
            rows = conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY created_at DESC, rowid DESC"
            ).fetchall()
        return [_run_record(r) for r in rows]

    def finish_run(self, run_id: str, summary: dict[str, Any]) -> None:
        summary_json = _dumps(summary, "run summary")
        with self._tx(write=True) as conn:
            cur = conn.execute(
                "UPDATE runs SET finished = 1, summary = ? WHERE run_id = ?",
                (summary_json, run_id),
            )
            if cur.rowcount == 0:
                raise UnknownRun(run_id, self.uri)

    # -- members ------------------------------------------------------------------------------

    def register(
        self, run_id: str, role: Role, member_id: int, *, address: str, pid: int, host: str
    ) -> int:
        check_role(role)
        check_member_id(member_id)
        with self._tx(write=True) as conn:
            self._require_run(conn, run_id)
            row = conn.execute(
                "SELECT epoch FROM members WHERE run_id = ? AND role = ? AND member_id = ?",
                (run_id, role, member_id),
            ).fetchone()
            epoch = 1 if row is None else row[0] + 1
            now = self._clock()
            conn.execute(
                f"INSERT OR REPLACE INTO members ({_MEMBER_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', '{}')",
                (run_id, role, member_id, epoch, address, pid, host, now, now),
            )
        return epoch

    def heartbeat(
        self, run_id: str, role: Role, member_id: int, epoch: int, info: dict[str, Any]
    ) -> None:
        _dumps(info, "heartbeat info")  # fail on bad input before taking the write lock

        def update(stored: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
            merged = _dumps({**stored, **info}, "heartbeat info")
            return "heartbeat = ?, info = ?", (self._clock(), merged)

        self._fenced_write(run_id, role, member_id, epoch, update)

    def set_member_state(
        self, run_id: str, role: Role, member_id: int, epoch: int, state: str
    ) -> None:
        check_state(state)
        self._fenced_write(run_id, role, member_id, epoch, lambda _stored: ("state = ?", (state,)))

    def members(self, run_id: str, role: Role | None = None) -> list[Member]:
        if role is not None:
            check_role(role)
        with self._tx(write=False) as conn:
            self._require_run(conn, run_id)
            if role is None:
                rows = conn.execute(
                    f"SELECT {_MEMBER_COLUMNS} FROM members WHERE run_id = ? "
                    "ORDER BY role, member_id",
                    (run_id,),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_MEMBER_COLUMNS} FROM members WHERE run_id = ? AND role = ? "
                    "ORDER BY member_id",
                    (run_id, role),
                ).fetchall()
        return [_member(r) for r in rows]

    def member(self, run_id: str, role: Role, member_id: int) -> Member | None:
        check_role(role)
        with self._tx(write=False) as conn:
            self._require_run(conn, run_id)
            row = conn.execute(
                f"SELECT {_MEMBER_COLUMNS} FROM members "
                "WHERE run_id = ? AND role = ? AND member_id = ?",
                (run_id, role, member_id),
            ).fetchone()
        return None if row is None else _member(row)

    # -- replicated shard state (DESIGN §5) -----------------------------------------------------
    #
    # SQLite has real transactions, so a save is one BEGIN IMMEDIATE transaction: the fencing and
    # version checks first (a zombie writes nothing), then the chunks, the head switch and the
    # garbage collection. A crash or error before COMMIT rolls all of it back, so there are never
    # orphan chunks, and a reader's BEGIN sees one committed state (WAL snapshot isolation).

    def claim_shard(self, run_id: str, shard_id: int, epoch: int) -> None:
        check_member_id(shard_id)
        with self._tx(write=True) as conn:
            self._require_run(conn, run_id)
            row = conn.execute(
                "SELECT owner_epoch FROM shard_heads WHERE run_id = ? AND shard_id = ?",
                (run_id, shard_id),
            ).fetchone()
            if row is not None and row[0] > epoch:
                raise Fenced(run_id, "server", shard_id, epoch, row[0])
            conn.execute(
                "INSERT INTO shard_heads (run_id, shard_id, owner_epoch) VALUES (?, ?, ?) "
                "ON CONFLICT (run_id, shard_id) DO UPDATE SET owner_epoch = excluded.owner_epoch",
                (run_id, shard_id, epoch),
            )

    def save_shard_state(self, snap: ShardSnapshot) -> None:
        layout = state_layout(snap, self.chunk_bytes)
        meta = _dumps(snap.meta, "shard state meta")
        key = (snap.run_id, snap.shard_id)
        with self._tx(write=True) as conn:
            row = conn.execute(
                "SELECT owner_epoch, version, save_id FROM shard_heads "
                "WHERE run_id = ? AND shard_id = ?",
                key,
            ).fetchone()
            if row is None:
                self._require_run(conn, snap.run_id)
            if row is None or row[0] != snap.epoch:
                raise Fenced(snap.run_id, "server", snap.shard_id, snap.epoch, row and row[0])
            _owner, head_version, old_save = row
            if head_version is not None and snap.version < head_version:
                raise version_regression(snap, head_version)
            save_id = (old_save or 0) + 1
            conn.executemany(
                "INSERT INTO shard_chunks "
                "(run_id, shard_id, save_id, epoch, version, name, idx, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (*key, save_id, snap.epoch, snap.version, name, idx, data)
                    for name, idx, data in state_chunks(snap, self.chunk_bytes)
                ),
            )
            conn.execute(
                "UPDATE shard_heads SET epoch = ?, version = ?, save_id = ?, layout = ?, "
                "meta = ?, nbytes = ?, saved_at = ? WHERE run_id = ? AND shard_id = ?",
                (
                    snap.epoch,
                    snap.version,
                    save_id,
                    json.dumps(layout),
                    meta,
                    snap.nbytes,
                    self._clock(),
                    *key,
                ),
            )
            # Keep the new state and the previous one (DESIGN §5: a reader of the old head).
            conn.execute(
                "DELETE FROM shard_chunks WHERE run_id = ? AND shard_id = ? "
                "AND save_id != ? AND save_id != ?",
                (*key, save_id, -1 if old_save is None else old_save),
            )

    def load_shard_state(self, run_id: str, shard_id: int) -> ShardSnapshot | None:
        with self._tx(write=False) as conn:  # one consistent read snapshot (WAL)
            row = conn.execute(
                "SELECT epoch, version, save_id, layout, meta FROM shard_heads "
                "WHERE run_id = ? AND shard_id = ?",
                (run_id, shard_id),
            ).fetchone()
            if row is None or row[2] is None:
                self._require_run(conn, run_id)
                return None
            epoch, version, save_id, layout, meta = row
            chunks = conn.execute(
                "SELECT name, idx, data FROM shard_chunks "
                "WHERE run_id = ? AND shard_id = ? AND save_id = ?",
                (run_id, shard_id, save_id),
            )
            what = f"store {self.uri}: state of shard {shard_id} of run {run_id!r}"
            arrays = assemble_state(json.loads(layout), chunks, what)
        return ShardSnapshot(run_id, shard_id, epoch, version, json.loads(meta), arrays)

    def shard_heads(self, run_id: str) -> dict[int, dict[str, Any]]:
        with self._tx(write=False) as conn:
            self._require_run(conn, run_id)
            rows = conn.execute(
                "SELECT shard_id, owner_epoch, epoch, version, saved_at, nbytes FROM shard_heads "
                "WHERE run_id = ? ORDER BY shard_id",
                (run_id,),
            ).fetchall()
        keys = ("owner_epoch", "epoch", "version", "saved_at", "nbytes")
        return {r[0]: dict(zip(keys, r[1:], strict=True)) for r in rows}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _run_record(row: tuple[Any, ...]) -> RunRecord:
    run_id, config, created_at, finished, summary, meta = row
    return RunRecord(
        run_id=run_id,
        config=json.loads(config),
        created_at=created_at,
        finished=bool(finished),
        summary=None if summary is None else json.loads(summary),
        meta=json.loads(meta),
    )


def _member(row: tuple[Any, ...]) -> Member:
    run_id, role, member_id, epoch, address, pid, host, started_at, heartbeat, state, info = row
    return Member(
        run_id=run_id,
        role=role,
        member_id=member_id,
        epoch=epoch,
        address=address,
        pid=pid,
        host=host,
        started_at=started_at,
        heartbeat=heartbeat,
        state=state,
        info=json.loads(info),
    )

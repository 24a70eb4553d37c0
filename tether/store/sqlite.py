"""The embedded store: one SQLite file shared by the processes of one machine (DESIGN §6).

Each process (shard, worker, launcher) opens its own :class:`SQLiteStore` on the same file. The
file is in WAL mode, so readers never block the one writer, and every connection waits up to
``busy_timeout_s`` for the write lock instead of failing. Read-modify-write calls (``register``,
``heartbeat``) run inside ``BEGIN IMMEDIATE``, which takes the write lock before the read, so two
processes can never both read epoch e and both write e+1. Whether a write by an epoch may go
ahead is decided by :mod:`tether.store.rules` on the values read in that transaction.

``synchronous=NORMAL`` in WAL mode keeps every committed transaction across a crash or SIGKILL of
any process; only an OS crash or power loss can drop the last few commits, which is acceptable for
membership data.

Fork safety: a SQLite connection must never be used in a forked child. Open the store in each
process after it starts (children are started with ``spawn``/``subprocess``, DESIGN §1) and pass
``store.uri`` to the child, never the store object; nothing is opened at import time.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tether.store.base import (
    DEFAULT_STATE_CHUNK_BYTES,
    DatasetExists,
    Member,
    ProcessLocal,
    Role,
    RunExists,
    RunRecord,
    StoreError,
    StoreUnavailable,
    UnknownDataset,
    UnknownRun,
    check_chunk_bytes,
    check_member_id,
    check_role,
    check_state,
)
from tether.store.datasets import (
    ChunkTally,
    DatasetChunk,
    DatasetInfo,
    FieldSpec,
    check_chunk_range,
    check_dataset_name,
    header_from_stored,
    new_import_id,
    pack_buffers,
    stored_header,
    torn_read,
    unpack_buffers,
)
from tether.store.rules import member_write_refusal, next_epoch
from tether.store.secrets import first_token
from tether.store.sqlite_results import SQLiteResults
from tether.store.sqlite_schema import configure, init_schema
from tether.store.sqlite_secrets import SQLiteSecrets
from tether.store.sqlite_state import SQLiteShardState

_MEMBER_COLUMNS = (
    "run_id, role, member_id, epoch, address, pid, host, started_at, heartbeat, state, info"
)
_RUN_COLUMNS = "run_id, config, created_at, finished, summary, meta"
_DATASET_COLUMNS = (
    "name, import_id, records, fields, chunks, chunk_starts, nbytes, created_at, source"
)
# An import writes its chunks in transactions of about this many bytes, not in one: a long
# import must not hold the file's write lock for long, or the heartbeats of a run on the same
# file (1 s busy timeout) would time out behind it.
_DATASET_TX_BYTES = 32 << 20


def _dumps(value: Any, what: str) -> str:
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict; got {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serializable: {e}") from e


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"run_id must be a non-empty string; got {run_id!r}")
    return run_id


class SQLiteStore(ProcessLocal, SQLiteShardState, SQLiteResults, SQLiteSecrets):
    """A :class:`tether.store.base.Store` on a SQLite file (created, with its parents, if absent).

    One connection per object, shared by the object's threads under one lock (a shard's heartbeat
    thread and its request threads use the same store). ``clock`` gives the times written to the
    store (tests pass a fake one). Replicated shard state is in
    :mod:`tether.store.sqlite_state` (payload files beside the database). See the module
    docstring for fork safety; the file's settings and schema are in
    :mod:`tether.store.sqlite_schema`, results (run meta, metrics, artifacts) in
    :mod:`tether.store.sqlite_results`.
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
                configure(conn, busy_timeout_s, self.uri)
            with self._tx(write=True) as tx:
                init_schema(tx, self.path, self.uri)
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
            refusal = member_write_refusal(run_id, role, member_id, epoch, row and row[0])
            if refusal is not None:
                raise refusal
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
                (run_id, config_json, now := self._clock()),
            )
            self._insert_run_tokens(conn, run_id, first_token(now))

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
            epoch = next_epoch(row and row[0])
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
    # Replicated shard state: tether.store.sqlite_state (SQLiteShardState).

    def delete_run(self, run_id: str) -> None:
        super().delete_run(run_id)
        self._delete_run_files(run_id)

    # -- datasets (DESIGN §11) ------------------------------------------------------------------
    #
    # The chunks go in under a fresh import id that no header points at; the header goes in
    # last, in one transaction that also checks that every chunk is there and deletes the chunks
    # of every other import of the name (the replaced dataset's, and those a killed import left).

    def put_dataset(
        self,
        name: str,
        fields: Sequence[FieldSpec],
        chunks: Iterable[DatasetChunk],
        *,
        source: str = "",
        replace: bool = False,
    ) -> DatasetInfo:
        tally = ChunkTally(name, fields)
        if not replace:
            with self._tx(write=False) as conn:
                if self._dataset_row(conn, name) is not None:
                    raise DatasetExists(name, self.uri)
        import_id = new_import_id()
        try:
            batch: list[tuple[Any, ...]] = []
            size = 0
            for chunk in chunks:
                tally.add(chunk)
                row = (name, import_id, chunk.index, chunk.first, chunk.count)
                batch.append((*row, pack_buffers(chunk.buffers)))
                size += chunk.nbytes
                if size >= _DATASET_TX_BYTES:
                    self._insert_dataset_chunks(batch)
                    batch, size = [], 0
            self._insert_dataset_chunks(batch)
            with self._tx(write=True) as conn:
                info = tally.info(created_at=self._clock(), source=source, import_id=import_id)
                if not replace and self._dataset_row(conn, name) is not None:
                    raise DatasetExists(name, self.uri)
                (stored,) = conn.execute(
                    "SELECT count(*) FROM dataset_chunks WHERE name = ? AND import_id = ?",
                    (name, import_id),
                ).fetchone()
                if stored != info.chunks:
                    raise StoreError(
                        f"store {self.uri}: {info.chunks - stored} chunks of the import of "
                        f"dataset {name!r} went missing (deleted by another process?)"
                    )
                header = stored_header(info)
                header["fields"] = json.dumps(header["fields"])
                header["chunk_starts"] = json.dumps(header["chunk_starts"])
                conn.execute(
                    f"INSERT OR REPLACE INTO datasets ({_DATASET_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    tuple(header[c] for c in _DATASET_COLUMNS.split(", ")),
                )
                conn.execute(
                    "DELETE FROM dataset_chunks WHERE name = ? AND import_id != ?",
                    (name, import_id),
                )
        except BaseException:
            self._discard_import(name, import_id)
            raise
        return info

    def _insert_dataset_chunks(self, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            with self._tx(write=True) as conn:
                conn.executemany(
                    "INSERT INTO dataset_chunks "
                    "(name, import_id, idx, first_record, record_count, data) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )

    def _discard_import(self, name: str, import_id: str) -> None:
        """Remove an unpublished import's chunks; if that fails too, the next import of the
        name removes them (its publish deletes every other import's chunks)."""
        try:
            with self._tx(write=True) as conn:
                conn.execute(
                    "DELETE FROM dataset_chunks WHERE name = ? AND import_id = ?", (name, import_id)
                )
        except StoreError:
            pass

    def _dataset_row(self, conn: sqlite3.Connection, name: str) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = conn.execute(
            f"SELECT {_DATASET_COLUMNS} FROM datasets WHERE name = ?", (name,)
        ).fetchone()
        return row

    def _unknown_dataset(self, conn: sqlite3.Connection, name: str) -> UnknownDataset:
        names = [r[0] for r in conn.execute("SELECT name FROM datasets ORDER BY name")]
        return UnknownDataset(name, self.uri, names)

    def dataset_info(self, name: str) -> DatasetInfo:
        check_dataset_name(name)
        with self._tx(write=False) as conn:
            row = self._dataset_row(conn, name)
            if row is None:
                raise self._unknown_dataset(conn, name)
        return _dataset_info(row)

    def list_datasets(self) -> list[DatasetInfo]:
        with self._tx(write=False) as conn:
            rows = conn.execute(f"SELECT {_DATASET_COLUMNS} FROM datasets ORDER BY name").fetchall()
        return [_dataset_info(r) for r in rows]

    def read_dataset_chunks(self, info: DatasetInfo, first: int, last: int) -> list[DatasetChunk]:
        check_chunk_range(info, first, last)
        with self._tx(write=False) as conn:
            rows = conn.execute(
                "SELECT idx, first_record, record_count, data FROM dataset_chunks "
                "WHERE name = ? AND import_id = ? AND idx >= ? AND idx < ? ORDER BY idx",
                (info.name, info.import_id, first, last),
            ).fetchall()
        chunks = [DatasetChunk(i, f, n, unpack_buffers(bytes(data))) for i, f, n, data in rows]
        torn = torn_read(info, first, last, chunks)
        if torn is not None:
            raise StoreError(f"store {self.uri}: {torn}")
        return chunks

    def delete_dataset(self, name: str) -> None:
        check_dataset_name(name)
        with self._tx(write=True) as conn:
            if self._dataset_row(conn, name) is None:
                raise self._unknown_dataset(conn, name)
            conn.execute("DELETE FROM dataset_chunks WHERE name = ?", (name,))
            conn.execute("DELETE FROM datasets WHERE name = ?", (name,))

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


def _dataset_info(row: tuple[Any, ...]) -> DatasetInfo:
    doc = dict(zip(_DATASET_COLUMNS.split(", "), row, strict=True))
    doc["fields"] = json.loads(doc["fields"])
    doc["chunk_starts"] = json.loads(doc["chunk_starts"])
    return header_from_stored(doc)


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

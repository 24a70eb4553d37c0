"""The SQLite store's file: its connection settings, schema and upgrades (DESIGN §6).

:class:`tether.store.sqlite.SQLiteStore` opens a connection, calls :func:`configure` once and
then :func:`init_schema` inside its first write transaction. A fresh file gets the latest schema
in one go; an older one is upgraded in the transaction that reads its version.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tether.retry import PollTimeout, poll_until
from tether.store.base import StoreError
from tether.store.sqlite_results import RESULTS_SCHEMA
from tether.store.sqlite_secrets import SECRETS_SCHEMA

SCHEMA_VERSION = 7

# The latest schema, created in one go on a fresh file. An older file is brought up to date by
# MIGRATIONS[v] (the statements that take version v to v+1), in the same transaction that reads
# the version, so a file is never left half upgraded.
SCHEMA: tuple[str, ...] = (
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
# Version 3: replicated shard state (DESIGN §5), in the layout of version 6: a head per shard and
# a row per log entry. The bytes of bases and entries are files beside the database
# (tether.store.sqlite_state): a WAL database writes every page twice (the log, then the
# checkpoint), which for megabytes per entry doubled the bytes a shard writes per update. Head
# columns other than owner_epoch, last and last_epoch are NULL until a base is saved.
# (Versions 2 and 5 held the whole state in BLOB chunks; their replicated state is dropped on
# upgrade -- it only matters to a run in progress.)
SHARD_STATE_TABLES: tuple[str, ...] = (
    """CREATE TABLE shard_heads (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        shard_id INTEGER NOT NULL,
        owner_epoch INTEGER NOT NULL,
        epoch INTEGER,
        version INTEGER,
        save_id TEXT,
        layout TEXT,
        meta TEXT,
        nbytes INTEGER,
        saved_at REAL,
        last INTEGER NOT NULL DEFAULT 0,
        last_epoch INTEGER,
        PRIMARY KEY (run_id, shard_id)
    )""",
    """CREATE TABLE shard_log (
        run_id TEXT NOT NULL,
        shard_id INTEGER NOT NULL,
        position INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        layout TEXT NOT NULL,
        meta TEXT NOT NULL,
        nbytes INTEGER NOT NULL,
        PRIMARY KEY (run_id, shard_id, position)
    )""",
)
_DROP_SHARD_STATE = (
    "DROP TABLE IF EXISTS shard_chunks",
    "DROP TABLE IF EXISTS shard_log",
    "DROP TABLE IF EXISTS shard_heads",
)
# Version 5: datasets (DESIGN §11), store-wide input data: one header row per published dataset
# and the chunks of its records (tether.store.datasets), keyed by import id so that a new import
# never writes over the chunks a header points at. Chunks have no foreign key: they are written
# before their header exists. `fields` and `chunk_starts` are JSON; `data` is the chunk's buffers
# packed into one BLOB (datasets.pack_buffers).
DATASET_TABLES: tuple[str, ...] = (
    """CREATE TABLE datasets (
        name TEXT PRIMARY KEY,
        import_id TEXT NOT NULL,
        records INTEGER NOT NULL,
        fields TEXT NOT NULL,
        chunks INTEGER NOT NULL,
        chunk_starts TEXT NOT NULL,
        nbytes INTEGER NOT NULL,
        created_at REAL NOT NULL,
        source TEXT NOT NULL
    )""",
    """CREATE TABLE dataset_chunks (
        name TEXT NOT NULL,
        import_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        first_record INTEGER NOT NULL,
        record_count INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (name, import_id, idx)
    )""",
)
# Version 4: results (DESIGN §8): runs.meta, metrics, artifacts. The statements that upgrade a
# version 3 file (and a version 4 one) also finish a new one, so all have the same layout.
SCHEMA = SCHEMA + SHARD_STATE_TABLES + RESULTS_SCHEMA + DATASET_TABLES + SECRETS_SCHEMA
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: SHARD_STATE_TABLES,
    2: (*_DROP_SHARD_STATE, *SHARD_STATE_TABLES),
    3: RESULTS_SCHEMA,
    4: DATASET_TABLES,
    5: (*_DROP_SHARD_STATE, *SHARD_STATE_TABLES),
    6: SECRETS_SCHEMA,  # run tokens (DESIGN §13); older runs keep none
}


PAGE_SIZE = 65536


def _busy(e: sqlite3.OperationalError) -> bool:
    return e.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def enable_wal(conn: sqlite3.Connection, timeout_s: float) -> str:
    """Switch the file to WAL mode (a no-op once it is) and return the resulting mode.

    When several processes open a new file at once, the switch fails with SQLITE_BUSY at once
    instead of waiting on busy_timeout (seen with 8 spawned processes), so it is retried here
    until the same deadline; past it, the last SQLITE_BUSY is raised.
    """
    busy: list[sqlite3.OperationalError] = []

    def switch() -> tuple[str] | None:
        try:
            return (str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]),)
        except sqlite3.OperationalError as e:
            if not _busy(e):
                raise
            busy[:] = [e]
            return None

    try:
        switched = poll_until(switch, timeout_s, "the WAL journal mode", interval_s=0.005)
    except PollTimeout:
        raise busy[-1] from None
    assert switched is not None  # no stop event: a value or PollTimeout
    return switched[0]


# Bytes the WAL file is cut back to when a checkpoint resets it. Shard states are megabytes per
# save and readers (the launcher, heartbeats) keep the WAL from resetting for a while, so without
# a limit the file keeps its high-water size, gigabytes after a few dozen clocks of an 8M-parameter
# model (benchmarks/replication_overhead.py); cutting it back costs the next saves re-extending it.
WAL_SIZE_LIMIT = 64 << 20


def configure(conn: sqlite3.Connection, busy_timeout_s: float, uri: str) -> None:
    """Set the connection's pragmas; raise StoreError if the file cannot be in WAL mode."""
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    # Only takes effect on a new file: shard state is megabytes of BLOBs, which 64 KiB pages
    # write and free 2-3x faster than 4 KiB ones (16 MiB saves: ~45 vs ~115 ms); a small write
    # such as a heartbeat stays ~0.1 ms.
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    mode = enable_wal(conn, busy_timeout_s)
    if str(mode).lower() != "wal":
        raise StoreError(
            f"store {uri} cannot use WAL journal mode (got {mode!r}); put it on a local file system"
        )
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    conn.execute("PRAGMA foreign_keys = ON")


def init_schema(conn: sqlite3.Connection, path: Path, uri: str) -> None:
    """Create the schema on a fresh file or upgrade an older one; ``conn`` is in a write
    transaction. Raises StoreError for a file that is not a tether store or is newer."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        for stmt in SCHEMA:
            conn.execute(stmt)
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        return
    row = None
    if "meta" in tables:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        raise StoreError(f"{path} is a SQLite file but not a tether store")
    version = int(row[0])
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store {uri} has schema version {version}, newer than this tether "
            f"supports ({SCHEMA_VERSION}); upgrade tether"
        )
    while version < SCHEMA_VERSION:
        for stmt in MIGRATIONS[version]:
            conn.execute(stmt)
        version += 1
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))

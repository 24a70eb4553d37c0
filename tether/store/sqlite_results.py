"""The results half of the SQLite store: run meta, metrics, artifacts (DESIGN §6, §8).

:class:`SQLiteResults` is a base of :class:`tether.store.sqlite.SQLiteStore` and uses its
transactions. :data:`RESULTS_SCHEMA` is what schema version 4 adds; the same statements build a
new file and upgrade a version 3 one, so both end up with the same layout:

- ``runs.meta``: JSON text, ``'{}'`` for runs written before it existed;
- ``metrics``: one row per ``(run_id, source, step)`` -- the primary key, which also serves
  ``metrics()``' filter and order -- with the values as a JSON object (Python writes floats with
  ``repr``, the shortest text that reads back as the same float64);
- ``artifacts``: one row per ``(run_id, name)`` with the bytes as a BLOB.

Each write is one ``BEGIN IMMEDIATE`` transaction, so a batch of metrics lands whole or not at
all, and ``delete_run`` removes a run and everything under it at once.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from tether.store.base import ArtifactInfo, ArtifactNotFound, MetricRow, UnknownRun
from tether.store.results import (
    check_artifact,
    check_artifact_name,
    check_metric_rows,
    check_run_meta,
    check_source,
)

RESULTS_SCHEMA: tuple[str, ...] = (
    "ALTER TABLE runs ADD COLUMN meta TEXT NOT NULL DEFAULT '{}'",
    # WITHOUT ROWID: rows are small and always looked up by the primary key, which then holds
    # them in key order (one B-tree instead of two).
    """CREATE TABLE metrics (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        source TEXT NOT NULL,
        step INTEGER NOT NULL,
        t REAL NOT NULL,
        vals TEXT NOT NULL,
        PRIMARY KEY (run_id, source, step)
    ) WITHOUT ROWID""",
    """CREATE TABLE artifacts (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        name TEXT NOT NULL,
        content_type TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_at REAL NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (run_id, name)
    )""",
)

# Children before the run itself (foreign keys are on).
_RUN_TABLES = ("run_tokens", "members", "shard_log", "shard_heads", "metrics", "artifacts", "runs")


def _text(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


class SQLiteResults:
    """Run meta, metrics and artifacts in SQLite (see the module docstring); the contracts are
    those of :class:`tether.store.base.Store`."""

    # Set up by SQLiteStore.__init__.
    uri: str
    _clock: Callable[[], float]

    if TYPE_CHECKING:

        def _tx(self, *, write: bool) -> AbstractContextManager[sqlite3.Connection]: ...

        def _require_run(self, conn: sqlite3.Connection, run_id: str) -> None: ...

    def set_run_meta(self, run_id: str, meta: dict[str, Any]) -> None:
        doc = check_run_meta(meta)
        with self._tx(write=True) as conn:
            row = conn.execute("SELECT meta FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise UnknownRun(run_id, self.uri)
            merged = _text({**json.loads(row[0]), **doc})
            conn.execute("UPDATE runs SET meta = ? WHERE run_id = ?", (merged, run_id))

    def log_metrics(self, run_id: str, rows: Sequence[MetricRow]) -> None:
        params = [(run_id, r.source, r.step, r.t, _text(r.values)) for r in check_metric_rows(rows)]
        with self._tx(write=True) as conn:
            self._require_run(conn, run_id)
            conn.executemany(
                "INSERT INTO metrics (run_id, source, step, t, vals) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, source, step) DO UPDATE SET t = excluded.t, "
                "vals = excluded.vals",
                params,
            )

    def metrics(self, run_id: str, source: str | None = None) -> list[MetricRow]:
        with self._tx(write=False) as conn:
            self._require_run(conn, run_id)
            if source is None:
                rows = conn.execute(
                    "SELECT source, step, t, vals FROM metrics WHERE run_id = ? "
                    "ORDER BY source, step",
                    (run_id,),
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT source, step, t, vals FROM metrics WHERE run_id = ? AND source = ? "
                    "ORDER BY step",
                    (run_id, check_source(source)),
                ).fetchall()
        return [MetricRow(s, step, t, json.loads(vals)) for s, step, t, vals in rows]

    def put_artifact(self, run_id: str, name: str, data: bytes, content_type: str) -> None:
        blob = check_artifact(name, data, content_type)
        with self._tx(write=True) as conn:
            self._require_run(conn, run_id)
            conn.execute(
                "INSERT INTO artifacts (run_id, name, content_type, size, created_at, data) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, name) DO UPDATE SET "
                "content_type = excluded.content_type, size = excluded.size, "
                "created_at = excluded.created_at, data = excluded.data",
                (run_id, name, content_type, len(blob), self._clock(), blob),
            )

    def artifacts(self, run_id: str) -> list[ArtifactInfo]:
        with self._tx(write=False) as conn:
            self._require_run(conn, run_id)
            rows = conn.execute(
                "SELECT name, content_type, size, created_at FROM artifacts WHERE run_id = ? "
                "ORDER BY name",
                (run_id,),
            ).fetchall()
        return [ArtifactInfo(*r) for r in rows]

    def get_artifact(self, run_id: str, name: str) -> bytes:
        check_artifact_name(name)
        with self._tx(write=False) as conn:
            row = conn.execute(
                "SELECT data FROM artifacts WHERE run_id = ? AND name = ?", (run_id, name)
            ).fetchone()
            if row is None:
                self._require_run(conn, run_id)
                raise ArtifactNotFound(run_id, name, self.uri)
        return bytes(row[0])

    def delete_run(self, run_id: str) -> None:
        with self._tx(write=True) as conn:
            self._require_run(conn, run_id)
            for table in _RUN_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))

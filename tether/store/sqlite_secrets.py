"""The run-token part of the SQLite store (DESIGN §13): :class:`SQLiteSecrets` is a base of
:class:`tether.store.sqlite.SQLiteStore` and uses its transactions.

:data:`SECRETS_SCHEMA` is what schema version 7 adds: ``run_tokens``, one row per run with its
token list as JSON (:func:`tether.store.secrets.dumps`). ``create_run`` writes the row in the
transaction that writes the run; runs from a version 6 file have none.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from tether.store.secrets import RunToken, dumps, loads

SECRETS_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE run_tokens (
        run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
        tokens TEXT NOT NULL
    )""",
)


class SQLiteSecrets:
    if TYPE_CHECKING:
        uri: str
        _tx: Callable[..., AbstractContextManager[sqlite3.Connection]]

        def _require_run(self, conn: sqlite3.Connection, run_id: str) -> None: ...

    def _insert_run_tokens(
        self, conn: sqlite3.Connection, run_id: str, tokens: Sequence[RunToken]
    ) -> None:
        conn.execute(
            "INSERT INTO run_tokens (run_id, tokens) VALUES (?, ?)", (run_id, dumps(tokens))
        )

    def run_tokens(self, run_id: str) -> list[RunToken]:
        with self._tx(write=False) as conn:
            self._require_run(conn, run_id)
            row = conn.execute(
                "SELECT tokens FROM run_tokens WHERE run_id = ?", (run_id,)
            ).fetchone()
        return [] if row is None else loads(row[0])

    def swap_run_tokens(
        self, run_id: str, expected: Sequence[RunToken], tokens: Sequence[RunToken]
    ) -> bool:
        with self._tx(write=True) as conn:
            self._require_run(conn, run_id)
            row = conn.execute(
                "SELECT tokens FROM run_tokens WHERE run_id = ?", (run_id,)
            ).fetchone()
            if (loads(row[0]) if row else []) != list(expected):
                return False
            if row is None:
                self._insert_run_tokens(conn, run_id, tokens)
            else:
                conn.execute(
                    "UPDATE run_tokens SET tokens = ? WHERE run_id = ?", (dumps(tokens), run_id)
                )
            return True

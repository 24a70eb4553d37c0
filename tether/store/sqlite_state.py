"""The replicated-shard-state half of the SQLite store: claim, log appends, bases, loads
(DESIGN §5, §6).

:class:`SQLiteShardState` is a base of :class:`tether.store.sqlite.SQLiteStore` and uses its
plumbing (``_tx``, ``_require_run``). The head and one row per log entry are in the database;
the bytes of entries and bases are *payload files* in a directory beside it
(``<file>-state/<run>/<shard>/``), because a WAL database writes every page twice (to the WAL,
then to the file at the checkpoint) and an entry is megabytes: in files a shard writes an update
once. A payload is its arrays' raw bytes back to back; the row (or head) that names it holds the
layout and the byte count.

Order of writes, so that a crash or a refusal at any point leaves the stored log complete:

- a payload is written to a temporary name and renamed into place *before* the transaction that
  names it commits (``synchronous=NORMAL``: both survive the kill of any process; only an OS
  crash or power loss can drop the last few, as for every commit of this store);
- an entry's file name carries its position and epoch, a base's a fresh save id, so nothing ever
  overwrites a payload a committed row names;
- files are deleted only after the transaction that stopped naming them committed; a refused
  write, or one whose file could not be written, deletes its own files; compaction also removes
  files no row names (those of a zombie, of a process killed between the file and its commit, or
  of a write whose outcome is unknown).

A reader checks that each payload has the size its row gives, so a torn file is never replayed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tether.store.base import (
    LogEntry,
    ShardLog,
    ShardSnapshot,
    StoreError,
    StoreUnavailable,
    TornState,
    check_log_entries,
    check_member_id,
    log_order_error,
    state_layout,
)
from tether.store.rules import append_refusal, claim_refusal, save_refusal

_LOAD_ATTEMPTS = 5
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_LOG_FILE = re.compile(r"log-(\d+)-e(\d+)\.bin")
_BASE_FILE = re.compile(r"base-(.+)\.bin")


def run_dir_name(run_id: str) -> str:
    """A directory name for a run id: the id itself when it is a safe file name, else a hash."""
    if _SAFE_NAME.fullmatch(run_id):
        return run_id
    return "h-" + hashlib.sha256(run_id.encode()).hexdigest()[:32]


def log_file_name(position: int, epoch: int) -> str:
    return f"log-{position:012d}-e{epoch}.bin"


def write_payload(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write ``arrays`` back to back to ``path`` (via a temporary name) and return the layout
    that reads them back: ``{"file", "arrays": [{"name", "dtype", "size"}], "nbytes"}``."""
    entries, total = [], 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            for name, a in arrays.items():
                raw = np.ascontiguousarray(a).view(np.uint8).data
                f.write(raw)
                entries.append({"name": name, "dtype": a.dtype.str, "size": int(a.size)})
                total += len(raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"file": path.name, "arrays": entries, "nbytes": total}


def read_payload(folder: Path, layout: dict[str, Any], what: str) -> dict[str, np.ndarray]:
    """The arrays of a payload, each a new writable array; TornState when the file is missing
    or does not have the size the layout gives."""
    path = folder / layout["file"]
    arrays = {
        e["name"]: np.empty(int(e["size"]), dtype=np.dtype(e["dtype"])) for e in layout["arrays"]
    }
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != layout["nbytes"]:
                raise TornState(f"{what}: {path.name} has {size} bytes, not {layout['nbytes']}")
            for a in arrays.values():
                view = a.view(np.uint8).data
                if f.readinto(view) != len(view):
                    raise TornState(f"{what}: {path.name} ended early")
    except FileNotFoundError:
        raise TornState(f"{what}: {path.name} is missing") from None
    except OSError as e:
        raise StoreUnavailable(f"{what}: cannot read {path.name}: {e}") from e
    return arrays


class SQLiteShardState:
    """Shard heads, logs and bases on SQLite and payload files (module docstring); the
    contracts are those of :class:`tether.store.base.Store`."""

    # Set up by SQLiteStore.__init__.
    uri: str
    path: Path
    _clock: Callable[[], float]

    if TYPE_CHECKING:

        def _tx(self, *, write: bool) -> AbstractContextManager[sqlite3.Connection]: ...

        def _require_run(self, conn: sqlite3.Connection, run_id: str) -> None: ...

    @property
    def state_dir(self) -> Path:
        """Where payload files live: beside the database file."""
        return self.path.with_name(self.path.name + "-state")

    def _shard_dir(self, run_id: str, shard_id: int) -> Path:
        return self.state_dir / run_dir_name(run_id) / str(shard_id)

    def _what(self, run_id: str, shard_id: int) -> str:
        return f"store {self.uri}: state of shard {shard_id} of run {run_id!r}"

    @contextlib.contextmanager
    def _files(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise StoreUnavailable(f"{what}: {e}") from e

    def claim_shard(self, run_id: str, shard_id: int, epoch: int) -> None:
        check_member_id(shard_id)
        with self._tx(write=True) as conn:
            self._require_run(conn, run_id)
            row = conn.execute(
                "SELECT owner_epoch FROM shard_heads WHERE run_id = ? AND shard_id = ?",
                (run_id, shard_id),
            ).fetchone()
            refusal = claim_refusal(run_id, shard_id, epoch, row and row[0])
            if refusal is not None:
                raise refusal
            conn.execute(
                "INSERT INTO shard_heads (run_id, shard_id, owner_epoch) VALUES (?, ?, ?) "
                "ON CONFLICT (run_id, shard_id) DO UPDATE SET owner_epoch = excluded.owner_epoch",
                (run_id, shard_id, epoch),
            )

    def append_shard_log(
        self, run_id: str, shard_id: int, epoch: int, entries: Sequence[LogEntry]
    ) -> None:
        metas = check_log_entries(run_id, shard_id, epoch, entries)
        key = (run_id, shard_id)
        with self._tx(write=False) as conn:
            owner, head_last = self._log_head(conn, run_id, shard_id)
            todo = self._unapplied(conn, key, epoch, entries, owner, head_last)
        if not todo:
            return  # a retry of an append that was applied
        folder = self._shard_dir(run_id, shard_id)
        with self._files(self._what(run_id, shard_id)):
            layouts = [
                write_payload(folder / log_file_name(e.position, epoch), e.arrays) for e in todo
            ]
        with self._tx(write=True) as conn:
            owner, head_last = self._log_head(conn, run_id, shard_id)
            try:
                todo_now = self._unapplied(conn, key, epoch, todo, owner, head_last)
            except StoreError:
                # Refused: this append's files are named by no row (the head ends before them).
                for e in todo:
                    if e.position > head_last:
                        (folder / log_file_name(e.position, epoch)).unlink(missing_ok=True)
                raise
            skip = len(todo) - len(todo_now)
            conn.executemany(
                "INSERT INTO shard_log (run_id, shard_id, position, epoch, layout, meta, nbytes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (*key, e.position, epoch, json.dumps(lay), metas[e.position], lay["nbytes"])
                    for e, lay in zip(todo_now, layouts[skip:], strict=True)
                ),
            )
            if todo_now:
                conn.execute(
                    "UPDATE shard_heads SET last = ?, last_epoch = ? "
                    "WHERE run_id = ? AND shard_id = ?",
                    (todo_now[-1].position, epoch, *key),
                )

    def _log_head(self, conn: sqlite3.Connection, run_id: str, shard_id: int) -> tuple[Any, int]:
        row = conn.execute(
            "SELECT owner_epoch, last FROM shard_heads WHERE run_id = ? AND shard_id = ?",
            (run_id, shard_id),
        ).fetchone()
        if row is None:
            self._require_run(conn, run_id)
            return None, 0
        return row[0], int(row[1])

    def _unapplied(
        self,
        conn: sqlite3.Connection,
        key: tuple[str, int],
        epoch: int,
        entries: Sequence[LogEntry],
        owner: int | None,
        head_last: int,
    ) -> list[LogEntry]:
        """The entries of an append still to write; raises its refusal (rules.append_refusal).
        Entries at or below the head's last are a retry's, skipped if this epoch wrote them."""
        first = entries[0].position
        refusal = append_refusal(key[0], key[1], epoch, first, owner, head_last)
        if refusal is not None:
            raise refusal
        done = [e for e in entries if e.position <= head_last]
        if done and not _ours(conn, *key, epoch, first, done[-1].position):
            raise log_order_error(key[0], key[1], first, head_last)
        return [e for e in entries if e.position > head_last]

    def save_shard_state(self, snap: ShardSnapshot) -> None:
        state_layout(snap, 1)  # checks the snapshot before anything is written
        meta = json.dumps(snap.meta)
        key = (snap.run_id, snap.shard_id)
        folder = self._shard_dir(*key)
        what = self._what(*key)
        save_id = f"{snap.version}-e{snap.epoch}-{uuid.uuid4().hex[:8]}"
        path = folder / f"base-{save_id}.bin"
        # The file goes when the save certainly did not commit: its write failed, or the save
        # was refused. After another failure the head may name it; compaction collects it if not.
        named = False
        try:
            with self._files(what):
                layout = write_payload(path, snap.arrays)
            named = True
            with self._tx(write=True) as conn:
                row = conn.execute(
                    "SELECT owner_epoch, version, save_id FROM shard_heads "
                    "WHERE run_id = ? AND shard_id = ?",
                    key,
                ).fetchone()
                if row is None:
                    self._require_run(conn, snap.run_id)
                owner, base_version, old_save = (None, None, None) if row is None else row
                refusal = save_refusal(snap, owner, base_version)
                if refusal is not None:
                    named = False
                    raise refusal
                conn.execute(
                    "UPDATE shard_heads SET epoch = ?, version = ?, save_id = ?, layout = ?, "
                    "meta = ?, nbytes = ?, saved_at = ?, last = MAX(last, ?) "
                    "WHERE run_id = ? AND shard_id = ?",
                    (
                        snap.epoch, snap.version, save_id, json.dumps(layout), meta,
                        snap.nbytes, self._clock(), snap.version, *key,
                    ),
                )  # fmt: skip
                # Keep what a reader of the previous head needs: its base and the entries after.
                cutoff = 0 if base_version is None else base_version
                conn.execute(
                    "DELETE FROM shard_log WHERE run_id = ? AND shard_id = ? AND position <= ?",
                    (*key, cutoff),
                )
        finally:
            if not named:
                path.unlink(missing_ok=True)
        self._collect(folder, keep_bases={save_id, old_save}, cutoff=cutoff)

    def _collect(self, folder: Path, *, keep_bases: set[str | None], cutoff: int) -> None:
        """Delete the payloads no reader of the head or of the previous head needs: entries at
        or below ``cutoff`` (whoever wrote them) and bases not in ``keep_bases``."""
        try:
            names = os.listdir(folder)
        except OSError:
            return
        for name in names:
            if (m := _LOG_FILE.fullmatch(name)) and int(m[1]) <= cutoff:
                pass
            elif (m := _BASE_FILE.fullmatch(name)) and m[1] not in keep_bases:
                pass
            else:
                continue
            with contextlib.suppress(OSError):  # a file left behind goes at the next compaction
                (folder / name).unlink()

    def load_shard_log(self, run_id: str, shard_id: int) -> ShardLog | None:
        folder = self._shard_dir(run_id, shard_id)
        what = self._what(run_id, shard_id)
        torn: TornState | None = None
        for _attempt in range(_LOAD_ATTEMPTS):
            with self._tx(write=False) as conn:  # one consistent read snapshot (WAL)
                head = conn.execute(
                    "SELECT epoch, version, save_id, layout, meta, last, last_epoch "
                    "FROM shard_heads WHERE run_id = ? AND shard_id = ?",
                    (run_id, shard_id),
                ).fetchone()
                if head is None:
                    self._require_run(conn, run_id)
                    return None
                epoch, version, save_id, layout, meta, last, last_epoch = head
                rows = conn.execute(
                    "SELECT position, layout, meta FROM shard_log WHERE run_id = ? AND "
                    "shard_id = ? AND position > ? AND position <= ? ORDER BY position",
                    (run_id, shard_id, version or 0, last),
                ).fetchall()
                try:
                    base = None
                    if save_id is not None:
                        arrays = read_payload(folder, json.loads(layout), what)
                        base = ShardSnapshot(run_id, shard_id, epoch, version, json.loads(meta),
                                             arrays)  # fmt: skip
                    positions = [r[0] for r in rows]
                    expected = list(range((version or 0) + 1, last + 1))
                    if positions != expected:
                        raise TornState(f"{what}: log positions {positions[:3]}... are not "
                                        f"{(version or 0) + 1}..{last}")  # fmt: skip
                    entries = [
                        LogEntry(p, json.loads(m), read_payload(folder, json.loads(lay), what))
                        for p, lay, m in rows
                    ]
                except TornState as e:  # compacted under the reader: read the new head
                    torn = e
                    continue
            return ShardLog(base, entries, last_epoch)
        assert torn is not None
        raise StoreError(f"{torn} (after {_LOAD_ATTEMPTS} reads)")

    def load_shard_state(self, run_id: str, shard_id: int) -> ShardSnapshot | None:
        log = self.load_shard_log(run_id, shard_id)
        return None if log is None else log.base

    def shard_heads(self, run_id: str) -> dict[int, dict[str, Any]]:
        with self._tx(write=False) as conn:
            self._require_run(conn, run_id)
            rows = conn.execute(
                "SELECT shard_id, owner_epoch, epoch, version, saved_at, nbytes, last, "
                "last - COALESCE(version, 0) FROM shard_heads WHERE run_id = ? ORDER BY shard_id",
                (run_id,),
            ).fetchall()
        keys = ("owner_epoch", "epoch", "version", "saved_at", "nbytes", "last", "log_entries")
        return {r[0]: dict(zip(keys, r[1:], strict=True)) for r in rows}

    def _delete_run_files(self, run_id: str) -> None:
        shutil.rmtree(self.state_dir / run_dir_name(run_id), ignore_errors=True)


def _ours(
    conn: sqlite3.Connection, run_id: str, shard_id: int, epoch: int, first: int, last: int
) -> bool:
    """Whether positions first..last are in the log, all written by ``epoch``."""
    rows = conn.execute(
        "SELECT COUNT(*) FROM shard_log WHERE run_id = ? AND shard_id = ? AND position >= ? "
        "AND position <= ? AND epoch = ?",
        (run_id, shard_id, first, last, epoch),
    ).fetchone()
    return bool(rows[0] == last - first + 1)

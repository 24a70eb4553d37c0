"""Where the processes of a run find each other and leave their results (DESIGN §1, §6, §8).

Run config, membership, epochs and replicated shard state; and, Sacred-like, each run's
metadata (``set_run_meta``), per-step metrics (:class:`MetricRow`) and artifacts (reports, plots).

Open a store with :func:`open_store` in each process; pass ``store.uri`` (never the object) to
child processes.

Store URIs follow SQLAlchemy's convention for SQLite:

- ``sqlite:///runs/tether.db``  -- three slashes: a path relative to the current directory;
- ``sqlite:////abs/path/tether.db`` -- four slashes: an absolute path.

``store.uri`` is always the absolute form, so it opens the same file from any directory.

MongoDB URIs (``mongodb://h1,h2,h3/DBNAME?replicaSet=rs0`` or ``mongodb+srv://...``) open a
:class:`tether.store.mongo.MongoStore`; write concern, read concern, read preference and timeouts
are taken from the URI's query string, with safe defaults (see :mod:`tether.store.mongo`).
``tether mongo up`` starts a local three-member replica set and prints its URI.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.store.base import (
    MAX_ARTIFACT_BYTES,
    MEMBER_STATES,
    ROLES,
    ArtifactInfo,
    ArtifactNotFound,
    DatasetExists,
    Fenced,
    LogEntry,
    Member,
    MetricRow,
    Role,
    RunExists,
    RunRecord,
    ShardLog,
    ShardSnapshot,
    Store,
    StoreError,
    StoreUnavailable,
    UnknownDataset,
    UnknownRun,
    redact_uri,
)
from tether.store.datasets import DatasetInfo, FieldSpec
from tether.store.secrets import RunToken
from tether.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from tether.store.mongo import MongoStore

__all__ = [
    "MAX_ARTIFACT_BYTES",
    "MEMBER_STATES",
    "ROLES",
    "ArtifactInfo",
    "ArtifactNotFound",
    "DatasetExists",
    "DatasetInfo",
    "Fenced",
    "FieldSpec",
    "LogEntry",
    "Member",
    "MetricRow",
    "MongoStore",
    "Role",
    "RunExists",
    "RunRecord",
    "RunToken",
    "SQLiteStore",
    "ShardLog",
    "ShardSnapshot",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "UnknownDataset",
    "UnknownRun",
    "default_store_uri",
    "open_store",
]

_SQLITE_PREFIX = "sqlite:///"
_ACCEPTED = (
    "use sqlite:///PATH (relative to the current directory; sqlite:////PATH for an absolute "
    "path) or mongodb://HOST[,HOST...]/?replicaSet=NAME"
)


def __getattr__(name: str) -> Any:
    # pymongo is imported only by processes that use a MongoDB store.
    if name == "MongoStore":
        from tether.store.mongo import MongoStore

        return MongoStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(uri: str, *, busy_timeout_s: float | None = None) -> Store:
    """Open the store named by ``uri`` (see the module docstring for the accepted forms).

    ``busy_timeout_s`` bounds how long a SQLite write waits for another process's write lock
    before it raises :class:`StoreUnavailable` (heartbeats use a short one so that they never
    queue behind a large state write); MongoDB's timeouts come from the URI's options.

    A SQLite file, its parent folders and its schema are created if absent; a MongoDB store
    connects and creates its indexes. Raises ValueError for a URI that names no supported backend
    (or a MongoDB URI with w=0), :class:`StoreUnavailable` if the store cannot be reached, and
    :class:`StoreError` for a URI pymongo rejects.
    """
    if not isinstance(uri, str):
        raise TypeError(f"store URI must be a string; got {type(uri).__name__}")
    if uri.startswith(_SQLITE_PREFIX):
        path = uri[len(_SQLITE_PREFIX) :]
        if not path or path == ":memory:":
            raise ValueError(
                f"store URI {uri!r} names no file; an in-memory database cannot be shared "
                f"between processes, so {_ACCEPTED}"
            )
        if "?" in path:
            raise ValueError(f"store URI {uri!r} has query parameters, which sqlite does not take")
        if busy_timeout_s is None:
            return SQLiteStore(path)
        return SQLiteStore(path, busy_timeout_s=busy_timeout_s)
    scheme = uri.partition("://")[0].lower() if "://" in uri else ""
    if scheme == "sqlite":
        raise ValueError(f"store URI {uri!r} needs three slashes after 'sqlite:'; {_ACCEPTED}")
    if scheme in ("mongodb", "mongodb+srv"):
        from tether.store.mongo import MongoStore

        return MongoStore(uri)
    raise ValueError(f"store URI {redact_uri(uri)!r} is not supported; {_ACCEPTED}")


def default_store_uri(run_dir: str | Path) -> str:
    """``sqlite:///<absolute run_dir>/tether.db``: the store of a run on one machine."""
    return f"{_SQLITE_PREFIX}{Path(run_dir).expanduser().resolve() / 'tether.db'}"

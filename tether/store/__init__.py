"""Where the processes of a run find each other: run config, membership, epochs (DESIGN §1, §6).

Open a store with :func:`open_store` in each process; pass ``store.uri`` (never the object) to
child processes.

Store URIs follow SQLAlchemy's convention for SQLite:

- ``sqlite:///runs/tether.db``  -- three slashes: a path relative to the current directory;
- ``sqlite:////abs/path/tether.db`` -- four slashes: an absolute path.

``store.uri`` is always the absolute form, so it opens the same file from any directory.
``mongodb://...`` is reserved for the MongoDB backend (not available yet).
"""

from __future__ import annotations

import re
from pathlib import Path

from tether.store.base import (
    MEMBER_STATES,
    ROLES,
    Fenced,
    Member,
    Role,
    RunExists,
    RunRecord,
    Store,
    StoreError,
    StoreUnavailable,
    UnknownRun,
)
from tether.store.snapshots import ShardSnapshot
from tether.store.sqlite import SQLiteStore

__all__ = [
    "MEMBER_STATES",
    "ROLES",
    "Fenced",
    "Member",
    "Role",
    "RunExists",
    "RunRecord",
    "SQLiteStore",
    "ShardSnapshot",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "UnknownRun",
    "default_store_uri",
    "open_store",
]

_SQLITE_PREFIX = "sqlite:///"
_ACCEPTED = (
    "use sqlite:///PATH (relative to the current directory; sqlite:////PATH for an absolute "
    "path) or mongodb://HOST[,HOST...]/?replicaSet=NAME"
)


def _redact(uri: str) -> str:
    """Hide credentials (``scheme://user:password@host``) before a URI goes into a message."""
    return re.sub(r"://[^/@]*@", "://***@", uri)


def open_store(uri: str) -> Store:
    """Open the store named by ``uri`` (see the module docstring for the accepted forms).

    A SQLite file, its parent folders and its schema are created if absent. Raises ValueError
    for a URI that names no supported backend, and :class:`StoreError` for a MongoDB URI until
    that backend exists.
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
        return SQLiteStore(path)
    scheme = uri.partition("://")[0].lower() if "://" in uri else ""
    if scheme == "sqlite":
        raise ValueError(f"store URI {uri!r} needs three slashes after 'sqlite:'; {_ACCEPTED}")
    if scheme in ("mongodb", "mongodb+srv"):
        raise StoreError(
            f"the MongoDB backend is not available yet ({_redact(uri)}); "
            "use a sqlite:///PATH store for now"
        )
    raise ValueError(f"store URI {_redact(uri)!r} is not supported; {_ACCEPTED}")


def default_store_uri(run_dir: str | Path) -> str:
    """``sqlite:///<absolute run_dir>/tether.db``: the store of a run on one machine."""
    return f"{_SQLITE_PREFIX}{Path(run_dir).expanduser().resolve() / 'tether.db'}"

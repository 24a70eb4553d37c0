"""The layout of a MongoDB store's database: document ids and values, read options, indexes.

Shared by the halves of :class:`tether.store.mongo.MongoStore` (DESIGN §6). Index creation is
idempotent, so every store creates them when it is opened; processes opening a new database at
once race on the builds, and the loser retries (:func:`tether.retry.retry`). So do two first
writes of one document, which race on the upsert's insert.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pymongo import ASCENDING, DESCENDING
from pymongo.errors import DuplicateKeyError, OperationFailure
from pymongo.read_concern import ReadConcern
from pymongo.read_preferences import Primary

from tether.retry import RetryPolicy, retry

T = TypeVar("T")
# (collection, keys, unique)
Index = tuple[Any, Any, bool]

CHUNK_KEY = ("run_id", "shard_id", "save_id", "name", "idx")
# NamespaceExists, IndexBuildAlreadyInProgress: another process is creating the same collection
# or index.
_CREATE_RACE_CODES = frozenset({48, 276})
# At most 20 attempts, at most 0.15 s apart: the bound the builds have always had.
_CREATE_RACE = RetryPolicy(attempts=20, initial_s=0.15, max_s=0.15)
# The loser of an upsert race finds the document at once: three attempts, no wait.
_UPSERT_RACE = RetryPolicy(attempts=3, initial_s=0.0, max_s=0.0)
_rng = random.Random()


def doc_id(*parts: Any) -> str:
    """The ``_id`` of the document of ``parts`` (run, role, member; run, shard; ...)."""
    return json.dumps(parts, separators=(",", ":"))


def json_doc(value: Any, what: str) -> dict[str, Any]:
    """``value`` as it comes back from JSON (string keys, lists), like the SQLite backend."""
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict; got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value))  # type: ignore[no-any-return]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serializable: {e}") from e


def _duplicate_key(error: BaseException) -> bool:
    return isinstance(error, DuplicateKeyError)


def retry_upsert(call: Callable[[], T]) -> T:
    """Run ``call`` again after DuplicateKeyError (3 attempts in all), then let it propagate."""
    return retry(call, _UPSERT_RACE, _rng, _duplicate_key)


def recovery_options(uri_options: dict[str, Any]) -> dict[str, Any]:
    """Options of the reads that decide recovery and fencing: the primary, majority-committed
    data (unless the URI chose a read concern level)."""
    return {
        "read_preference": Primary(),
        "read_concern": ReadConcern(uri_options.get("readconcernlevel", "majority")),
    }


def store_indexes(runs: Any, members: Any, heads: Any, chunks: Any) -> list[Index]:
    """The indexes of the runs, members and shard-state collections."""
    return [
        (runs, [("created_at", DESCENDING), ("order", DESCENDING)], False),
        (members, [("run_id", ASCENDING), ("role", ASCENDING), ("member_id", ASCENDING)], False),
        (heads, [("run_id", ASCENDING), ("shard_id", ASCENDING)], False),
        (chunks, [(f, ASCENDING) for f in CHUNK_KEY], True),
    ]


def _create_race(error: BaseException) -> bool:
    return isinstance(error, OperationFailure) and error.code in _CREATE_RACE_CODES


def create_indexes(indexes: Iterable[Index]) -> None:
    """Create each index (a no-op where it exists), retrying while another process builds it."""
    for collection, keys, unique in indexes:
        build = functools.partial(collection.create_index, keys, unique=unique)
        retry(build, _CREATE_RACE, _rng, _create_race)

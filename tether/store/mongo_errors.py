"""What the MongoDB store makes of pymongo's errors (DESIGN §6).

:func:`translate_error` maps every pymongo error to the store's vocabulary once: what may work
if retried (network errors, NotPrimary, timeouts, write-concern errors) is
:class:`StoreUnavailable`, anything else :class:`StoreError`; the message names the operation and
the pymongo error.
"""

from __future__ import annotations

from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)

from tether.store.base import StoreError, StoreUnavailable

# Server error codes that mean "the primary moved or shut down; the same call may work later".
_RETRYABLE_CODES = frozenset({6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436})


def translate_error(e: PyMongoError, op: str, where: str) -> StoreError:
    """Map a pymongo error to the store's vocabulary: retryable -> StoreUnavailable."""
    retryable = isinstance(e, ConnectionFailure | WriteConcernError | ExecutionTimeout)
    if isinstance(e, BulkWriteError):
        details = e.details or {}
        codes = {w.get("code") for w in details.get("writeErrors", [])}
        retryable = not codes - _RETRYABLE_CODES  # only write-concern or retryable errors
    elif isinstance(e, OperationFailure) and not isinstance(e, DuplicateKeyError):
        retryable = retryable or e.code in _RETRYABLE_CODES
        retryable = retryable or e.has_error_label("RetryableWriteError")
    cls = StoreUnavailable if retryable else StoreError
    return cls(f"store {where}: {op} failed: {type(e).__name__}: {e}")

"""The seam where tests inject MongoDB failures into a store (DESIGN §6).

No ``mongod`` runs where Tether is built, so the failure handling of
:class:`tether.store.mongo.MongoStore` (NotPrimary, AutoReconnect, timeouts, write-concern
errors) is tested by injecting the exceptions pymongo would raise, at the points of an operation
where a real cluster could fail. Like a Toxiproxy toxic, a fault is a small named thing: a point,
what happens there (an error is raised, or a hook runs), how often, and after how many passes.
What the store makes of those errors is :mod:`tether.store.mongo_errors`.

The store calls :meth:`FaultPlan.check` at every point it reaches; with no plan it costs nothing.
Points (see :data:`POINTS`):

- one per operation, checked first: ``connect`` (index creation in the constructor),
  ``create_run``, ``get_run``, ``list_runs``, ``finish_run``, ``register``, ``heartbeat``,
  ``set_member_state``, ``members``, ``member``, ``claim``, ``save``, ``append``, ``load``,
  ``shard_heads``, and for results ``set_run_meta``, ``log_metrics``, ``metrics``, ``put_artifact``,
  ``artifacts``, ``get_artifact``, ``delete_run``, and for input data ``put_dataset`` (each
  step of an import), ``dataset_info``, ``list_datasets``, ``read_dataset``, ``delete_dataset``;
- inside a save or a log append (``append``), in order: ``before_chunks``, ``chunks`` (before
  every batch of inserts), ``after_chunks``, ``before_head``, ``after_head`` (the head switch
  was applied but, as far as the caller knows, its reply was lost) and ``gc`` (deleting old
  chunks; a save only);
- inside a load: ``read`` (before the head is read) and ``read_chunks`` (after the head was read,
  before its chunks are).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from pymongo.errors import (
    AutoReconnect,
    DuplicateKeyError,
    ExecutionTimeout,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WriteConcernError,
    WTimeoutError,
)

OPERATION_POINTS = (
    "connect",
    "create_run",
    "get_run",
    "list_runs",
    "finish_run",
    "register",
    "heartbeat",
    "set_member_state",
    "members",
    "member",
    "claim",
    "save",
    "append",
    "load",
    "shard_heads",
    # results (DESIGN §8)
    "set_run_meta",
    "log_metrics",
    "metrics",
    "put_artifact",
    "artifacts",
    "get_artifact",
    "delete_run",
    # run tokens (DESIGN §13)
    "run_tokens",
    "swap_run_tokens",
    # input data (DESIGN §11): every step of an import is a `put_dataset` pass (the existence
    # check, each batch of chunk inserts, the publish, the clean-up)
    "put_dataset",
    "dataset_info",
    "list_datasets",
    "read_dataset",
    "delete_dataset",
)
SAVE_POINTS = ("before_chunks", "chunks", "after_chunks", "before_head", "after_head", "gc")
LOAD_POINTS = ("read", "read_chunks")
POINTS = frozenset(OPERATION_POINTS + SAVE_POINTS + LOAD_POINTS)

# The errors a real replica set produces, by name, built the way pymongo builds them (codes and
# labels included), so the store's error translation sees what it would see in production.
ERRORS: dict[str, Callable[[str], BaseException]] = {
    "auto_reconnect": lambda where: AutoReconnect(f"connection closed ({where}, injected)"),
    "not_primary": lambda where: NotPrimaryError(
        f"not primary ({where}, injected)",
        {"ok": 0, "code": 10107, "codeName": "NotWritablePrimary", "errmsg": "not primary"},
    ),
    "network_timeout": lambda where: NetworkTimeout(f"timed out ({where}, injected)"),
    "server_selection_timeout": lambda where: ServerSelectionTimeoutError(
        f"No replica set members match selector Primary() ({where}, injected), Timeout: 5.0s"
    ),
    "write_concern_timeout": lambda where: WTimeoutError(
        f"waiting for replication timed out ({where}, injected)",
        64,
        {"code": 64, "codeName": "WriteConcernFailed", "errInfo": {"wtimeout": True}},
    ),
    "write_concern_error": lambda where: WriteConcernError(
        f"operation was interrupted ({where}, injected)",
        11602,
        {"code": 11602, "codeName": "InterruptedDueToReplStateChange"},
    ),
    "execution_timeout": lambda where: ExecutionTimeout(
        f"operation exceeded time limit ({where}, injected)", 50, {"code": 50}
    ),
    "duplicate_key": lambda where: DuplicateKeyError(
        f"E11000 duplicate key error ({where}, injected)", 11000, {"code": 11000}
    ),
    "operation_failure": lambda where: OperationFailure(
        f"unauthorized ({where}, injected)", 13, {"code": 13, "codeName": "Unauthorized"}
    ),
}


@dataclass
class InjectedFault:
    """What happens at ``point``: ``error(point)`` is raised, or ``hook(point)`` runs.

    It lets ``skip`` passes go by, then acts on the next ``times`` passes (``None``: forever).
    """

    point: str
    error: Callable[[str], BaseException] | None
    hook: Callable[[str], None] | None
    times: int | None
    skip: int
    fired: int = 0

    @property
    def spent(self) -> bool:
        return self.times is not None and self.fired >= self.times


class FaultPlan:
    """Faults to inject into one store (thread-safe). ``hits`` counts the passes per point."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[InjectedFault] = []
        self.hits: Counter[str] = Counter()

    def fail(
        self,
        point: str,
        error: str | BaseException | Callable[[str], BaseException] = "auto_reconnect",
        *,
        times: int | None = 1,
        skip: int = 0,
    ) -> InjectedFault:
        """Raise ``error`` at ``point``: a name from :data:`ERRORS`, an exception (raised as
        is each time), or a factory called with the point's name."""
        if isinstance(error, str):
            if error not in ERRORS:
                raise ValueError(f"unknown error {error!r}; known: {', '.join(sorted(ERRORS))}")
            factory = ERRORS[error]
        elif isinstance(error, BaseException):
            instance = error
            factory = lambda _point: instance  # noqa: E731
        else:
            factory = error
        return self._add(InjectedFault(point, factory, None, times, skip))

    def on(
        self, point: str, hook: Callable[[str], None], *, times: int | None = 1, skip: int = 0
    ) -> InjectedFault:
        """Run ``hook(point)`` at ``point`` (e.g. to move the head under a reader)."""
        return self._add(InjectedFault(point, None, hook, times, skip))

    def _add(self, fault: InjectedFault) -> InjectedFault:
        if fault.point not in POINTS:
            raise ValueError(
                f"unknown fault point {fault.point!r}; known: {', '.join(sorted(POINTS))}"
            )
        if fault.times is not None and fault.times < 1 or fault.skip < 0:
            raise ValueError("a fault needs times >= 1 (or None) and skip >= 0")
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def check(self, point: str) -> None:
        """Called by the store at ``point``: act on the first live fault there, if any."""
        with self._lock:
            self.hits[point] += 1
            fault = next((f for f in self._faults if f.point == point and not f.spent), None)
            if fault is None:
                return
            if fault.skip > 0:
                fault.skip -= 1
                return
            fault.fired += 1
        # Outside the lock: a hook may run store operations that reach other points.
        if fault.hook is not None:
            fault.hook(point)
        elif fault.error is not None:
            raise fault.error(point)

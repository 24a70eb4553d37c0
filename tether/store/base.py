"""The store interface of every backend: runs, members, shard state, results (DESIGN §1, §6, §8).

Processes of one run find each other through the store: the run's config and every member's
address and epoch live here, and so does every shard's replicated state. A backend is any object
that satisfies :class:`Store`: :class:`tether.store.sqlite.SQLiteStore` (one machine) and
:class:`tether.store.mongo.MongoStore` (a replica set).

Contracts every backend keeps (the shared test suite checks them against each backend):

- ``register`` is atomic: the new epoch is the previous epoch of ``(run, role, member_id)`` plus
  one (1 for the first registration), so two concurrent registrations never get the same epoch.
- Writes by a member (``heartbeat``, ``set_member_state``) are conditional on the writer's epoch
  being the stored one; otherwise they raise :class:`Fenced` and change nothing (DESIGN §5: a
  replaced member that is still alive must not overwrite its successor).
- Times (``created_at``, ``started_at``, ``heartbeat``) are unix seconds taken by the store
  backend at write time, so a reader compares them with the same clock.
- JSON fields (config, info, summary) round-trip through JSON: keys come back as strings, tuples
  as lists.

Replicated shard state (DESIGN §5) is a small *head* record per ``(run, shard)``, a *log* of
the updates the shard applied and a *base* state the log continues from (state-machine
replication: a recovery loads the base and replays the log through the same optimizer code):

- ``claim_shard(run, shard, e)`` sets the head's owner epoch to ``e`` if the stored one is ``<= e``
  (equal: an idempotent retry of the same claim) and raises :class:`Fenced` otherwise. A
  replacement shard claims *before* it loads, so once it has loaded, no older epoch can write.
- ``append_shard_log(run, shard, e, entries)`` makes a batch of entries (contiguous positions)
  durable, then advances the head's ``last`` position in one atomic write conditional on
  ``owner_epoch == e`` (else :class:`Fenced`, head untouched) and on the batch leaving no gap
  after ``last`` (else :class:`StoreError`); entries it repeats at or below ``last`` must be
  this epoch's (a retry's), and are skipped, so an entry is never written twice. An
  entry's payload is keyed by its epoch and position, so a zombie's append never overwrites the
  owner's entry; the head names the epoch of its last entry and every entry the epoch of the one
  before it, so a reader follows the owner's chain and ignores a zombie's refused leftovers. A
  retry of an append whose head switch was applied counts as done. An entry is visible only once
  the head names it, so a torn entry is never read.
- ``save_shard_state(snap)`` writes a *base*: the complete state at ``snap.version``. Its payload
  goes under a fresh save id, never over the one the head points at; then the head switches to
  it in one atomic write conditional on ``owner_epoch == snap.epoch`` (else :class:`Fenced`) and
  ``snap.version`` not below the head's base version (else :class:`StoreError`; equal rewrites).
  A base past the log's end moves ``last`` up to it (a state installed whole; the next append
  follows it); a shard's own compactor only writes bases of versions already durable in the
  log. After the switch the store deletes what no reader of
  the new head *or of the previous one* needs: bases other than those two, and entries at or
  below the previous base's version (compaction never tears a recovery that read the head just
  before the switch). A failure at any point leaves the previous base and log complete.
- ``load_shard_log`` returns the base the head points at and every entry after it up to
  ``last``, complete and contiguous, or raises; never a mix of two heads. ``load_shard_state``
  is its base alone.

Results (DESIGN §8, a Sacred-like layout: runs, metrics, artifacts) live beside the run so that
experiments can be queried later: free-form ``meta`` on the run record, per-step
:class:`MetricRow` s keyed by ``(run, source, step)``, and named artifacts (files of at most
:data:`MAX_ARTIFACT_BYTES`). Their checks are in :mod:`tether.store.results`.

Datasets (DESIGN §11, input data in the store) are store-wide, keyed by name, not by run: a
header and its chunks (the layout and the codec are in :mod:`tether.store.datasets`). An import
is all or nothing: ``put_dataset`` writes the chunks under a fresh import id that no header
points at, then publishes the header in one atomic write; a failure before that removes the
chunks it wrote and leaves any earlier dataset of that name as it was. A reader follows one
header's import id, so it never mixes two imports: if the dataset is replaced or deleted under
it, its next read raises :class:`StoreError`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np

from tether.roles import ROLES, Role
from tether.store.datasets import DatasetChunk, DatasetInfo, FieldSpec
from tether.store.secrets import RunSecrets

MEMBER_STATES: tuple[str, ...] = ("running", "exited", "failed")


class StoreError(Exception):
    """Base class of every error a store raises."""


class StoreUnavailable(StoreError):
    """The store could not be reached or stayed busy past its timeout; the call may be retried."""


class UnknownRun(StoreError):
    """The run id is not in the store."""

    def __init__(self, run_id: str, store_uri: str) -> None:
        super().__init__(f"run {run_id!r} not found in store {store_uri}")
        self.run_id = run_id
        self.store_uri = store_uri


class RunExists(StoreError):
    """``create_run`` was called with a run id that is already in the store."""

    def __init__(self, run_id: str, store_uri: str) -> None:
        super().__init__(f"run {run_id!r} already exists in store {store_uri}")
        self.run_id = run_id
        self.store_uri = store_uri


class Fenced(StoreError):
    """A write by a stale epoch: the member was replaced (or never registered) (DESIGN §5)."""

    def __init__(
        self,
        run_id: str,
        role: Role,
        member_id: int,
        epoch: int,
        current_epoch: int | None,
    ) -> None:
        who = f"{role} {member_id} of run {run_id!r}"
        if current_epoch is None:
            msg = f"fenced: {who} is not registered; this writer holds epoch {epoch}"
        else:
            msg = f"fenced: {who} is at epoch {current_epoch}; this writer holds epoch {epoch}"
        super().__init__(msg)
        self.run_id = run_id
        self.role = role
        self.member_id = member_id
        self.epoch = epoch
        self.current_epoch = current_epoch


class UnknownDataset(StoreError):
    """The dataset name is not in the store; the message lists the datasets that are."""

    def __init__(self, name: str, store_uri: str, known: Sequence[str]) -> None:
        if known:
            holds = "it holds " + ", ".join(repr(k) for k in known)
        else:
            holds = "it holds no datasets (import one with `tether data import`)"
        super().__init__(f"dataset {name!r} not found in store {store_uri}; {holds}")
        self.name = name
        self.store_uri = store_uri
        self.known = list(known)


class DatasetExists(StoreError):
    """``put_dataset`` without ``replace`` named a dataset that is already in the store."""

    def __init__(self, name: str, store_uri: str) -> None:
        super().__init__(
            f"dataset {name!r} already exists in store {store_uri}; replace it (--replace) or "
            "choose another name"
        )
        self.name = name
        self.store_uri = store_uri


@dataclass(frozen=True, slots=True)
class Member:
    """One registration of a process in a run, as last written to the store."""

    run_id: str
    role: Role
    member_id: int
    epoch: int
    address: str  # "host:port" for servers, "" for workers
    pid: int
    host: str  # socket.gethostname() of the member
    started_at: float  # unix time of the registration that produced this epoch
    heartbeat: float  # unix time of the last heartbeat (store-side time at write)
    state: str  # "running" | "exited" | "failed"
    info: dict[str, Any]  # free-form fields the member reports: clock, version, loss, ...


class ArtifactNotFound(StoreError):
    """``get_artifact`` named an artifact the run does not have."""

    def __init__(self, run_id: str, name: str, store_uri: str) -> None:
        super().__init__(f"artifact {name!r} not found in run {run_id!r} of store {store_uri}")
        self.run_id = run_id
        self.name = name
        self.store_uri = store_uri


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    config: dict[str, Any]
    created_at: float
    finished: bool
    summary: dict[str, Any] | None  # the run summary written at the end
    # Free-form metadata merged in by set_run_meta: experiment, tags, git commit, versions,
    # status (DESIGN §8); {} for runs written before it existed.
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


# -- results: per-step metrics and artifacts (DESIGN §8) -----------------------------------------

# MongoDB rejects documents over 16 MiB; an artifact is one document, so half of that.
MAX_ARTIFACT_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class MetricRow:
    """What one writer measured at one step. ``(run, source, step)`` is unique in the store."""

    source: str  # who measured it: "worker:0", "shard:1", "launcher" (1 to 64 characters)
    step: int  # >= 0: the worker's clock, the shard's version, the launcher's tick
    t: float  # unix time at which the writer measured it (finite)
    values: dict[str, float]  # metric name -> finite value, stored as float64


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    """An artifact's description, without its bytes."""

    name: str  # a relative path such as "report.md" or "plots/loss.png"
    content_type: str  # e.g. "text/markdown", "image/png"
    size: int  # bytes
    created_at: float  # unix time of the write that stored this content (store-side clock)


# -- replicated shard state: the snapshot and its stored layout (DESIGN §5) ----------------------

DEFAULT_STATE_CHUNK_BYTES = 4 << 20
# MongoDB rejects documents over 16 MiB; a chunk plus its few key fields must stay well under it.
MAX_STATE_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class ShardSnapshot:
    """One complete replicated state of a shard, as saved and loaded (DESIGN §5)."""

    run_id: str
    shard_id: int
    epoch: int  # the writer's epoch
    version: int  # shard version (optimizer steps applied) this state is at
    meta: dict[str, Any]  # small JSON: clock table, de-dup table, stats, optimizer scalars...
    arrays: dict[str, np.ndarray]  # name -> 1-D array (params, optimizer state, pending grads)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One applied update of a shard, as appended to its replication log (DESIGN §5).

    ``position`` is the shard version the update produced (1 for the first), so a log is the
    contiguous run of positions after its base. ``arrays`` holds what redoes the update exactly
    (``{"grad": g}``, the gradient the optimizer applied) and ``meta`` the small JSON tables as
    they stood right after it (clocks, de-dup table, stats).
    """

    position: int
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())


@dataclass(frozen=True, slots=True)
class ShardLog:
    """What a recovery reads: the base state the head names (None: the shard's initial state,
    version 0) and the entries after it, in position order, contiguous up to the head's last."""

    base: ShardSnapshot | None
    entries: list[LogEntry]
    last_epoch: int | None  # the epoch that wrote the last entry (None: there is none)

    @property
    def base_version(self) -> int:
        return 0 if self.base is None else self.base.version

    @property
    def last(self) -> int:
        return self.entries[-1].position if self.entries else self.base_version


def check_log_entries(
    run_id: str, shard_id: int, epoch: int, entries: Sequence[LogEntry]
) -> dict[int, str]:
    """Each entry's meta as JSON text, by position, checked before anything is written: raise
    ValueError for a batch that is empty, not contiguous, not JSON or not plain 1-D arrays."""
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"run_id must be a non-empty string; got {run_id!r}")
    check_member_id(shard_id)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"epoch must be a positive int; got {epoch!r}")
    if not entries:
        raise ValueError("a log append needs at least one entry")
    first = entries[0].position
    if isinstance(first, bool) or not isinstance(first, int) or first < 1:
        raise ValueError(f"log positions start at 1; got {first!r}")
    texts = {}
    for i, e in enumerate(entries):
        if not isinstance(e, LogEntry):
            raise TypeError(f"expected LogEntry; got {type(e).__name__}")
        if e.position != first + i:
            raise ValueError(
                f"log entries must have contiguous positions; got {e.position} after "
                f"{first + i - 1}"
            )
        if not isinstance(e.meta, dict):
            raise TypeError(f"log entry meta must be a dict; got {type(e.meta).__name__}")
        state_layout(ShardSnapshot(run_id, shard_id, epoch, e.position, e.meta, e.arrays), 1)
        try:
            texts[e.position] = json.dumps(e.meta)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"log entry {e.position}'s meta is not JSON-serializable: {err}"
            ) from err
    return texts


def log_order_error(run_id: str, shard_id: int, first: int, head_last: int) -> StoreError:
    """An append that does not continue the log: its first position is not head's last + 1."""
    return StoreError(
        f"shard {shard_id} of run {run_id!r}: a log append at position {first} does not follow "
        f"the stored log, which ends at {head_last}"
    )


class TornState(StoreError):
    """The chunks read do not make up the state the head described (the head moved under a
    reader, or the store lost data). Backends retry the load on it; callers see it only when a
    retry does not help."""


def version_regression(snap: ShardSnapshot, head_version: int) -> StoreError:
    """The error of a save whose version is below the head's (a state never goes back)."""
    return StoreError(
        f"shard {snap.shard_id} of run {snap.run_id!r}: the state would go back from version "
        f"{head_version} to {snap.version} (epoch {snap.epoch}); a saved state never goes back"
    )


def check_chunk_bytes(chunk_bytes: int) -> int:
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int):
        raise TypeError(f"chunk_bytes must be an int; got {chunk_bytes!r}")
    if not 1 <= chunk_bytes <= MAX_STATE_CHUNK_BYTES:
        raise ValueError(
            f"chunk_bytes must be 1 to {MAX_STATE_CHUNK_BYTES} (MongoDB's documents are at most "
            f"16 MiB); got {chunk_bytes}"
        )
    return chunk_bytes


def state_layout(snap: ShardSnapshot, chunk_bytes: int) -> dict[str, Any]:
    """Check ``snap`` and describe how its arrays are stored: the head's manifest (JSON).

    ``{"chunk_bytes": n, "arrays": [{"name", "dtype", "size"}, ...]}``; array ``name`` is cut
    into ``ceil(nbytes / n)`` chunks, chunk ``i`` holding bytes ``[i*n, (i+1)*n)``.
    """
    if not isinstance(snap, ShardSnapshot):
        raise TypeError(f"expected a ShardSnapshot; got {type(snap).__name__}")
    if not isinstance(snap.run_id, str) or not snap.run_id:
        raise ValueError(f"run_id must be a non-empty string; got {snap.run_id!r}")
    check_member_id(snap.shard_id)
    for field in ("epoch", "version"):
        value = getattr(snap, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"snapshot {field} must be a non-negative int; got {value!r}")
    if not isinstance(snap.meta, dict):
        raise TypeError(f"snapshot meta must be a dict; got {type(snap.meta).__name__}")
    entries = []
    for name, a in snap.arrays.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"state array names must be non-empty strings; got {name!r}")
        if not isinstance(a, np.ndarray) or a.ndim != 1:
            shape = getattr(a, "shape", type(a).__name__)
            raise ValueError(f"state array {name!r} must be a 1-D numpy array; got {shape}")
        if a.dtype.hasobject or a.dtype.fields is not None:
            raise ValueError(f"state array {name!r} has dtype {a.dtype}, which is not plain data")
        entries.append({"name": name, "dtype": a.dtype.str, "size": int(a.size)})
    return {"chunk_bytes": chunk_bytes, "arrays": entries}


def state_chunks(snap: ShardSnapshot, chunk_bytes: int) -> Iterator[tuple[str, int, memoryview]]:
    """``(array name, chunk index, bytes)`` of every chunk, as views of the arrays (no copy for
    C-contiguous arrays). An empty array has no chunks."""
    for name, a in snap.arrays.items():
        raw = np.ascontiguousarray(a).view(np.uint8).data  # any byte order, no copy
        for idx, start in enumerate(range(0, len(raw), chunk_bytes)):
            yield name, idx, raw[start : start + chunk_bytes]


def assemble_state(
    layout: dict[str, Any], chunks: Iterable[tuple[str, int, bytes]], what: str
) -> dict[str, np.ndarray]:
    """Rebuild the arrays of ``layout`` from its chunks, in any order, into preallocated arrays.

    Raises :class:`TornState` unless every chunk is there exactly once with the expected size.
    """
    chunk_bytes = int(layout["chunk_bytes"])
    arrays: dict[str, np.ndarray] = {}
    views: dict[str, memoryview] = {}
    missing: dict[str, set[int]] = {}
    for entry in layout["arrays"]:
        out = np.empty(int(entry["size"]), dtype=np.dtype(entry["dtype"]))
        arrays[entry["name"]] = out
        views[entry["name"]] = out.view(np.uint8).data
        missing[entry["name"]] = set(range(-(-out.nbytes // chunk_bytes)))
    for name, idx, data in chunks:
        todo = missing.get(name)
        if todo is None or idx not in todo:
            raise TornState(f"{what}: unexpected or repeated chunk {idx} of array {name!r}")
        view = views[name]
        start = idx * chunk_bytes
        expected = min(chunk_bytes, len(view) - start)
        if len(data) != expected:
            raise TornState(
                f"{what}: chunk {idx} of array {name!r} has {len(data)} bytes, not {expected}"
            )
        view[start : start + expected] = data
        todo.discard(idx)
    gaps = {name: len(todo) for name, todo in missing.items() if todo}
    if gaps:
        raise TornState(f"{what}: chunks missing (array: count) {gaps}")
    return arrays


class ProcessLocal:
    """Base of store backends: an object owns connections that belong to one process.

    It cannot be pickled to another process (pass ``store.uri`` and call ``open_store`` there)
    and closes itself at the end of a ``with`` block.
    """

    def close(self) -> None:
        raise NotImplementedError

    def __getstate__(self) -> object:
        raise TypeError(
            f"a {type(self).__name__} cannot be sent to another process; pass store.uri and call "
            "open_store() there"
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@runtime_checkable
class Store(RunSecrets, Protocol):
    """Runs, membership, replicated shard state and results. Every method may also raise
    :class:`StoreUnavailable` (transient: the call may be retried; every write here is safe to
    repeat, though a retried ``register`` takes another epoch, and a retried ``create_run`` or
    ``delete_run`` may find the run it created or deleted)."""

    uri: str
    """A URI that reopens this same store from any process (for sqlite: an absolute path)."""

    def create_run(self, run_id: str, config: dict[str, Any]) -> None:
        """Create a run, and its first secret token (:mod:`tether.store.secrets`). Raises
        :class:`RunExists` if the id is taken."""
        ...

    def get_run(self, run_id: str) -> RunRecord:
        """Raises :class:`UnknownRun`."""
        ...

    def list_runs(self) -> list[RunRecord]:
        """All runs, newest first (by ``created_at``; ties newest-created first)."""
        ...

    def register(
        self, run_id: str, role: Role, member_id: int, *, address: str, pid: int, host: str
    ) -> int:
        """Atomically take the next epoch of ``(run, role, member_id)`` and return it.

        The member's record is replaced: ``state`` is ``"running"``, ``info`` is ``{}``,
        ``started_at`` and ``heartbeat`` are now. Raises :class:`UnknownRun`.
        """
        ...

    def heartbeat(
        self, run_id: str, role: Role, member_id: int, epoch: int, info: dict[str, Any]
    ) -> None:
        """Set the heartbeat time to now and shallow-merge ``info`` into the stored info.

        Top-level keys in ``info`` replace the stored ones; keys not mentioned are kept.
        Raises :class:`Fenced` (changing nothing) unless ``epoch`` is the stored epoch, and
        :class:`UnknownRun` if the run is missing.
        """
        ...

    def set_member_state(
        self, run_id: str, role: Role, member_id: int, epoch: int, state: str
    ) -> None:
        """Set the member's state (``running``/``exited``/``failed``); fenced like heartbeat."""
        ...

    def members(self, run_id: str, role: Role | None = None) -> list[Member]:
        """The run's members (of one role if given), sorted by ``(role, member_id)``.

        Raises :class:`UnknownRun`.
        """
        ...

    def member(self, run_id: str, role: Role, member_id: int) -> Member | None:
        """One member, or None if it never registered. Raises :class:`UnknownRun`."""
        ...

    def finish_run(self, run_id: str, summary: dict[str, Any]) -> None:
        """Mark the run finished and store its summary (a second call replaces the summary)."""
        ...

    # -- replicated shard state (DESIGN §5; see the module docstring) ---------------------------

    def claim_shard(self, run_id: str, shard_id: int, epoch: int) -> None:
        """Take ownership of the shard's state for ``epoch``; call it before loading.

        Atomically sets the head's owner epoch to ``epoch`` if the stored one is ``<= epoch``
        (creating the head if there is none), else raises :class:`Fenced` naming the owner.
        From then on every save by an older epoch raises :class:`Fenced`. Raises
        :class:`UnknownRun`.
        """
        ...

    def append_shard_log(
        self, run_id: str, shard_id: int, epoch: int, entries: Sequence[LogEntry]
    ) -> None:
        """Durably append ``entries`` (contiguous positions) to the shard's log, then advance
        the head's last position to theirs atomically.

        Only if the head's owner epoch is ``epoch`` (else :class:`Fenced`, nothing changes) and
        the first position is the stored last + 1 (else :class:`StoreError`). ValueError for a
        malformed batch (nothing is written). After :class:`StoreUnavailable` the append may or
        may not have happened; retrying the same batch is safe (a retry finding it applied by
        this epoch returns).
        """
        ...

    def save_shard_state(self, snap: ShardSnapshot) -> None:
        """Durably write a base state, then switch the head to it atomically.

        Only if the head's owner epoch is ``snap.epoch`` (else :class:`Fenced`, nothing
        changes) and ``snap.version`` is not below the head's base version (else
        :class:`StoreError`; an equal version rewrites). A base past the log's last position
        moves it up to ``snap.version``. Entries and bases older than the previous base are
        deleted after the switch. After
        :class:`StoreUnavailable` the save may or may not have happened; retrying the same
        snapshot is safe.
        """
        ...

    def load_shard_log(self, run_id: str, shard_id: int) -> ShardLog | None:
        """The base and the log after it (see :class:`ShardLog`), or None if the shard was never
        claimed. The arrays are new, writable, C-contiguous arrays. Raises :class:`UnknownRun`,
        and :class:`StoreError` if what the head names stays incomplete after a few re-reads.
        """
        ...

    def load_shard_state(self, run_id: str, shard_id: int) -> ShardSnapshot | None:
        """The base the head points at (never a torn one), or None if none was ever saved.

        The arrays are new, writable, C-contiguous arrays. Raises :class:`UnknownRun`, and
        :class:`StoreError` if the stored state stays incomplete after a few re-reads.
        """
        ...

    def shard_heads(self, run_id: str) -> dict[int, dict[str, Any]]:
        """Per claimed shard: ``owner_epoch``; ``last``, the log's last durable position (the
        shard version a recovery reaches, 0 before any append) and ``log_entries``, the entries
        after the base; and of the base ``epoch``, ``version``, ``saved_at`` (unix s) and
        ``nbytes`` -- None for the four until a base is saved."""
        ...

    # -- results: run metadata, metrics, artifacts (DESIGN §8) -------------------------------

    def set_run_meta(self, run_id: str, meta: dict[str, Any]) -> None:
        """Shallow-merge ``meta`` (JSON) into the run's ``meta``: its top-level keys replace the
        stored ones, others are kept. Top-level keys are non-empty strings with no ``.`` that do
        not start with ``$`` (they are field paths in MongoDB, so runs can be queried by them);
        else ValueError. Raises :class:`UnknownRun`."""
        ...

    def log_metrics(self, run_id: str, rows: Sequence[MetricRow]) -> None:
        """Store ``rows``; a row for a ``(source, step)`` already stored replaces it (a
        restarted worker redoing a step), and within a batch the last row of a step wins.

        One batch is one write (a transaction; a MongoDB bulk write). Every row is checked
        first: a bad one raises ValueError naming the row and the problem, and nothing of the
        batch is written. Values are stored as float64 and come back exactly; metric names are
        like the top-level keys of ``set_run_meta``. Raises :class:`UnknownRun`. On MongoDB a
        batch cut off by :class:`StoreUnavailable` may be partly written; repeating it is safe.
        """
        ...

    def metrics(self, run_id: str, source: str | None = None) -> list[MetricRow]:
        """The run's rows (of one source if given), sorted by ``(source, step)``.

        Raises :class:`UnknownRun`.
        """
        ...

    def put_artifact(self, run_id: str, name: str, data: bytes, content_type: str) -> None:
        """Store a file under the run, replacing an artifact of the same name.

        ``name`` is a relative path of ``[A-Za-z0-9._/-]`` with no empty, ``.`` or ``..``
        component; ``data`` is at most :data:`MAX_ARTIFACT_BYTES`; ``content_type`` is a MIME
        type. Else ValueError, and nothing is written. Raises :class:`UnknownRun`.
        """
        ...

    def artifacts(self, run_id: str) -> list[ArtifactInfo]:
        """The run's artifacts, sorted by name. Raises :class:`UnknownRun`."""
        ...

    def get_artifact(self, run_id: str, name: str) -> bytes:
        """An artifact's bytes. Raises :class:`ArtifactNotFound` or :class:`UnknownRun`."""
        ...

    def delete_run(self, run_id: str) -> None:
        """Remove the run and everything under it: members, shard heads and chunks, metrics,
        artifacts. Other runs are untouched. Meant for runs that have ended (a member still
        writing may leave rows behind on MongoDB). Raises :class:`UnknownRun` if there is no
        such run -- including on a retry after :class:`StoreUnavailable` that finds it gone."""
        ...

    # -- datasets: input data, store-wide (DESIGN §11; see the module docstring) --------------

    def put_dataset(
        self,
        name: str,
        fields: Sequence[FieldSpec],
        chunks: Iterable[DatasetChunk],
        *,
        source: str = "",
        replace: bool = False,
    ) -> DatasetInfo:
        """Store a dataset, all or nothing, and return its published header.

        ``chunks`` is consumed once, chunk by chunk (``tether.store.datasets.table_chunks``);
        each is checked by ``ChunkTally`` before it is written. Raises :class:`DatasetExists`
        (at the start and again at the publish) unless ``replace``; ValueError for a bad name,
        schema or chunk. On any error -- one raised by ``chunks`` itself included -- the chunks
        written are removed and nothing is published (a process killed mid-import leaves
        unpublished chunks that the next import of the name removes). ``created_at`` is the
        store's clock at the publish.
        """
        ...

    def dataset_info(self, name: str) -> DatasetInfo:
        """The published header. Raises :class:`UnknownDataset` (naming the ones there are)."""
        ...

    def list_datasets(self) -> list[DatasetInfo]:
        """Every published dataset's header, sorted by name."""
        ...

    def read_dataset_chunks(self, info: DatasetInfo, first: int, last: int) -> list[DatasetChunk]:
        """Chunks ``first`` to ``last - 1`` (``0 <= first <= last <= info.chunks``) of the import
        ``info`` describes, in order. Raises :class:`StoreError` if they are not all there (the
        dataset was replaced or deleted since ``info`` was read)."""
        ...

    def delete_dataset(self, name: str) -> None:
        """Remove the dataset and all its chunks. Raises :class:`UnknownDataset`."""
        ...

    def close(self) -> None:
        """Release the connection; idempotent. Later calls raise :class:`StoreError`."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc_info: object) -> None: ...


def check_role(role: str) -> Role:
    """Return ``role`` if it is a valid role, else raise ValueError naming the valid ones."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    return role  # type: ignore[return-value]


def check_member_id(member_id: int) -> int:
    if isinstance(member_id, bool) or not isinstance(member_id, int) or member_id < 0:
        raise ValueError(f"member_id must be a non-negative int; got {member_id!r}")
    return member_id


def check_state(state: str) -> str:
    if state not in MEMBER_STATES:
        raise ValueError(f"member state must be one of {', '.join(MEMBER_STATES)}; got {state!r}")
    return state


def redact_uri(uri: str) -> str:
    """Hide credentials (``scheme://user:password@host``) before a URI goes into a message."""
    return re.sub(r"://[^/@]*@", "://***@", uri)

"""The cluster store: a MongoDB replica set (DESIGN §6), behind the same :class:`Store` protocol.

``mongodb://h1,h2,h3/DBNAME?replicaSet=rs0`` (database ``tether`` when the path is empty).
Collections: ``runs``, ``members``, ``shard_heads``, ``shard_chunks``, and for results (DESIGN §8)
``metrics`` and ``artifacts`` (see :mod:`tether.store.mongo_results`); indexes are created
idempotently when a store is opened.

Defaults, each overridable from the URI's query string (pymongo parses it; a default is only
passed for an option the URI does not set):

- writes: ``w=majority`` (with ``wTimeoutMS=5000``), retryable writes on, so an acknowledged
  write survives the loss of the primary (DESIGN §5);
- reads: ``readConcernLevel=majority``; recovery reads (``load_shard_state`` and the reads that
  decide fencing) always go to the primary with the URI's read concern, or ``majority``;
- ``serverSelectionTimeoutMS=5000``, ``connectTimeoutMS=5000``, ``socketTimeoutMS=10000``
  (unless the URI sets ``timeoutMS``): a dead or partitioned cluster surfaces as
  :class:`StoreUnavailable` within seconds, not pymongo's 30 s.
- Reads for status and reports (``get_run``, ``list_runs``, ``members``, ``member``,
  ``shard_heads``) use the ``read_preference`` given to :class:`MongoStore`, else the URI's
  ``readPreference``, else the primary. **With a secondary read preference they may be stale**
  (a new run or a replacement's address can show up a moment later); workers that resolve shard
  addresses through ``members`` then retry, as they do after any failover.

Fencing never relies on a read: every member and shard-state write is one single-document
conditional update on the primary, so no multi-document transaction is needed (DESIGN §5).

Errors: network errors, ``NotPrimaryError``, timeouts (server selection, socket, ``maxTimeMS``)
and write-concern errors become :class:`StoreUnavailable` (retry the call: every write here is
safe to repeat); any other server error becomes :class:`StoreError`. Each message names the
operation and the pymongo error.

One ``MongoClient`` per store object, made in the constructor, never at import. A store must not
cross a fork (pymongo's sockets and threads do not survive it): children get ``store.uri``.

Starting a local replica set for development: ``tether mongo up`` (tether.devtools.replica_set).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NoReturn

from bson import ObjectId
from bson.errors import InvalidDocument
from pymongo import ASCENDING, DESCENDING, MongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError
from pymongo.read_concern import ReadConcern
from pymongo.read_preferences import Primary

from tether.store.base import (
    DEFAULT_STATE_CHUNK_BYTES,
    Fenced,
    Member,
    ProcessLocal,
    Role,
    RunExists,
    RunRecord,
    ShardSnapshot,
    StoreError,
    StoreUnavailable,
    TornState,
    UnknownRun,
    assemble_state,
    check_chunk_bytes,
    check_member_id,
    check_role,
    check_state,
    redact_uri,
    state_chunks,
    state_layout,
    version_regression,
)
from tether.store.faults import FaultPlan, translate_error
from tether.store.mongo_results import MongoResults
from tether.store.mongo_uri import (
    client_options,
    database_name,
    read_preference_of,
    uri_options,
)

log = logging.getLogger("tether.store.mongo")

# NamespaceExists, IndexBuildAlreadyInProgress: processes opening a new database at once race
# on creating its collections and indexes; the loser tries again.
_CREATE_RACE_CODES = frozenset({48, 276})
_CHUNK_KEY = ("run_id", "shard_id", "save_id", "name", "idx")
_INSERT_BATCH_CHUNKS = 8  # chunks per insert_many call (each call is one fault-seam point)
_LOAD_ATTEMPTS = 5


def _json_doc(value: Any, what: str) -> dict[str, Any]:
    """``value`` as it comes back from JSON (string keys, lists), like the SQLite backend."""
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict; got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value))  # type: ignore[no-any-return]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serializable: {e}") from e


def _path_safe(key: str) -> bool:
    return bool(key) and "." not in key and not key.startswith("$")


def _key(*parts: Any) -> str:
    return json.dumps(parts, separators=(",", ":"))


class MongoStore(ProcessLocal, MongoResults):
    """A :class:`tether.store.base.Store` on a MongoDB replica set (see the module docstring).

    ``client_factory`` makes the client instead of ``MongoClient(uri, **client_options(uri))``
    (tests pass ``lambda: mongomock.MongoClient()``); ``faults`` is a
    :class:`tether.store.faults.FaultPlan` consulted at named points of every operation;
    ``read_preference`` routes the status reads; ``clock`` gives the times written (client-side
    unix seconds, like SQLite: keep hosts' clocks in sync); shard state is stored in chunks of at
    most ``chunk_bytes``. Results (run meta, metrics, artifacts) are in
    :mod:`tether.store.mongo_results`.
    """

    def __init__(
        self,
        uri: str,
        *,
        client_factory: Callable[[], Any] | None = None,
        faults: FaultPlan | None = None,
        chunk_bytes: int = DEFAULT_STATE_CHUNK_BYTES,
        read_preference: str | Any | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.uri = uri  # credentials included: children need them; messages use _where
        self._where = redact_uri(uri)
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.faults = faults
        self._clock = clock
        self._pid = os.getpid()
        self._closed = False
        self._close_lock = threading.Lock()
        self.database_name = database_name(uri)
        options = uri_options(uri)
        kwargs = client_options(uri)
        status_rp = None if read_preference is None else read_preference_of(read_preference)
        self.client: Any  # a pymongo MongoClient, or what client_factory made (mongomock)
        try:
            self.client = client_factory() if client_factory else MongoClient(uri, **kwargs)
        except PyMongoError as e:  # a malformed URI or option
            raise StoreError(f"cannot open store {self._where}: {e}") from e
        db = self.client.get_database(self.database_name)
        self.db = db
        # Recovery reads: the primary, majority-committed data (unless the URI chose a level).
        recovery: dict[str, Any] = {
            "read_preference": Primary(),
            "read_concern": ReadConcern(options.get("readconcernlevel", "majority")),
        }
        status: dict[str, Any] = {} if status_rp is None else {"read_preference": status_rp}
        self._runs = db.get_collection("runs")
        self._members = db.get_collection("members")
        self._heads = db.get_collection("shard_heads")
        self._chunks = db.get_collection("shard_chunks")
        self._runs_primary = self._runs.with_options(**recovery)
        self._members_primary = self._members.with_options(**recovery)
        self._heads_primary = self._heads.with_options(**recovery)
        self._chunks_primary = self._chunks.with_options(**recovery)
        self._runs_status = self._runs.with_options(**status)
        self._members_status = self._members.with_options(**status)
        self._heads_status = self._heads.with_options(**status)
        results_indexes = self._open_results(db, status)
        try:
            with self._op("connect"):
                self._create_indexes(results_indexes)
        except BaseException:
            self.close()
            raise

    def _create_indexes(self, more: list[tuple[Any, Any, bool]]) -> None:
        """Idempotent; processes opening a new database at once may race on the builds."""
        indexes: list[tuple[Any, Any, bool]] = [
            (self._runs, [("created_at", DESCENDING), ("order", DESCENDING)], False),
            (
                self._members,
                [("run_id", ASCENDING), ("role", ASCENDING), ("member_id", ASCENDING)],
                False,
            ),
            (self._heads, [("run_id", ASCENDING), ("shard_id", ASCENDING)], False),
            (self._chunks, [(f, ASCENDING) for f in _CHUNK_KEY], True),
            *more,
        ]
        for collection, keys, unique in indexes:
            for attempt in range(20):
                try:
                    collection.create_index(keys, unique=unique)
                    break
                except OperationFailure as e:
                    if e.code not in _CREATE_RACE_CODES or attempt == 19:
                        raise
                    time.sleep(random.uniform(0.05, 0.15))  # another process is building it

    def __repr__(self) -> str:
        return f"MongoStore({self._where!r})"

    def close(self) -> None:
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self.client.close()

    # -- plumbing -----------------------------------------------------------------------------

    def _fault(self, point: str) -> None:
        if self.faults is not None:
            self.faults.check(point)

    @contextmanager
    def _op(self, name: str) -> Iterator[None]:
        """One store operation: refuse after close or fork, consult the fault seam, and
        translate pymongo errors (injected ones too) into the store's error vocabulary."""
        if self._closed:
            raise StoreError(f"store {self._where} is closed")
        if os.getpid() != self._pid:
            raise StoreError(
                f"store {self._where} was opened in process {self._pid} and cannot be used "
                "after a fork; call open_store(store.uri) in the child"
            )
        try:
            self._fault(name)
            yield
        except PyMongoError as e:
            raise translate_error(e, name, self._where) from e
        except (InvalidDocument, OverflowError) as e:  # bson cannot encode a value
            raise ValueError(f"store {self._where}: {name}: cannot store the value: {e}") from e

    def _require_run(self, run_id: str) -> None:
        if self._runs_primary.find_one({"_id": run_id}, {"_id": 1}) is None:
            raise UnknownRun(run_id, self._where)

    def _fenced_update(
        self, op: str, run_id: str, role: Role, member_id: int, epoch: int, update: dict[str, Any]
    ) -> None:
        """Apply ``update`` to the member only if its stored epoch is ``epoch`` (DESIGN §5)."""
        key = _key(run_id, role, member_id)
        with self._op(op):
            if self._members.update_one({"_id": key, "epoch": epoch}, update).matched_count:
                return
            self._raise_fenced(run_id, role, member_id, epoch)

    def _raise_fenced(self, run_id: str, role: Role, member_id: int, epoch: int) -> NoReturn:
        doc = self._members_primary.find_one({"_id": _key(run_id, role, member_id)}, {"epoch": 1})
        if doc is None:
            self._require_run(run_id)
        raise Fenced(run_id, role, member_id, epoch, None if doc is None else doc["epoch"])

    # -- runs ---------------------------------------------------------------------------------

    def create_run(self, run_id: str, config: dict[str, Any]) -> None:
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id must be a non-empty string; got {run_id!r}")
        doc = {
            "_id": run_id,
            "config": _json_doc(config, "run config"),
            "created_at": self._clock(),
            "order": ObjectId(),  # breaks created_at ties: newest created first
            "finished": False,
            "summary": None,
            "meta": {},
        }
        with self._op("create_run"):
            try:
                self._runs.insert_one(doc)
            except DuplicateKeyError:
                raise RunExists(run_id, self._where) from None

    def get_run(self, run_id: str) -> RunRecord:
        with self._op("get_run"):
            doc = self._runs_status.find_one({"_id": run_id})
        if doc is None:
            raise UnknownRun(run_id, self._where)
        return _run_record(doc)

    def list_runs(self) -> list[RunRecord]:
        with self._op("list_runs"):
            docs = list(
                self._runs_status.find().sort([("created_at", DESCENDING), ("order", DESCENDING)])
            )
        return [_run_record(d) for d in docs]

    def finish_run(self, run_id: str, summary: dict[str, Any]) -> None:
        doc = _json_doc(summary, "run summary")
        with self._op("finish_run"):
            update = {"$set": {"finished": True, "summary": doc}}
            if self._runs.update_one({"_id": run_id}, update).matched_count == 0:
                raise UnknownRun(run_id, self._where)

    # -- members ------------------------------------------------------------------------------

    def register(
        self, run_id: str, role: Role, member_id: int, *, address: str, pid: int, host: str
    ) -> int:
        check_role(role)
        check_member_id(member_id)
        key = _key(run_id, role, member_id)
        with self._op("register"):
            self._require_run(run_id)
            for _attempt in range(3):
                now = self._clock()
                fields = {
                    "run_id": run_id,
                    "role": role,
                    "member_id": member_id,
                    "address": address,
                    "pid": pid,
                    "host": host,
                    "started_at": now,
                    "heartbeat": now,
                    "state": "running",
                    "info": {},
                }
                try:
                    # One atomic read-modify-write: two registrations never share an epoch.
                    doc = self._members.find_one_and_update(
                        {"_id": key},
                        {"$inc": {"epoch": 1, "rev": 1}, "$set": fields},
                        projection={"epoch": 1},
                        upsert=True,
                        return_document=ReturnDocument.AFTER,
                    )
                except DuplicateKeyError:
                    continue  # two first registrations raced on the upsert; the loser retries
                return int(doc["epoch"])
        raise StoreError(f"store {self._where}: register of {role} {member_id} kept colliding")

    def heartbeat(
        self, run_id: str, role: Role, member_id: int, epoch: int, info: dict[str, Any]
    ) -> None:
        doc = _json_doc(info, "heartbeat info")
        if all(_path_safe(k) for k in doc):
            fields = {f"info.{k}": v for k, v in doc.items()}
            update = {"$set": {"heartbeat": self._clock(), **fields}, "$inc": {"rev": 1}}
            self._fenced_update("heartbeat", run_id, role, member_id, epoch, update)
            return
        # Keys that are not field paths ("a.b", "$x"): merge in Python, compare-and-set on rev.
        key = _key(run_id, role, member_id)
        with self._op("heartbeat"):
            for _attempt in range(100):
                stored = self._members_primary.find_one({"_id": key})
                if stored is None or stored["epoch"] != epoch:
                    self._raise_fenced(run_id, role, member_id, epoch)
                new = {**stored, "info": {**stored["info"], **doc}, "heartbeat": self._clock()}
                new["rev"] = stored.get("rev", 0) + 1
                filt = {"_id": key, "epoch": epoch, "rev": stored.get("rev", 0)}
                if self._members.replace_one(filt, new).matched_count:
                    return
        raise StoreUnavailable(f"store {self._where}: heartbeat of {role} {member_id} contended")

    def set_member_state(
        self, run_id: str, role: Role, member_id: int, epoch: int, state: str
    ) -> None:
        check_state(state)
        update = {"$set": {"state": state}, "$inc": {"rev": 1}}
        self._fenced_update("set_member_state", run_id, role, member_id, epoch, update)

    def members(self, run_id: str, role: Role | None = None) -> list[Member]:
        query: dict[str, Any] = {"run_id": run_id}
        if role is not None:
            query["role"] = check_role(role)
        with self._op("members"):
            docs = list(
                self._members_status.find(query).sort(
                    [("role", ASCENDING), ("member_id", ASCENDING)]
                )
            )
            if not docs and self._runs_status.find_one({"_id": run_id}, {"_id": 1}) is None:
                raise UnknownRun(run_id, self._where)
        return [_member(d) for d in docs]

    def member(self, run_id: str, role: Role, member_id: int) -> Member | None:
        check_role(role)
        with self._op("member"):
            doc = self._members_status.find_one({"_id": _key(run_id, role, member_id)})
            if doc is None and self._runs_status.find_one({"_id": run_id}, {"_id": 1}) is None:
                raise UnknownRun(run_id, self._where)
        return None if doc is None else _member(doc)

    # -- replicated shard state (DESIGN §5) -----------------------------------------------------
    #
    # Chunks are written first, under a fresh save id (never over the chunks the head points
    # at), then the head is switched by one conditional single-document update. A failure at
    # any point before the switch leaves the old head and its chunks as they were; the orphans
    # are deleted by the next successful save of this shard.

    def claim_shard(self, run_id: str, shard_id: int, epoch: int) -> None:
        check_member_id(shard_id)
        key = _key(run_id, shard_id)
        with self._op("claim"):
            self._require_run(run_id)
            empty = {"run_id": run_id, "shard_id": shard_id, "epoch": None, "version": None}
            empty |= {"save_id": None, "layout": None, "meta": None, "nbytes": None}
            try:
                # Matches only if no newer epoch owns the head; else the upsert collides on _id.
                self._heads.update_one(
                    {"_id": key, "owner_epoch": {"$lte": epoch}},
                    {"$set": {"owner_epoch": epoch}, "$setOnInsert": empty | {"saved_at": None}},
                    upsert=True,
                )
            except DuplicateKeyError:
                head = self._heads_primary.find_one({"_id": key}, {"owner_epoch": 1})
                owner = None if head is None else head["owner_epoch"]
                raise Fenced(run_id, "server", shard_id, epoch, owner) from None

    def save_shard_state(self, snap: ShardSnapshot) -> None:
        layout = state_layout(snap, self.chunk_bytes)
        meta = json.dumps(_json_doc(snap.meta, "shard state meta"))
        key = _key(snap.run_id, snap.shard_id)
        save_id = ObjectId()
        common = {"run_id": snap.run_id, "shard_id": snap.shard_id, "save_id": save_id}
        with self._op("save"):
            self._fault("before_chunks")
            batch: list[dict[str, Any]] = []
            for name, idx, data in state_chunks(snap, self.chunk_bytes):
                doc = {**common, "epoch": snap.epoch, "version": snap.version, "name": name}
                doc["idx"] = idx
                doc["data"] = bytes(data)  # the one copy: bson cannot encode a memoryview
                batch.append(doc)
                if len(batch) == _INSERT_BATCH_CHUNKS:
                    self._insert_chunks(batch)
                    batch = []
            if batch:
                self._insert_chunks(batch)
            self._fault("after_chunks")
            self._fault("before_head")
            head = {"epoch": snap.epoch, "version": snap.version, "save_id": save_id}
            head |= {"layout": layout, "meta": meta, "nbytes": snap.nbytes}
            head["saved_at"] = self._clock()
            before = self._heads.find_one_and_update(
                {
                    "_id": key,
                    "owner_epoch": snap.epoch,
                    "$or": [{"version": None}, {"version": {"$lte": snap.version}}],
                },
                {"$set": head},
                projection={"save_id": 1},
                return_document=ReturnDocument.BEFORE,
            )
            if before is None:
                self._discard(save_id, common)
                self._raise_save_refused(snap, key)
            self._fault("after_head")
        # Keep the new state and the previous one (a reader may still follow the old head).
        # Chunks of newer epochs are never touched: they may be a successor's save in flight.
        assert before is not None
        keep = [save_id] if before.get("save_id") is None else [save_id, before["save_id"]]
        gc = {"run_id": snap.run_id, "shard_id": snap.shard_id, "epoch": {"$lte": snap.epoch}}
        try:
            with self._op("gc"):
                self._chunks.delete_many(gc | {"save_id": {"$nin": keep}})
        except StoreError as e:  # the new state is durable; the next save collects again
            log.warning("old chunks of shard %d were not deleted: %s", snap.shard_id, e)

    def _insert_chunks(self, batch: list[dict[str, Any]]) -> None:
        self._fault("chunks")
        self._chunks.insert_many(batch, ordered=True)

    def _discard(self, save_id: ObjectId, common: dict[str, Any]) -> None:
        try:
            self._chunks.delete_many(common | {"save_id": save_id})
        except PyMongoError as e:  # orphans; the owner's next save deletes them
            log.warning("chunks of a refused save were not deleted: %s", e)

    def _raise_save_refused(self, snap: ShardSnapshot, key: str) -> NoReturn:
        head = self._heads_primary.find_one({"_id": key}, {"owner_epoch": 1, "version": 1})
        if head is None:
            self._require_run(snap.run_id)
        if head is None or head["owner_epoch"] != snap.epoch:
            owner = None if head is None else head["owner_epoch"]
            raise Fenced(snap.run_id, "server", snap.shard_id, snap.epoch, owner)
        if head["version"] is not None and head["version"] > snap.version:
            raise version_regression(snap, head["version"])
        raise StoreUnavailable(  # the head changed between the switch and this read: retry
            f"store {self._where}: the head of shard {snap.shard_id} changed during the save"
        )

    def load_shard_state(self, run_id: str, shard_id: int) -> ShardSnapshot | None:
        key = _key(run_id, shard_id)
        what = f"store {self._where}: state of shard {shard_id} of run {run_id!r}"
        torn: TornState | None = None
        torn_save = None
        for _attempt in range(_LOAD_ATTEMPTS):
            with self._op("load"):
                self._fault("read")
                head = self._heads_primary.find_one({"_id": key})
                if head is None or head["save_id"] is None:
                    self._require_run(run_id)
                    return None
                if torn is not None and head["save_id"] == torn_save:
                    raise torn  # the head did not move: the store lost chunks
                self._fault("read_chunks")
                docs = self._chunks_primary.find(
                    {"run_id": run_id, "shard_id": shard_id, "save_id": head["save_id"]},
                    {"_id": 0, "name": 1, "idx": 1, "data": 1},
                )
                try:
                    arrays = assemble_state(
                        head["layout"], ((d["name"], d["idx"], d["data"]) for d in docs), what
                    )
                except TornState as e:  # the head moved on and its chunks were collected
                    torn, torn_save = e, head["save_id"]
                    continue
            meta = json.loads(head["meta"])
            return ShardSnapshot(run_id, shard_id, head["epoch"], head["version"], meta, arrays)
        assert torn is not None
        raise torn

    def shard_heads(self, run_id: str) -> dict[int, dict[str, Any]]:
        fields = ("owner_epoch", "epoch", "version", "saved_at", "nbytes")
        with self._op("shard_heads"):
            docs = list(
                self._heads_status.find(
                    {"run_id": run_id}, {"shard_id": 1, **dict.fromkeys(fields, 1)}
                )
            )
            if not docs and self._runs_status.find_one({"_id": run_id}, {"_id": 1}) is None:
                raise UnknownRun(run_id, self._where)
        return {d["shard_id"]: {f: d.get(f) for f in fields} for d in sorted(docs, key=_shard)}


def _shard(doc: Mapping[str, Any]) -> int:
    return int(doc["shard_id"])


def _run_record(doc: Mapping[str, Any]) -> RunRecord:
    return RunRecord(
        run_id=doc["_id"],
        config=doc["config"],
        created_at=doc["created_at"],
        finished=bool(doc["finished"]),
        summary=doc.get("summary"),
        meta=doc.get("meta") or {},  # runs written before set_run_meta existed have none
    )


def _member(doc: Mapping[str, Any]) -> Member:
    return Member(
        run_id=doc["run_id"],
        role=doc["role"],
        member_id=doc["member_id"],
        epoch=doc["epoch"],
        address=doc["address"],
        pid=doc["pid"],
        host=doc["host"],
        started_at=doc["started_at"],
        heartbeat=doc["heartbeat"],
        state=doc["state"],
        info=doc["info"],
    )

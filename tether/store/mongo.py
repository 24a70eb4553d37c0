"""The cluster store: a MongoDB replica set (DESIGN §6), behind the same :class:`Store` protocol.

``mongodb://h1,h2,h3/DBNAME?replicaSet=rs0`` (database ``tether`` when the path is empty).
Collections: ``runs``, ``members``, ``shard_heads``, ``shard_chunks`` (see
:mod:`tether.store.mongo_state`), for results (DESIGN §8) ``metrics`` and ``artifacts`` (see
:mod:`tether.store.mongo_results`), and for datasets (DESIGN §11) ``datasets`` (one header per
published dataset, ``_id`` its name) and ``dataset_chunks`` (one document per chunk: its
buffers as an array of binaries, keyed by name, import id and index); indexes are created
idempotently when a store is opened (:mod:`tether.store.mongo_setup`).

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

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from bson import ObjectId
from bson.errors import InvalidDocument
from pymongo import ASCENDING, DESCENDING, MongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from tether.store.base import (
    DEFAULT_STATE_CHUNK_BYTES,
    DatasetExists,
    Member,
    ProcessLocal,
    Role,
    RunExists,
    RunRecord,
    StoreError,
    StoreUnavailable,
    UnknownDataset,
    UnknownRun,
    check_chunk_bytes,
    check_member_id,
    check_role,
    check_state,
    redact_uri,
)
from tether.store.datasets import (
    ChunkTally,
    DatasetChunk,
    DatasetInfo,
    FieldSpec,
    check_chunk_range,
    check_dataset_name,
    header_from_stored,
    new_import_id,
    stored_header,
    torn_read,
)
from tether.store.mongo_errors import translate_error
from tether.store.mongo_results import MongoResults
from tether.store.mongo_secrets import MongoSecrets
from tether.store.mongo_setup import (
    create_indexes,
    doc_id,
    json_doc,
    recovery_options,
    retry_upsert,
    store_indexes,
)
from tether.store.mongo_state import MongoShardState
from tether.store.mongo_uri import (
    client_options,
    database_name,
    pymongo_uri,
    read_preference_of,
    uri_options,
)
from tether.store.rules import member_write_refusal
from tether.store.secrets import first_token

if TYPE_CHECKING:
    from tether.store.testing import FaultPlan


# An import inserts its chunks in batches of at most this many bytes (pymongo splits a batch
# into messages of at most 48 MB itself; this bounds what one failed call leaves to redo).
_DATASET_BATCH_BYTES = 16 << 20


def _path_safe(key: str) -> bool:
    return bool(key) and "." not in key and not key.startswith("$")


class MongoStore(ProcessLocal, MongoShardState, MongoResults, MongoSecrets):
    """A :class:`tether.store.base.Store` on a MongoDB replica set (see the module docstring).

    ``client_factory`` makes the client instead of ``MongoClient(uri, **client_options(uri))``
    (tests pass ``lambda: mongomock.MongoClient()``); ``faults`` is a
    :class:`tether.store.testing.FaultPlan` consulted at named points of every operation;
    ``read_preference`` routes the status reads; ``clock`` gives the times written (client-side
    unix seconds, like SQLite: keep hosts' clocks in sync); shard state is stored in chunks of at
    most ``chunk_bytes`` (:mod:`tether.store.mongo_state`). Results (run meta, metrics,
    artifacts) are in :mod:`tether.store.mongo_results`.
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
            self.client = (
                client_factory() if client_factory else MongoClient(pymongo_uri(uri), **kwargs)
            )
        except PyMongoError as e:  # a malformed URI or option
            raise StoreError(f"cannot open store {self._where}: {e}") from e
        db = self.client.get_database(self.database_name)
        self.db = db
        recovery = recovery_options(options)
        status: dict[str, Any] = {} if status_rp is None else {"read_preference": status_rp}
        self._runs = db.get_collection("runs")
        self._members = db.get_collection("members")
        self._heads = db.get_collection("shard_heads")
        self._chunks = db.get_collection("shard_chunks")
        self._runs_primary = self._runs.with_options(**recovery)
        self._members_primary = self._members.with_options(**recovery)
        self._heads_primary = self._heads.with_options(**recovery)
        self._chunks_primary = self._chunks.with_options(**recovery)
        self._log = db.get_collection("shard_log")
        self._log_primary = self._log.with_options(**recovery)
        self._runs_status = self._runs.with_options(**status)
        self._members_status = self._members.with_options(**status)
        self._heads_status = self._heads.with_options(**status)
        results_indexes = self._open_results(db, status)
        self._open_secrets(db, recovery)
        indexes = store_indexes(self._runs, self._members, self._heads, self._chunks)
        log_key = [("run_id", ASCENDING), ("shard_id", ASCENDING), ("position", ASCENDING)]
        indexes.append((self._log, log_key, False))
        # Datasets (DESIGN §11): read from the primary with the recovery read concern, so the
        # chunks a header names are visible wherever the header was.
        self._datasets = db.get_collection("datasets")
        self._dataset_chunks = db.get_collection("dataset_chunks")
        self._datasets_primary = self._datasets.with_options(**recovery)
        self._dataset_chunks_primary = self._dataset_chunks.with_options(**recovery)
        chunk_key = [("name", ASCENDING), ("import_id", ASCENDING), ("idx", ASCENDING)]
        indexes.append((self._dataset_chunks, chunk_key, True))
        try:
            with self._op("connect"):
                create_indexes([*indexes, *results_indexes])
        except BaseException:
            self.close()
            raise

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
        key = doc_id(run_id, role, member_id)
        with self._op(op):
            # The filter is rules.member_write_refusal as a query: one atomic conditional write.
            if self._members.update_one({"_id": key, "epoch": epoch}, update).matched_count:
                return
            doc = self._members_primary.find_one({"_id": key}, {"epoch": 1})
            self._refuse_member_write(run_id, role, member_id, epoch, doc)
            raise StoreUnavailable(  # the epoch is the writer's again (a re-created run): retry
                f"store {self._where}: the epoch of {role} {member_id} changed during the {op}"
            )

    def _refuse_member_write(
        self, run_id: str, role: Role, member_id: int, epoch: int, doc: Mapping[str, Any] | None
    ) -> None:
        """Raise what the rule makes of the stored member ``doc`` (UnknownRun first), if any."""
        if doc is None:
            self._require_run(run_id)
        stored = None if doc is None else doc["epoch"]
        refusal = member_write_refusal(run_id, role, member_id, epoch, stored)
        if refusal is not None:
            raise refusal

    # -- runs ---------------------------------------------------------------------------------

    def create_run(self, run_id: str, config: dict[str, Any]) -> None:
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id must be a non-empty string; got {run_id!r}")
        now = self._clock()
        doc = {
            "_id": run_id,
            "config": json_doc(config, "run config"),
            "created_at": now,
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
            self._insert_run_tokens(run_id, first_token(now))

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
        doc = json_doc(summary, "run summary")
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
        key = doc_id(run_id, role, member_id)

        def upsert() -> int:
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
            # One atomic read-modify-write, so two registrations never share an epoch; the $inc
            # is rules.next_epoch (a missing epoch counts as 0).
            doc = self._members.find_one_and_update(
                {"_id": key},
                {"$inc": {"epoch": 1, "rev": 1}, "$set": fields},
                projection={"epoch": 1},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
            return int(doc["epoch"])

        with self._op("register"):
            self._require_run(run_id)
            try:
                # Two first registrations race on the upsert; the loser tries again at once.
                return retry_upsert(upsert)
            except DuplicateKeyError:
                raise StoreError(
                    f"store {self._where}: register of {role} {member_id} kept colliding"
                ) from None

    def heartbeat(
        self, run_id: str, role: Role, member_id: int, epoch: int, info: dict[str, Any]
    ) -> None:
        doc = json_doc(info, "heartbeat info")
        if all(_path_safe(k) for k in doc):
            fields = {f"info.{k}": v for k, v in doc.items()}
            update = {"$set": {"heartbeat": self._clock(), **fields}, "$inc": {"rev": 1}}
            self._fenced_update("heartbeat", run_id, role, member_id, epoch, update)
            return
        # Keys that are not field paths ("a.b", "$x"): merge in Python, compare-and-set on rev.
        key = doc_id(run_id, role, member_id)
        with self._op("heartbeat"):
            for _attempt in range(100):
                stored = self._members_primary.find_one({"_id": key})
                self._refuse_member_write(run_id, role, member_id, epoch, stored)
                assert stored is not None  # else refused
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
            doc = self._members_status.find_one({"_id": doc_id(run_id, role, member_id)})
            if doc is None and self._runs_status.find_one({"_id": run_id}, {"_id": 1}) is None:
                raise UnknownRun(run_id, self._where)
        return None if doc is None else _member(doc)

    # -- datasets (DESIGN §11) ------------------------------------------------------------------
    #
    # The chunks go in under a fresh import id that no header points at, then the header in one
    # single-document write: an insert that collides on the name unless replacing. Only then
    # are the chunks of every other import of the name deleted. A failure before the header
    # removes this import's chunks -- unless the header may have been written (a lost reply),
    # which is checked first, so a published dataset never loses its chunks.

    def put_dataset(
        self,
        name: str,
        fields: Sequence[FieldSpec],
        chunks: Iterable[DatasetChunk],
        *,
        source: str = "",
        replace: bool = False,
    ) -> DatasetInfo:
        tally = ChunkTally(name, fields)
        if not replace:
            with self._op("put_dataset"):
                if self._datasets_primary.find_one({"_id": name}, {"_id": 1}) is not None:
                    raise DatasetExists(name, self._where)
        import_id = new_import_id()
        try:
            batch: list[dict[str, Any]] = []
            size = 0
            for chunk in chunks:
                tally.add(chunk)
                batch.append(
                    {
                        "_id": doc_id(name, import_id, chunk.index),
                        "name": name,
                        "import_id": import_id,
                        "idx": chunk.index,
                        "first": chunk.first,
                        "count": chunk.count,
                        "buffers": list(chunk.buffers),
                    }
                )
                size += chunk.nbytes
                if size >= _DATASET_BATCH_BYTES:
                    self._insert_dataset_chunks(batch)
                    batch, size = [], 0
            self._insert_dataset_chunks(batch)
            with self._op("put_dataset"):
                info = tally.info(created_at=self._clock(), source=source, import_id=import_id)
                query = {"name": name, "import_id": import_id}
                stored = self._dataset_chunks_primary.count_documents(query)
                if stored != info.chunks:
                    raise StoreError(
                        f"store {self._where}: {info.chunks - stored} chunks of the import of "
                        f"dataset {name!r} went missing (deleted by another process?)"
                    )
                header = {"_id": name, **stored_header(info)}
                if replace:
                    self._datasets.replace_one({"_id": name}, header, upsert=True)
                else:
                    try:
                        self._datasets.insert_one(header)
                    except DuplicateKeyError:
                        raise DatasetExists(name, self._where) from None
        except BaseException:
            self._discard_import(name, import_id)
            raise
        try:  # published: what is left is garbage collection, which the next import repeats
            with self._op("put_dataset"):
                self._dataset_chunks.delete_many({"name": name, "import_id": {"$ne": import_id}})
        except StoreError:
            pass
        return info

    def _insert_dataset_chunks(self, docs: list[dict[str, Any]]) -> None:
        if docs:
            with self._op("put_dataset"):
                self._dataset_chunks.insert_many(docs, ordered=True)

    def _discard_import(self, name: str, import_id: str) -> None:
        """Remove an unpublished import's chunks, if it is certainly unpublished."""
        try:
            with self._op("put_dataset"):
                published = {"_id": name, "import_id": import_id}
                if self._datasets_primary.find_one(published, {"_id": 1}) is None:
                    self._dataset_chunks.delete_many({"name": name, "import_id": import_id})
        except StoreError:
            pass  # the next import of the name deletes them

    def _unknown_dataset(self, name: str) -> UnknownDataset:
        names = [d["_id"] for d in self._datasets_primary.find({}, {"_id": 1}).sort("_id")]
        return UnknownDataset(name, self._where, names)

    def dataset_info(self, name: str) -> DatasetInfo:
        check_dataset_name(name)
        with self._op("dataset_info"):
            doc = self._datasets_primary.find_one({"_id": name})
            if doc is None:
                raise self._unknown_dataset(name)
        return header_from_stored(doc)

    def list_datasets(self) -> list[DatasetInfo]:
        with self._op("list_datasets"):
            docs = list(self._datasets_primary.find().sort("_id", ASCENDING))
        return [header_from_stored(d) for d in docs]

    def read_dataset_chunks(self, info: DatasetInfo, first: int, last: int) -> list[DatasetChunk]:
        check_chunk_range(info, first, last)
        query: dict[str, Any] = {"name": info.name, "import_id": info.import_id}
        query["idx"] = {"$gte": first, "$lt": last}
        with self._op("read_dataset"):
            docs = list(self._dataset_chunks_primary.find(query).sort("idx", ASCENDING))
        chunks = [
            DatasetChunk(d["idx"], d["first"], d["count"], tuple(bytes(b) for b in d["buffers"]))
            for d in docs
        ]
        torn = torn_read(info, first, last, chunks)
        if torn is not None:
            raise StoreError(f"store {self._where}: {torn}")
        return chunks

    def delete_dataset(self, name: str) -> None:
        check_dataset_name(name)
        with self._op("delete_dataset"):
            if self._datasets_primary.find_one({"_id": name}, {"_id": 1}) is None:
                raise self._unknown_dataset(name)
            # The chunks first, the header last: a delete cut off midway leaves the header, so
            # repeating the call finishes it (a reader meanwhile gets a clear error).
            self._dataset_chunks.delete_many({"name": name})
            self._datasets.delete_one({"_id": name})


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

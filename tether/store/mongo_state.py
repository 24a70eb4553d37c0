"""The replicated-shard-state half of the MongoDB store: claim, log appends, bases, loads
(DESIGN §5, §6).

:class:`MongoShardState` is a base of :class:`tether.store.mongo.MongoStore` and uses its plumbing
(``_op``, ``_fault``, ``_require_run``). Collections: ``shard_heads``, one document per
``(run, shard)``; ``shard_log``, one document per log entry, ``_id`` its (run, shard, position,
epoch); and ``shard_chunks``, the bytes of bases (``kind`` "base", under a save id) and of log
entries (``kind`` "log", under ``log-<position>-e<epoch>``), each at most ``chunk_bytes``.

A log append reads the head (a zombie that is already fenced writes nothing), writes the
entries' chunks and documents -- keyed by epoch and position, so never over another writer's,
and idempotent when retried (a duplicate key is the same bytes written before) -- and then
advances the head with one conditional update: owner epoch, last position and the epoch of the
last entry must be what was read (:func:`tether.store.rules.append_refusal` as a query). Each
entry names the epoch of the entry before it, so a reader follows the chain back from the head's
``last_epoch`` and never reads a zombie's refused entry at the same position. Every write is
``w=majority``; a retried append whose head update was applied (its reply lost) finds the head
at its last position under its own epoch and returns.

Chunks are written first, under a fresh save id (never over the chunks the head points at), then
the head is switched by one conditional single-document update: :func:`tether.store.rules.
save_refusal` stated as a query. A failure at any point before the switch leaves the old head and
its chunks as they were; the orphans are deleted by the next successful save of this shard.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NoReturn

from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from tether.store.base import (
    LogEntry,
    ShardLog,
    ShardSnapshot,
    StoreError,
    StoreUnavailable,
    TornState,
    UnknownRun,
    assemble_state,
    check_log_entries,
    check_member_id,
    log_order_error,
    state_chunks,
    state_layout,
)
from tether.store.mongo_setup import doc_id, json_doc, retry_upsert
from tether.store.rules import append_refusal, claim_refusal, save_refusal

log = logging.getLogger("tether.store.mongo")

_INSERT_BATCH_CHUNKS = 8  # chunks per insert_many call (each call is one fault-seam point)
_LOAD_ATTEMPTS = 5


class MongoShardState:
    """Shard heads and chunks on MongoDB (see the module docstring); the contracts are those of
    :class:`tether.store.base.Store`."""

    # Set up by MongoStore.__init__.
    _where: str
    _clock: Callable[[], float]
    chunk_bytes: int
    _runs_status: Any
    _heads: Any
    _heads_primary: Any
    _heads_status: Any
    _chunks: Any
    _chunks_primary: Any
    _log: Any
    _log_primary: Any

    if TYPE_CHECKING:

        def _op(self, name: str) -> AbstractContextManager[None]: ...

        def _fault(self, point: str) -> None: ...

        def _require_run(self, run_id: str) -> None: ...

    def claim_shard(self, run_id: str, shard_id: int, epoch: int) -> None:
        check_member_id(shard_id)
        key = doc_id(run_id, shard_id)
        empty = {"run_id": run_id, "shard_id": shard_id, "epoch": None, "version": None}
        empty |= {"save_id": None, "layout": None, "meta": None, "nbytes": None}
        empty |= {"last": 0, "last_epoch": None}

        def upsert() -> None:
            try:
                # Matches only if no newer epoch owns the head (rules.claim_refusal as a query);
                # else the upsert collides on _id.
                self._heads.update_one(
                    {"_id": key, "owner_epoch": {"$lte": epoch}},
                    {"$set": {"owner_epoch": epoch}, "$setOnInsert": empty | {"saved_at": None}},
                    upsert=True,
                )
            except DuplicateKeyError:
                head = self._heads_primary.find_one({"_id": key}, {"owner_epoch": 1})
                owner = None if head is None else head["owner_epoch"]
                refusal = claim_refusal(run_id, shard_id, epoch, owner)
                if refusal is not None:
                    raise refusal from None
                raise  # an older epoch's first claim won the race to create the head: again

        with self._op("claim"):
            self._require_run(run_id)
            retry_upsert(upsert)

    def save_shard_state(self, snap: ShardSnapshot) -> None:
        layout = state_layout(snap, self.chunk_bytes)
        meta = json.dumps(json_doc(snap.meta, "shard state meta"))
        key = doc_id(snap.run_id, snap.shard_id)
        save_id = ObjectId()
        common = {"run_id": snap.run_id, "shard_id": snap.shard_id, "save_id": save_id}
        common["kind"] = "base"
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
            # rules.base_refusal as a query: the switch is one atomic conditional write.
            before = self._heads.find_one_and_update(
                {
                    "_id": key,
                    "owner_epoch": snap.epoch,
                    "$or": [{"version": None}, {"version": {"$lte": snap.version}}],
                },
                {"$set": head, "$max": {"last": snap.version}},
                projection={"save_id": 1, "version": 1},
                return_document=ReturnDocument.BEFORE,
            )
            if before is None:
                self._discard(save_id, common)
                self._raise_save_refused(snap, key)
            self._fault("after_head")
        # Keep the new base and the previous one, and the entries after the previous one (a
        # reader may still follow the old head). Bases of newer epochs are never touched: they
        # may be a successor's save in flight; entries at or below the previous base are
        # nobody's any more, whoever wrote them.
        assert before is not None
        keep = [save_id] if before.get("save_id") is None else [save_id, before["save_id"]]
        cutoff = before.get("version") or 0
        shard = {"run_id": snap.run_id, "shard_id": snap.shard_id}
        gc = shard | {"epoch": {"$lte": snap.epoch}, "kind": {"$ne": "log"}}
        try:
            with self._op("gc"):
                self._chunks.delete_many(gc | {"save_id": {"$nin": keep}})
                self._chunks.delete_many(shard | {"kind": "log", "version": {"$lte": cutoff}})
                self._log.delete_many(shard | {"position": {"$lte": cutoff}})
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
        owner, version = (None, None) if head is None else (head["owner_epoch"], head["version"])
        refusal = save_refusal(snap, owner, version)
        if refusal is not None:
            raise refusal
        raise StoreUnavailable(  # the head changed between the switch and this read: retry
            f"store {self._where}: the head of shard {snap.shard_id} changed during the save"
        )

    def append_shard_log(
        self, run_id: str, shard_id: int, epoch: int, entries: Sequence[LogEntry]
    ) -> None:
        metas = check_log_entries(run_id, shard_id, epoch, entries)
        key = doc_id(run_id, shard_id)
        first, last = entries[0].position, entries[-1].position
        shard = {"run_id": run_id, "shard_id": shard_id}
        with self._op("append"):
            head = self._heads_primary.find_one(
                {"_id": key}, {"owner_epoch": 1, "last": 1, "last_epoch": 1}
            )
            if head is None:
                self._require_run(run_id)
            owner = None if head is None else head["owner_epoch"]
            head_last = 0 if head is None else head.get("last", 0)
            if refusal := append_refusal(run_id, shard_id, epoch, first, owner, head_last):
                raise refusal  # an unclaimed shard (no head) is refused here too
            assert head is not None
            head_epoch = head.get("last_epoch")
            todo = [e for e in entries if e.position > head_last]
            if len(todo) < len(entries):  # a retry: skip what this epoch already appended
                repeated = {"$gte": first, "$lte": min(last, head_last)}
                stored = self._log_primary.count_documents(
                    shard | {"epoch": epoch, "position": repeated}
                )
                if stored != len(entries) - len(todo):
                    raise log_order_error(run_id, shard_id, first, head_last)
                if not todo:
                    return
            prev_epoch = head_epoch
            self._fault("before_chunks")
            docs = []
            for e in todo:
                save_id = f"log-{e.position}-e{epoch}"
                snap = ShardSnapshot(run_id, shard_id, epoch, e.position, e.meta, e.arrays)
                batch = [
                    shard | {"save_id": save_id, "kind": "log", "epoch": epoch,
                             "version": e.position, "name": name, "idx": idx,
                             "data": bytes(data)}
                    for name, idx, data in state_chunks(snap, self.chunk_bytes)
                ]  # fmt: skip
                for at in range(0, len(batch), _INSERT_BATCH_CHUNKS):
                    self._insert_idempotent(self._chunks, batch[at : at + _INSERT_BATCH_CHUNKS])
                docs.append(
                    shard | {"_id": doc_id(run_id, shard_id, e.position, epoch),
                             "position": e.position, "epoch": epoch, "prev_epoch": prev_epoch,
                             "save_id": save_id, "meta": metas[e.position], "nbytes": e.nbytes,
                             "layout": state_layout(snap, self.chunk_bytes)}
                )  # fmt: skip
                prev_epoch = epoch
            self._fault("after_chunks")
            self._insert_idempotent(self._log, docs)
            self._fault("before_head")
            # rules.append_refusal as a query, plus the chain: the head still ends where it was
            # read, so the entries' prev_epoch is right.
            moved = self._heads.find_one_and_update(
                {
                    "_id": key,
                    "owner_epoch": epoch,
                    "last": head_last,
                    "last_epoch": head_epoch,
                },
                {"$set": {"last": last, "last_epoch": epoch}},
                projection={"_id": 1},
            )
            self._fault("after_head")
            if moved is None:
                now = self._heads_primary.find_one({"_id": key}, {"owner_epoch": 1, "last": 1})
                owner = None if now is None else now["owner_epoch"]
                now_last = 0 if now is None else now.get("last", 0)
                if owner == epoch and now_last >= last:
                    return  # applied by an earlier try of this same append
                if refusal := append_refusal(
                    run_id, shard_id, epoch, todo[0].position, owner, now_last
                ):
                    raise refusal
                raise StoreUnavailable(f"store {self._where}: the head of shard {shard_id} moved")

    def _insert_idempotent(self, collection: Any, docs: list[dict[str, Any]]) -> None:
        """Insert documents whose keys say what they are: a duplicate key is this same write
        repeated (a retry after a lost reply), so it counts as done."""
        self._fault("chunks")
        try:
            collection.insert_many(docs, ordered=False)
        except BulkWriteError as e:
            if any(err.get("code") != 11000 for err in e.details.get("writeErrors", [])):
                raise
            if concern := e.details.get("writeConcernErrors"):
                # Written before, but a majority did not acknowledge this try: transient.
                raise StoreUnavailable(
                    f"store {self._where}: {collection.name} insert not acknowledged by a "
                    f"majority: {concern[0].get('errmsg', concern[0])}"
                ) from e

    def load_shard_log(self, run_id: str, shard_id: int) -> ShardLog | None:
        key = doc_id(run_id, shard_id)
        what = f"store {self._where}: state of shard {shard_id} of run {run_id!r}"
        torn: TornState | None = None
        torn_head = None
        for _attempt in range(_LOAD_ATTEMPTS):
            with self._op("load"):
                self._fault("read")
                head = self._heads_primary.find_one({"_id": key})
                if head is None:
                    self._require_run(run_id)
                    return None
                marker = (head.get("save_id"), head.get("last", 0), head.get("last_epoch"))
                if torn is not None and marker == torn_head:
                    raise torn  # the head did not move: the store lost data
                self._fault("read_chunks")
                try:
                    log = self._read_log(run_id, shard_id, head, what)
                except TornState as e:  # the head moved on and what it named was collected
                    torn, torn_head = e, marker
                    continue
            return log
        assert torn is not None
        raise torn

    def _read_log(self, run_id: str, shard_id: int, head: Mapping[str, Any], what: str) -> ShardLog:
        shard = {"run_id": run_id, "shard_id": shard_id}
        base = None
        if head.get("save_id") is not None:
            docs = self._chunks_primary.find(
                shard | {"save_id": head["save_id"]}, {"_id": 0, "name": 1, "idx": 1, "data": 1}
            )
            arrays = assemble_state(
                head["layout"], ((d["name"], d["idx"], d["data"]) for d in docs), what
            )
            meta = json.loads(head["meta"])
            base = ShardSnapshot(run_id, shard_id, head["epoch"], head["version"], meta, arrays)
        first, last = (head.get("version") or 0) + 1, head.get("last", 0)
        found = self._log_primary.find(shard | {"position": {"$gte": first, "$lte": last}})
        by_key = {(d["position"], d["epoch"]): d for d in found}
        chain, epoch = [], head.get("last_epoch")
        for position in range(last, first - 1, -1):  # back from the head along prev_epoch
            doc = by_key.get((position, epoch))
            if doc is None:
                raise TornState(f"{what}: log entry {position} of epoch {epoch} is missing")
            chain.append(doc)
            epoch = doc["prev_epoch"]
        entries = []
        for doc in reversed(chain):
            chunks = self._chunks_primary.find(
                shard | {"save_id": doc["save_id"]}, {"_id": 0, "name": 1, "idx": 1, "data": 1}
            )
            arrays = assemble_state(
                doc["layout"], ((c["name"], c["idx"], c["data"]) for c in chunks), what
            )
            entries.append(LogEntry(doc["position"], json.loads(doc["meta"]), arrays))
        return ShardLog(base, entries, head.get("last_epoch") if last else None)

    def load_shard_state(self, run_id: str, shard_id: int) -> ShardSnapshot | None:
        log = self.load_shard_log(run_id, shard_id)
        return None if log is None else log.base

    def shard_heads(self, run_id: str) -> dict[int, dict[str, Any]]:
        fields = ("owner_epoch", "epoch", "version", "saved_at", "nbytes", "last")
        with self._op("shard_heads"):
            docs = list(
                self._heads_status.find(
                    {"run_id": run_id}, {"shard_id": 1, **dict.fromkeys(fields, 1)}
                )
            )
            if not docs and self._runs_status.find_one({"_id": run_id}, {"_id": 1}) is None:
                raise UnknownRun(run_id, self._where)
        heads = {}
        for d in sorted(docs, key=_shard):
            head = {f: d.get(f) for f in fields}
            head["last"] = head["last"] or 0
            head["log_entries"] = head["last"] - (head["version"] or 0)
            heads[d["shard_id"]] = head
        return heads


def _shard(doc: Mapping[str, Any]) -> int:
    return int(doc["shard_id"])

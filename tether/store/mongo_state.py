"""The replicated-shard-state half of the MongoDB store: claim, save, load (DESIGN §5, §6).

:class:`MongoShardState` is a base of :class:`tether.store.mongo.MongoStore` and uses its plumbing
(``_op``, ``_fault``, ``_require_run``). Collections: ``shard_heads``, one document per
``(run, shard)``, and ``shard_chunks``, the chunks of the states the heads point at.

Chunks are written first, under a fresh save id (never over the chunks the head points at), then
the head is switched by one conditional single-document update: :func:`tether.store.rules.
save_refusal` stated as a query. A failure at any point before the switch leaves the old head and
its chunks as they were; the orphans are deleted by the next successful save of this shard.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NoReturn

from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from tether.store.base import (
    ShardSnapshot,
    StoreError,
    StoreUnavailable,
    TornState,
    UnknownRun,
    assemble_state,
    check_member_id,
    state_chunks,
    state_layout,
)
from tether.store.mongo_setup import doc_id, json_doc, retry_upsert
from tether.store.rules import claim_refusal, save_refusal

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

    if TYPE_CHECKING:

        def _op(self, name: str) -> AbstractContextManager[None]: ...

        def _fault(self, point: str) -> None: ...

        def _require_run(self, run_id: str) -> None: ...

    def claim_shard(self, run_id: str, shard_id: int, epoch: int) -> None:
        check_member_id(shard_id)
        key = doc_id(run_id, shard_id)
        empty = {"run_id": run_id, "shard_id": shard_id, "epoch": None, "version": None}
        empty |= {"save_id": None, "layout": None, "meta": None, "nbytes": None}

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
            # rules.save_refusal as a query: the switch is one atomic conditional write.
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
        owner, version = (None, None) if head is None else (head["owner_epoch"], head["version"])
        refusal = save_refusal(snap, owner, version)
        if refusal is not None:
            raise refusal
        raise StoreUnavailable(  # the head changed between the switch and this read: retry
            f"store {self._where}: the head of shard {snap.shard_id} changed during the save"
        )

    def load_shard_state(self, run_id: str, shard_id: int) -> ShardSnapshot | None:
        key = doc_id(run_id, shard_id)
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

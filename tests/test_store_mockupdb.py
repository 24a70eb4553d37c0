"""The MongoDB store's log append at the wire: pymongo against a scripted replica-set primary.

:class:`tether.store.mongo.MongoStore` talks to a MockupDB server on 127.0.0.1 (a real loopback
socket) that answers ``hello`` as the primary of a one-member replica set ``rs0``; every other
command (but index builds and ``endSessions``) is received and answered by the test, so each
test states the exact commands an append sends, in order, and what the driver does with the
replies a real primary gives when it steps down, loses a connection or misses its write concern.

What pymongo does (checked here, not assumed): a write error that carries the server's
``RetryableWriteError`` label (a real primary labels "not primary" replies to retryable writes)
or a dropped connection is retried once, with the same ``lsid`` and ``txnNumber`` (and the same
documents, ``_id`` included); a write concern error without the label (``WTimeoutError``) is not
retried; when no primary is known for the retry, the driver waits out server selection and
raises the original error. What reaches the store becomes :class:`StoreUnavailable`.

Also here: the retry of an append that was applied (read the head, count its own entries, write
nothing), duplicate keys as this append's own earlier writes, the conditional ``claim_shard``
upsert and its fencing, and ``load_shard_log`` reading back the documents an append sent.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from bson import ObjectId
from mockupdb import MockupDB, OpMsg
from pymongo.errors import AutoReconnect, NotPrimaryError, WriteConcernError

from tether.store.base import Fenced, LogEntry, StoreError, StoreUnavailable
from tether.store.mongo import MongoStore

pytestmark = pytest.mark.timeout(60)

RUN = "run-m"
SHARD = 0
EPOCH = 3
HEAD_ID = json.dumps([RUN, SHARD], separators=(",", ":"))
CHUNK_BYTES = 16  # an entry's 8 float32 (32 bytes) are two chunks
WAIT = 20.0  # seconds to wait for the next request or for a call to return (a busy machine)
MAJORITY = {"w": "majority", "wtimeout": 5000}  # the store's default write concern
ELECTION = ObjectId("7fffffff0000000000000001")


def entries(first: int, n: int = 2) -> list[LogEntry]:
    return [
        LogEntry(p, {"step": p}, {"grad": np.arange(8, dtype=np.float32) + p})
        for p in range(first, first + n)
    ]


def doc_id(*parts: Any) -> str:
    """A document ``_id`` as the store makes it (restated here: a change to the ids shows)."""
    return json.dumps(parts, separators=(",", ":"))


def head(owner: int, last: int, last_epoch: int | None) -> dict[str, Any]:
    return {"_id": HEAD_ID, "owner_epoch": owner, "last": last, "last_epoch": last_epoch}


class Primary:
    """A MockupDB that answers ``hello`` as the primary of replica set ``rs0`` (or, once
    ``writable`` is False, as a secondary with no primary known) and leaves the rest to the
    test."""

    def __init__(self) -> None:
        self.server = MockupDB(request_timeout=WAIT)
        self.server._address = ("127.0.0.1", None)  # loopback only (mockupdb says "localhost")
        self.port = self.server.run()
        self.host = f"127.0.0.1:{self.port}"
        self.writable = True
        self.stores: list[MongoStore] = []
        self.server.autoresponds(self._respond)

    def _respond(self, request: Any) -> bool:
        name = (request.command_name or "").lower()
        if name in ("ismaster", "hello"):
            return bool(request.replies(self.hello()))
        if name in ("createindexes", "endsessions"):
            return bool(request.replies(ok=1))
        return False

    def hello(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "ismaster": self.writable,
            "isWritablePrimary": self.writable,
            "secondary": not self.writable,
            "setName": "rs0",
            "setVersion": 1,
            "hosts": [self.host],
            "me": self.host,
            "minWireVersion": 0,
            "maxWireVersion": 21,
            "logicalSessionTimeoutMinutes": 30,
            "maxBsonObjectSize": 16 << 20,
            "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000,
        }
        if self.writable:
            doc |= {"primary": self.host, "electionId": ELECTION}
        return doc

    def store(self, options: str = "") -> MongoStore:
        uri = f"mongodb://{self.host}/tether?replicaSet=rs0{options}"
        store = MongoStore(uri, chunk_bytes=CHUNK_BYTES)
        self.stores.append(store)
        return store

    def receives(self, command: str, collection: str) -> Any:
        """The next request, which must be ``command`` on ``collection``."""
        return self.server.receives(OpMsg(command, collection), timeout=WAIT)

    def quiet(self, seconds: float = 1.0) -> None:
        """Assert nothing more is sent for ``seconds``."""
        if self.server.got(timeout=seconds):
            pytest.fail(f"unexpected request: {self.server.receives(timeout=1)!r}")

    def close(self) -> None:
        try:
            for store in self.stores:
                store.close()
        finally:
            self.server.stop()


@pytest.fixture
def primary() -> Iterator[Primary]:
    p = Primary()
    yield p
    p.close()


class Call:
    """A store call on a daemon thread; ``result()`` joins it and returns or re-raises what
    it did (the exception itself: mockupdb's ``go`` re-makes it from its message)."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._outcome: list[tuple[bool, Any]] = []
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._outcome.append((True, fn(*args)))
        except BaseException as e:
            self._outcome.append((False, e))

    def result(self, timeout: float = WAIT) -> Any:
        self._thread.join(timeout)
        if not self._outcome:
            pytest.fail(f"the store call did not return within {timeout} s")
        ok, value = self._outcome[0]
        if not ok:
            raise value
        return value


def append(store: MongoStore, batch: list[LogEntry], epoch: int = EPOCH) -> Call:
    """Start ``append_shard_log`` on a thread."""
    return Call(store.append_shard_log, RUN, SHARD, epoch, batch)


def answer_find_head(primary: Primary, doc: dict[str, Any] | None) -> Any:
    req = primary.receives("find", "shard_heads")
    assert req["filter"] == {"_id": HEAD_ID}
    assert req["readConcern"] == {"level": "majority"}
    batch = [] if doc is None else [doc]
    req.replies(cursor={"id": 0, "ns": "tether.shard_heads", "firstBatch": batch})
    return req


def answer_insert(req: Any) -> None:
    req.replies(n=len(req["documents"]))


def answer_chunks(primary: Primary, batch: list[LogEntry]) -> list[Any]:
    """Receive and acknowledge the chunk inserts of ``batch`` (one insert per entry here)."""
    reqs = []
    for e in batch:
        req = primary.receives("insert", "shard_chunks")
        docs = req["documents"]
        assert {d["save_id"] for d in docs} == {f"log-{e.position}-e{EPOCH}"}
        assert b"".join(d["data"] for d in sorted(docs, key=lambda d: d["idx"])) == (
            e.arrays["grad"].tobytes()
        )
        answer_insert(req)
        reqs.append(req)
    return reqs


def answer_log(primary: Primary) -> Any:
    req = primary.receives("insert", "shard_log")
    answer_insert(req)
    return req


def moved(req: Any) -> None:
    """Answer a head update as a primary that matched and updated the head."""
    req.replies(value={"_id": HEAD_ID}, lastErrorObject={"n": 1, "updatedExisting": True})


def not_primary(
    req: Any,
    code: int = 10107,
    name: str = "NotWritablePrimary",
    errmsg: str = "not primary",
) -> None:
    """Answer as a primary that has stepped down (the reply a real one gives a retryable
    write: with the RetryableWriteError label)."""
    req.command_err(code=code, errmsg=errmsg, codeName=name, errorLabels=["RetryableWriteError"])


def test_append_sends_head_read_chunks_entries_then_conditional_head_update(primary):
    store = primary.store()
    batch = entries(5)
    done = append(store, batch)

    find = answer_find_head(primary, head(owner=EPOCH, last=4, last_epoch=2))
    assert find["projection"] == {"owner_epoch": 1, "last": 1, "last_epoch": 1}
    chunk_reqs = answer_chunks(primary, batch)
    log_req = answer_log(primary)
    update = primary.receives("findAndModify", "shard_heads")
    moved(update)
    assert done.result() is None

    for req in [*chunk_reqs, log_req]:
        assert req["writeConcern"] == MAJORITY
        assert req["ordered"] is False
        assert "txnNumber" in req  # a retryable write
    docs = log_req["documents"]
    assert [d["_id"] for d in docs] == [doc_id(RUN, SHARD, p, EPOCH) for p in (5, 6)]
    assert [(d["position"], d["epoch"], d["prev_epoch"]) for d in docs] == [
        (5, EPOCH, 2),  # chained to the head's last entry, written by epoch 2
        (6, EPOCH, EPOCH),
    ]
    assert [json.loads(d["meta"]) for d in docs] == [{"step": 5}, {"step": 6}]
    assert update["writeConcern"] == MAJORITY
    assert update["query"] == {
        "_id": HEAD_ID,
        "owner_epoch": EPOCH,
        "last": 4,
        "last_epoch": 2,
    }
    assert update["update"] == {"$set": {"last": 6, "last_epoch": EPOCH}}
    primary.quiet()


def append_up_to_the_head_update(primary: Any) -> tuple[Any, list[Any], Any]:
    """Start an append of positions 5 and 6 by EPOCH after a head at 4 (epoch 2) and answer
    every request of it up to the head update: (the store, the batch, the call)."""
    store = primary.store()
    batch = entries(5)
    done = append(store, batch)
    answer_find_head(primary, head(owner=EPOCH, last=4, last_epoch=2))
    answer_chunks(primary, batch)
    answer_log(primary)
    return store, batch, done


def test_not_writable_primary_on_head_update_is_retried_once_then_unavailable(primary):
    store, batch, done = append_up_to_the_head_update(primary)
    first = primary.receives("findAndModify", "shard_heads")
    not_primary(first)
    retry = primary.receives("findAndModify", "shard_heads")  # pymongo's one retry
    assert (retry["lsid"], retry["txnNumber"]) == (first["lsid"], first["txnNumber"])
    assert retry["query"] == first["query"]
    not_primary(retry)

    with pytest.raises(StoreUnavailable, match="append failed: NotPrimaryError") as caught:
        done.result()
    assert type(caught.value) is StoreUnavailable
    assert "not primary" in str(caught.value)
    assert isinstance(caught.value.__cause__, NotPrimaryError)
    primary.quiet()


def test_not_writable_primary_on_entry_insert_is_unavailable_and_head_untouched(primary):
    store = primary.store()
    batch = entries(5)
    done = append(store, batch)
    answer_find_head(primary, head(owner=EPOCH, last=4, last_epoch=2))
    answer_chunks(primary, batch)
    first = primary.receives("insert", "shard_log")
    not_primary(first)
    retry = primary.receives("insert", "shard_log")
    assert (retry["lsid"], retry["txnNumber"]) == (first["lsid"], first["txnNumber"])
    assert retry["documents"] == first["documents"]
    not_primary(retry)

    with pytest.raises(StoreUnavailable, match="NotWritablePrimary|not primary") as caught:
        done.result()
    assert type(caught.value) is StoreUnavailable
    primary.quiet()  # no head update after a failed insert


def test_write_concern_error_on_head_update_is_unavailable_and_not_retried(primary):
    store, batch, done = append_up_to_the_head_update(primary)
    update = primary.receives("findAndModify", "shard_heads")
    update.replies(
        value={"_id": HEAD_ID},
        lastErrorObject={"n": 1, "updatedExisting": True},
        writeConcernError={
            "code": 64,
            "codeName": "WriteConcernFailed",
            "errmsg": "waiting for replication timed out",
            "errInfo": {"wtimeout": True},
        },
    )

    with pytest.raises(StoreUnavailable, match="waiting for replication timed out") as caught:
        done.result()
    assert type(caught.value) is StoreUnavailable
    assert isinstance(caught.value.__cause__, WriteConcernError)
    primary.quiet()  # a write concern error is not retried by the driver


def test_dropped_connection_on_chunk_insert_is_retried_and_append_completes_once(primary):
    store = primary.store()
    batch = entries(5)
    done = append(store, batch)
    answer_find_head(primary, head(owner=EPOCH, last=4, last_epoch=2))
    first = primary.receives("insert", "shard_chunks")
    first.hangup()
    retry = primary.receives("insert", "shard_chunks")  # on a new connection
    assert (retry["lsid"], retry["txnNumber"]) == (first["lsid"], first["txnNumber"])
    assert retry["documents"] == first["documents"]  # the same _ids: one write, repeated
    answer_insert(retry)
    answer_chunks(primary, batch[1:])
    answer_log(primary)
    moved(primary.receives("findAndModify", "shard_heads"))
    assert done.result() is None
    primary.quiet()  # exactly one head update


def test_dropped_connection_twice_on_chunk_insert_is_unavailable(primary):
    store = primary.store()
    batch = entries(5)
    done = append(store, batch)
    answer_find_head(primary, head(owner=EPOCH, last=4, last_epoch=2))
    primary.receives("insert", "shard_chunks").hangup()
    primary.receives("insert", "shard_chunks").hangup()

    with pytest.raises(StoreUnavailable, match="append failed: AutoReconnect") as caught:
        done.result()
    assert type(caught.value) is StoreUnavailable
    assert isinstance(caught.value.__cause__, AutoReconnect)
    primary.quiet()


def test_step_down_before_head_update_then_retry_finds_it_applied(primary):
    # A short server selection: after the step-down no primary is known, so the driver's
    # retry of the head update waits this long for one, then gives the step-down error.
    store = primary.store("&serverSelectionTimeoutMS=3000&heartbeatFrequencyMS=500")
    batch = entries(5)
    done = append(store, batch)
    answer_find_head(primary, head(owner=EPOCH, last=4, last_epoch=2))
    answer_chunks(primary, batch)
    answer_log(primary)
    update = primary.receives("findAndModify", "shard_heads")
    primary.writable = False  # from now on hello says: secondary, no primary
    not_primary(
        update,
        code=11602,
        name="InterruptedDueToReplStateChange",
        errmsg="operation was interrupted because of a replication state change",
    )

    with pytest.raises(StoreUnavailable, match="append failed: NotPrimaryError") as caught:
        done.result()
    # The step-down error itself, not the retry's server selection timeout.
    assert "InterruptedDueToReplStateChange" in str(caught.value)
    assert isinstance(caught.value.__cause__, NotPrimaryError)
    primary.quiet()  # no primary: the driver's retry found no server to send to

    # It was applied before the step-down (majority-committed; the reply was what got lost).
    # The same append again, once a primary is back: it reads the head, checks its own entries
    # are there, and writes nothing.
    primary.writable = True
    done = append(store, batch)
    answer_find_head(primary, head(owner=EPOCH, last=6, last_epoch=EPOCH))
    count = primary.receives("aggregate", "shard_log")
    match = count["pipeline"][0]["$match"]
    assert match == {
        "run_id": RUN,
        "shard_id": SHARD,
        "epoch": EPOCH,
        "position": {"$gte": 5, "$lte": 6},
    }
    count.replies(cursor={"id": 0, "ns": "tether.shard_log", "firstBatch": [{"_id": 1, "n": 2}]})
    assert done.result() is None
    primary.quiet()  # no chunks, no entries, no head update


def test_lost_head_update_reply_then_no_match_reads_the_head_and_returns(primary):
    # The head update's reply is lost; the driver's retry does not match (the first try moved
    # the head), so the store reads the head, finds its own last position, and returns.
    store, batch, done = append_up_to_the_head_update(primary)
    first = primary.receives("findAndModify", "shard_heads")
    first.hangup()
    retry = primary.receives("findAndModify", "shard_heads")
    assert (retry["lsid"], retry["txnNumber"]) == (first["lsid"], first["txnNumber"])
    retry.replies(value=None, lastErrorObject={"n": 0, "updatedExisting": False})
    answer_find_head(primary, head(owner=EPOCH, last=6, last_epoch=EPOCH))
    assert done.result() is None
    primary.quiet()


def test_head_moved_under_the_append_is_unavailable(primary):
    store, batch, done = append_up_to_the_head_update(primary)
    primary.receives("findAndModify", "shard_heads").replies(
        value=None, lastErrorObject={"n": 0, "updatedExisting": False}
    )
    answer_find_head(primary, head(owner=EPOCH, last=5, last_epoch=EPOCH))

    with pytest.raises(StoreUnavailable, match="the head of shard 0 moved"):
        done.result()
    primary.quiet()


def test_fenced_append_writes_nothing(primary):
    store = primary.store()
    done = append(store, entries(5))
    answer_find_head(primary, head(owner=EPOCH + 1, last=4, last_epoch=EPOCH))

    with pytest.raises(Fenced) as caught:
        done.result()
    assert (caught.value.epoch, caught.value.current_epoch) == (EPOCH, EPOCH + 1)
    primary.quiet()


def duplicates(req: Any) -> list[dict[str, Any]]:
    """A duplicate-key write error for every document of an insert."""
    return [
        {"index": i, "code": 11000, "errmsg": "E11000 duplicate key error"}
        for i in range(len(req["documents"]))
    ]


def test_duplicate_keys_on_chunk_insert_count_as_written(primary):
    # A store-level retry re-inserts what an earlier try wrote: the primary refuses each
    # document as a duplicate key, and the append carries on.
    store = primary.store()
    batch = entries(5)
    done = append(store, batch)
    answer_find_head(primary, head(owner=EPOCH, last=4, last_epoch=2))
    for _ in batch:
        req = primary.receives("insert", "shard_chunks")
        req.replies(n=0, writeErrors=duplicates(req))
    answer_log(primary)
    moved(primary.receives("findAndModify", "shard_heads"))
    assert done.result() is None
    primary.quiet()


def test_duplicate_keys_with_write_concern_error_are_unavailable(primary):
    # The duplicates are this append's own earlier writes; what failed is the write concern:
    # the call may work when retried.
    store = primary.store()
    batch = entries(5)
    done = append(store, batch)
    answer_find_head(primary, head(owner=EPOCH, last=4, last_epoch=2))
    req = primary.receives("insert", "shard_chunks")
    wce = {"code": 64, "codeName": "WriteConcernFailed", "errmsg": "waiting for replication"}
    req.replies(n=0, writeErrors=duplicates(req), writeConcernError=wce)

    with pytest.raises(StoreError) as caught:
        done.result()
    assert type(caught.value) is StoreUnavailable, caught.value
    primary.quiet()


def test_claim_is_one_conditional_upsert_on_the_primary(primary):
    store = primary.store()
    done = Call(store.claim_shard, RUN, SHARD, EPOCH)
    run = primary.receives("find", "runs")
    assert run["filter"] == {"_id": RUN}
    run.replies(cursor={"id": 0, "ns": "tether.runs", "firstBatch": [{"_id": RUN}]})
    req = primary.receives("update", "shard_heads")
    assert req["writeConcern"] == MAJORITY
    (update,) = req["updates"]
    assert update["q"] == {"_id": HEAD_ID, "owner_epoch": {"$lte": EPOCH}}
    assert update["u"]["$set"] == {"owner_epoch": EPOCH}
    assert update["u"]["$setOnInsert"]["last"] == 0
    assert update["upsert"] is True
    req.replies(n=1, nModified=0, upserted=[{"index": 0, "_id": HEAD_ID}])
    assert done.result() is None
    primary.quiet()


def test_claim_by_an_older_epoch_collides_and_is_fenced(primary):
    store = primary.store()
    done = Call(store.claim_shard, RUN, SHARD, EPOCH)
    run = primary.receives("find", "runs")
    run.replies(cursor={"id": 0, "ns": "tether.runs", "firstBatch": [{"_id": RUN}]})
    # A newer owner: the filter does not match, so the upsert's insert collides on _id.
    dup = {"index": 0, "code": 11000, "errmsg": "E11000 duplicate key error index: _id_"}
    primary.receives("update", "shard_heads").replies(n=0, nModified=0, writeErrors=[dup])
    answer_find_head(primary, {"_id": HEAD_ID, "owner_epoch": EPOCH + 2})

    with pytest.raises(Fenced) as caught:
        done.result()
    assert (caught.value.epoch, caught.value.current_epoch) == (EPOCH, EPOCH + 2)
    primary.quiet()


def test_load_reads_back_what_the_append_wrote(primary):
    store = primary.store()
    batch = entries(1)
    done = append(store, batch)
    answer_find_head(primary, head(owner=EPOCH, last=0, last_epoch=None))
    chunks = [d for req in answer_chunks(primary, batch) for d in req["documents"]]
    logged = answer_log(primary)["documents"]
    moved(primary.receives("findAndModify", "shard_heads"))
    done.result()

    done = Call(store.load_shard_log, RUN, SHARD)
    answer_find_head(primary, head(owner=EPOCH, last=2, last_epoch=EPOCH) | {"save_id": None})
    find = primary.receives("find", "shard_log")
    assert find["filter"] == {"run_id": RUN, "shard_id": SHARD, "position": {"$gte": 1, "$lte": 2}}
    find.replies(cursor={"id": 0, "ns": "tether.shard_log", "firstBatch": logged[::-1]})
    for doc in logged:  # oldest first
        req = primary.receives("find", "shard_chunks")
        assert req["filter"] == {"run_id": RUN, "shard_id": SHARD, "save_id": doc["save_id"]}
        mine = [c for c in chunks if c["save_id"] == doc["save_id"]]
        req.replies(cursor={"id": 0, "ns": "tether.shard_chunks", "firstBatch": mine[::-1]})
    log = done.result()

    assert log.base is None and log.last_epoch == EPOCH
    assert [e.position for e in log.entries] == [1, 2]
    for got, want in zip(log.entries, batch, strict=True):
        assert got.meta == want.meta
        np.testing.assert_array_equal(got.arrays["grad"], want.arrays["grad"])
    primary.quiet()

"""The results half of the MongoDB store: run meta, metrics, artifacts (DESIGN §6, §8).

:class:`MongoResults` is a base of :class:`tether.store.mongo.MongoStore` and uses its plumbing
(``_op``: refuse after close or fork, consult the fault seam, translate pymongo errors). Layout:

- ``runs.meta``: a sub-document; ``set_run_meta`` ``$set`` s ``meta.<key>`` per top-level key,
  one atomic single-document update, so concurrent writers of different keys both land.
- ``metrics``: one document per ``(run, source, step)``, ``_id`` derived from those three and a
  unique index on them (the index also serves ``metrics()``' filter and sort). A batch is one
  ordered ``bulk_write`` of ``ReplaceOne(upsert=True)``: a repeated step replaces the earlier
  row, and a batch retried after a lost reply writes the same documents again.
- ``artifacts``: one document per ``(run, name)`` holding the bytes (at most 8 MiB, half
  MongoDB's document limit), replaced whole.

Reads of metrics and artifacts are reports: they use the store's status read preference, like
``members`` (with a secondary preference they may miss the latest writes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from pymongo import ASCENDING, ReplaceOne

from tether.store.base import ArtifactInfo, ArtifactNotFound, MetricRow, UnknownRun
from tether.store.mongo_setup import doc_id
from tether.store.results import (
    check_artifact,
    check_artifact_name,
    check_metric_rows,
    check_run_meta,
    check_source,
)

_METRIC_KEY = ("run_id", "source", "step")


class MongoResults:
    """Run meta, metrics and artifacts on MongoDB (see the module docstring); the contracts are
    those of :class:`tether.store.base.Store`."""

    # Set up by MongoStore.__init__.
    _where: str
    _clock: Callable[[], float]
    _runs: Any
    _runs_primary: Any
    _runs_status: Any
    _members: Any
    _heads: Any
    _chunks: Any
    _log: Any

    if TYPE_CHECKING:

        def _op(self, name: str) -> AbstractContextManager[None]: ...

        def _require_run(self, run_id: str) -> None: ...

        _tokens: Any

    def _open_results(self, db: Any, status: dict[str, Any]) -> list[tuple[Any, Any, bool]]:
        """Bind the results collections; return their indexes ``(collection, keys, unique)``."""
        self._metrics = db.get_collection("metrics")
        self._artifacts = db.get_collection("artifacts")
        self._metrics_status = self._metrics.with_options(**status)
        self._artifacts_status = self._artifacts.with_options(**status)
        return [
            (self._metrics, [(f, ASCENDING) for f in _METRIC_KEY], True),
            (self._artifacts, [("run_id", ASCENDING), ("name", ASCENDING)], True),
        ]

    def _require_run_status(self, run_id: str) -> None:
        if self._runs_status.find_one({"_id": run_id}, {"_id": 1}) is None:
            raise UnknownRun(run_id, self._where)

    def set_run_meta(self, run_id: str, meta: dict[str, Any]) -> None:
        doc = check_run_meta(meta)
        with self._op("set_run_meta"):
            if not doc:  # MongoDB refuses an empty $set
                self._require_run(run_id)
                return
            update = {"$set": {f"meta.{k}": v for k, v in doc.items()}}
            if self._runs.update_one({"_id": run_id}, update).matched_count == 0:
                raise UnknownRun(run_id, self._where)

    def log_metrics(self, run_id: str, rows: Sequence[MetricRow]) -> None:
        checked = check_metric_rows(rows)
        ops = [
            ReplaceOne(
                {"_id": doc_id(run_id, r.source, r.step)},
                {"run_id": run_id, "source": r.source, "step": r.step, "t": r.t}
                | {"values": r.values},
                upsert=True,
            )
            for r in checked
        ]
        with self._op("log_metrics"):
            self._require_run(run_id)
            if ops:  # pymongo refuses an empty bulk write
                self._metrics.bulk_write(ops, ordered=True)

    def metrics(self, run_id: str, source: str | None = None) -> list[MetricRow]:
        query: dict[str, Any] = {"run_id": run_id}
        if source is not None:
            query["source"] = check_source(source)
        fields = {"_id": 0, "source": 1, "step": 1, "t": 1, "values": 1}
        with self._op("metrics"):
            docs = list(
                self._metrics_status.find(query, fields).sort(
                    [("source", ASCENDING), ("step", ASCENDING)]
                )
            )
            if not docs:
                self._require_run_status(run_id)
        return [MetricRow(d["source"], int(d["step"]), d["t"], dict(d["values"])) for d in docs]

    def put_artifact(self, run_id: str, name: str, data: bytes, content_type: str) -> None:
        blob = check_artifact(name, data, content_type)
        doc: dict[str, Any] = {"run_id": run_id, "name": name, "content_type": content_type}
        doc |= {"size": len(blob), "created_at": self._clock(), "data": blob}
        with self._op("put_artifact"):
            self._require_run(run_id)
            self._artifacts.replace_one({"_id": doc_id(run_id, name)}, doc, upsert=True)

    def artifacts(self, run_id: str) -> list[ArtifactInfo]:
        fields = {"_id": 0, "name": 1, "content_type": 1, "size": 1, "created_at": 1}
        with self._op("artifacts"):
            docs = list(
                self._artifacts_status.find({"run_id": run_id}, fields).sort("name", ASCENDING)
            )
            if not docs:
                self._require_run_status(run_id)
        return [
            ArtifactInfo(d["name"], d["content_type"], int(d["size"]), d["created_at"])
            for d in docs
        ]

    def get_artifact(self, run_id: str, name: str) -> bytes:
        check_artifact_name(name)
        with self._op("get_artifact"):
            doc = self._artifacts_status.find_one({"_id": doc_id(run_id, name)}, {"data": 1})
            if doc is None:
                self._require_run_status(run_id)
                raise ArtifactNotFound(run_id, name, self._where)
        return bytes(doc["data"])

    def delete_run(self, run_id: str) -> None:
        with self._op("delete_run"):
            self._require_run(run_id)
            # Everything under the run first, the run document last: a delete cut off midway
            # leaves the run in place, and repeating the call finishes it.
            for collection in (
                self._members,
                self._heads,
                self._chunks,
                self._log,
                self._metrics,
                self._artifacts,
            ):
                collection.delete_many({"run_id": run_id})
            self._tokens.delete_one({"_id": run_id})
            self._runs.delete_one({"_id": run_id})

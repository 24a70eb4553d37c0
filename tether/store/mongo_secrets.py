"""The run-token part of the MongoDB store (DESIGN §13): :class:`MongoSecrets` is a base of
:class:`tether.store.mongo.MongoStore`.

Collection ``run_tokens``: one document per run, ``{_id: run_id, tokens: [...]}``, apart from
``runs`` so that a role may read runs without their secrets. ``create_run`` inserts it right
after the run's document; a run whose creation was cut off between the two has no token and is
refused like a run from before tokens, until ``tether run rotate-token`` gives it one. Reads and
writes go to the primary with the recovery concerns, so a rotation is seen by every member that
reads after it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pymongo.errors import DuplicateKeyError

from tether.store.secrets import RunToken


def _docs(tokens: Sequence[RunToken]) -> list[dict[str, Any]]:
    return [asdict(t) for t in tokens]


class MongoSecrets:
    if TYPE_CHECKING:
        _op: Callable[[str], AbstractContextManager[None]]

        def _require_run(self, run_id: str) -> None: ...

    _tokens: Any

    def _open_secrets(self, db: Any, recovery: dict[str, Any]) -> None:
        self._tokens = db.get_collection("run_tokens").with_options(**recovery)

    def _insert_run_tokens(self, run_id: str, tokens: Sequence[RunToken]) -> None:
        self._tokens.update_one(
            {"_id": run_id}, {"$setOnInsert": {"tokens": _docs(tokens)}}, upsert=True
        )

    def run_tokens(self, run_id: str) -> list[RunToken]:
        with self._op("run_tokens"):
            self._require_run(run_id)
            doc = self._tokens.find_one({"_id": run_id})
        return [] if doc is None else [RunToken(**d) for d in doc["tokens"]]

    def swap_run_tokens(
        self, run_id: str, expected: Sequence[RunToken], tokens: Sequence[RunToken]
    ) -> bool:
        with self._op("swap_run_tokens"):
            self._require_run(run_id)
            if not expected:
                try:
                    self._tokens.insert_one({"_id": run_id, "tokens": _docs(tokens)})
                    return True
                except DuplicateKeyError:
                    return False
            done = self._tokens.update_one(
                {"_id": run_id, "tokens": _docs(expected)}, {"$set": {"tokens": _docs(tokens)}}
            )
            return bool(done.modified_count)

"""The shard's side of the same-host path: the workers' segments it has mapped (DESIGN §2).

One segment per worker at a time: a worker makes a new one every time it looks the shards up
again, so a request naming a new segment replaces that worker's old mapping (whose memory goes
once no view of it is left). A shard that cannot map a segment answers with the bytes instead,
so the path is an optimisation that never decides whether a call succeeds.

All methods are called with the shard's lock held (the servicer's), which is what makes "refuse
a pull request older than one already served into the segment" and the write it guards one step.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from tether.proto import ps_pb2
from tether.shm import Segment, SegmentRef, SegmentUnavailable


@dataclass(slots=True)
class _Mapped:
    segment: Segment | None  # None: this name could not be mapped (not retried)
    last_request: int = -1  # the highest pull request id served into it


class SegmentCache:
    def __init__(self, shard_id: int = 0) -> None:
        self._by_worker: dict[int, tuple[str, _Mapped]] = {}
        self._shard_id = shard_id

    def _mapped(self, worker_id: int, msg: ps_pb2.Segment) -> _Mapped:
        have = self._by_worker.get(worker_id)
        if have is not None and have[0] == msg.name:
            return have[1]
        try:
            entry = _Mapped(Segment.attach(SegmentRef(msg.name, msg.token, msg.size)))
        except SegmentUnavailable as e:  # said once per segment: the worker streams bytes
            self._say(f"worker {worker_id}'s segment is not mappable here ({e})")
            entry = _Mapped(None)
        self._by_worker[worker_id] = (msg.name, entry)
        return entry

    def view(self, worker_id: int, msg: ps_pb2.Segment, length: int) -> np.ndarray | None:
        """The `length` floats at the request's offset in its segment; None when the segment
        cannot be mapped or the range is outside it (then the bytes travel instead)."""
        entry = self._mapped(worker_id, msg)
        if entry.segment is None or msg.token != entry.segment.ref.token:
            return None
        try:
            return entry.segment.floats(msg.offset, length)
        except ValueError as e:
            self._say(f"worker {worker_id}'s request names {e}")
            return None

    def _say(self, what: str) -> None:
        print(f"tether server: shard {self._shard_id}: {what}; streaming bytes", file=sys.stderr)

    def stale_pull(self, worker_id: int, msg: ps_pb2.Segment, request_id: int) -> bool:
        """True when a pull into this segment with a higher request id was already served."""
        have = self._by_worker.get(worker_id)
        return have is not None and have[0] == msg.name and request_id <= have[1].last_request

    def served(self, worker_id: int, msg: ps_pb2.Segment, request_id: int) -> None:
        have = self._by_worker.get(worker_id)
        if have is not None and have[0] == msg.name:
            have[1].last_request = request_id

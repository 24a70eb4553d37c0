"""A shard's numbers as one typed value (DESIGN §9), and the views made from it.

`ShardState.report()` takes the core's state and the servicer's counters at one instant, under
the shard's lock, into a frozen `ShardReport`. Everything that shows a shard's numbers is made
from it by one function here: the `Info` reply (`info_reply`), the heartbeat's info
(`heartbeat`), and on the reading side the run summary (`from_info` turns an `Info` reply back
into a report). A new field is added once, here (and, if the heartbeat publishes it, in
`tether.member.report.ShardNumbers`, the stored contract its readers parse).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tether.member.report import Recovered, ShardNumbers
from tether.metrics.buckets import LATENCY_BUCKETS_S, Buckets
from tether.proto import ps_pb2


@dataclass(slots=True)
class ServingCounters:
    """What the gRPC adapter counts about serving (changed under the shard's lock)."""

    pull_wait_s: float = 0.0  # total time pulls spent waiting for other workers
    segment_pulls: int = 0  # pulls served into a same-host segment
    segment_pushes: int = 0  # gradients read from a same-host segment
    waiting: int = 0  # pulls waiting right now
    # For the metrics a scrape reads (tether/metrics, DESIGN §13), kept whether served or not:
    push_bytes: int = 0  # gradient bytes of the pushes accepted
    pull_bytes: int = 0  # parameter bytes served to pulls
    push_s: Buckets = field(default_factory=lambda: Buckets(LATENCY_BUCKETS_S))
    pull_s: Buckets = field(default_factory=lambda: Buckets(LATENCY_BUCKETS_S))
    waits: dict[str, int] = field(default_factory=dict)  # calls that waited, by what for
    wait_s: dict[str, float] = field(default_factory=dict)  # and their seconds waiting
    last_update_at: float | None = None  # unix time of the last update applied

    def waited(self, reason: str, seconds: float) -> None:
        """A call waited `seconds` for `reason` (`tether.metrics.buckets.WAIT_REASONS`)."""
        self.waits[reason] = self.waits.get(reason, 0) + 1
        self.wait_s[reason] = self.wait_s.get(reason, 0.0) + seconds


@dataclass(frozen=True, slots=True)
class MemberClock:
    worker_id: int
    clock: int  # iterations of this worker the shard has received
    last_seq: int
    last_seen: float  # unix time of its last push or pull at this shard


@dataclass(frozen=True, slots=True)
class ShardReport:
    shard_id: int
    epoch: int
    version: int
    offset: int
    length: int
    mode: str
    staleness: int
    updates_applied: int
    pushes_accepted: int
    pulls_served: int
    max_clock_gap: int
    clock_gap_hist: tuple[int, ...]  # index = gap, value = served pulls
    staleness_hist: tuple[int, ...]  # index = version staleness, value = gradients
    workers: tuple[MemberClock, ...]  # in worker-id order
    replication: str  # off | sync | async
    durable_version: int
    replications: int
    replication_lag_max_s: float
    replication_lag_mean_s: float
    restored_version: int  # version loaded at start (-1: started fresh)
    pull_wait_s: float = 0.0
    segment_pulls: int = 0
    segment_pushes: int = 0
    waiting: int = 0
    # Known to the shard itself, not carried by `Info`:
    base_version: int = 0  # the store's base; the log after it holds `log_entries` entries
    log_entries: int = 0
    recovered: Mapping[str, Any] | None = None  # base, entries replayed, seconds (a restart)
    pushes_rejected_norm: int = 0  # refused by the gradient-norm guard since the process started

    @property
    def clocks(self) -> list[int]:
        return [w.clock for w in self.workers]

    # -- views --------------------------------------------------------------------------------

    def info_reply(self) -> ps_pb2.InfoReply:
        """The `Info` RPC's reply (DESIGN §9)."""
        fields = {f.name for f in ps_pb2.InfoReply.DESCRIPTOR.fields} - {"workers"}
        return ps_pb2.InfoReply(
            **{name: getattr(self, name) for name in fields},
            workers=[ps_pb2.WorkerClock(**dataclasses.asdict(w)) for w in self.workers],
        )

    @classmethod
    def from_info(cls, reply: ps_pb2.InfoReply) -> ShardReport:
        """A report as a client reads it back from `Info` (what `Info` does not carry is left
        at its default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {f.name for f in ps_pb2.InfoReply.DESCRIPTOR.fields} & names - {"workers"}
        values: dict[str, Any] = {name: getattr(reply, name) for name in fields}
        for name in ("clock_gap_hist", "staleness_hist"):
            values[name] = tuple(values[name])
        workers = tuple(
            MemberClock(w.worker_id, w.clock, w.last_seq, w.last_seen) for w in reply.workers
        )
        return cls(**values, workers=workers)

    def heartbeat(self, serving_since: float | None) -> dict[str, Any]:
        """What a shard's heartbeat publishes of it in the store (DESIGN §5 Liveness, §9): its
        `ShardNumbers`, the stored contract the readers parse back."""
        return ShardNumbers(
            version=self.version,
            durable_version=self.durable_version,
            replication_lag_max_s=self.replication_lag_max_s,
            updates_applied=self.updates_applied,
            clocks=tuple(self.clocks),
            max_clock_gap=self.max_clock_gap,
            base_version=self.base_version,
            log_entries=self.log_entries,
            restored_version=self.restored_version,
            recovered=None if self.recovered is None else Recovered.from_info(self.recovered),
            serving_since=serving_since,
        ).to_info()

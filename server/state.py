"""The sans-I/O shard state machine (STYLE §2): the protocol.

Events go in (a push, a pull, a pull's deadline passing, a replication completing, the shard
stopping), instructions come out (acknowledge, serve, wait, reject, stop: `messages.py`). The
gRPC servicer and the store replicator are adapters around it that share one lock through
``ShardHost``. This module holds the decisions that are the same for every table: status and
epochs, the members' clocks and the consistency rule, de-duplication by `(worker_id, seq)`, when
an update is applied and when its acknowledgement may leave. What a shard holds is in its
tables (`tables.py`), who it serves in its clock table (`membership.py`), what the store has of
it in its log cursor (`log.py`); the replica's encoding is in ``codec``. ``validate()`` checks
the invariants after every event.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tether.config import ReplicationPolicy
from tether.consistency import blocking_workers, clock_gap, may_read
from tether.store.base import LogEntry, StoreError

from .guard import NormGuard, l2_norm
from .log import LogCursor
from .membership import ClockTable, Membership, WorkerEntry
from .messages import (
    STATUS_ORDER,
    Ack,
    Code,
    PushHeader,
    Reject,
    Serve,
    Status,
    Stop,
    Wait,
)
from .report import MemberClock, ServingCounters, ShardReport
from .spec import ShardSpec, Stats, bump, split_ranges
from .tables import DenseSlice, Table

__all__ = [  # the messages are part of the core's vocabulary, imported from here by adapters
    "Ack", "Code", "PushHeader", "Reject", "Serve", "ShardSpec", "ShardState", "Stats", "Status",
    "Stop", "Wait", "WorkerEntry", "ReplicationPolicy", "split_ranges", "DENSE",
]  # fmt: skip

DENSE = "dense"  # the table of the run's flat parameter vector: today's Push and Pull

# A table's part of a push: its values, or a function that reads them (from a same-host segment,
# DESIGN §2), called only once the push is known not to be a duplicate; None means unreadable.
Part = Any
Parts = Mapping[str, Part | Callable[[], Part | None]]


class ShardState:
    """One shard: its tables, version, epoch, clock and de-dup tables, and log cursor."""

    def __init__(
        self, spec: ShardSpec, params: np.ndarray, epoch: int = 1, restored_version: int = -1
    ) -> None:
        if params.shape != (spec.length,):
            raise ValueError(
                f"shard {spec.shard_id} expects {spec.length} params, got {params.shape}"
            )
        self.spec = spec
        self.dense = DenseSlice(
            params,
            spec.optimizer,
            offset=spec.offset,
            keeps_previous=spec.consistency.aggregates,
            chunk_bytes=spec.chunk_bytes,
            transformation=spec.transformation,
        )
        self.tables: dict[str, Table] = {DENSE: self.dense}
        self.workers = ClockTable(Membership.first(spec.num_workers, spec.worker_ids))
        self.log = LogCursor(spec.replication)
        self.guard = NormGuard(spec.guard, spec.shard_id)  # not shard state: never logged
        self.epoch = epoch
        self.version = 0
        self.revision = 0  # accepted pushes (DESIGN §5)
        self.stats = Stats()
        # How this shard was rebuilt from the store (None: a fresh one): base version, entries
        # replayed, seconds reading and replaying (codec.recover, server/main.py).
        self.recovered: dict[str, Any] | None = None
        self.restored_version = restored_version  # the replicated version it started from; -1
        self.status: Status = "serving"  # fenced: the store says a newer epoch replaced it
        self.applied_tables = self.record()  # as of the last applied update: a base's tables
        self.rebase_invariants()

    def rebase_invariants(self) -> None:
        """Take the state as it is now as validate()'s baseline (also after a restore)."""
        self._validated_version = self.version  # what validate() saw last, for monotonicity
        self._validated_status = self.status
        self.workers.rebase()

    # -- views kept by name (the dense table, the clock table, the log cursor) ----------------

    params = property(lambda self: self.dense.params)
    prev_params = property(lambda self: self.dense.prev_params)
    optimizer = property(lambda self: self.dense.optimizer)
    pending = property(lambda self: self.dense.pending)
    durable_version = property(lambda self: self.log.durable_version)
    base_version = property(lambda self: self.log.base_version)
    unlogged = property(lambda self: self.log.unlogged)
    since_base = property(lambda self: self.log.since_base)

    @property
    def apply_s(self) -> float:
        return self.log.apply_s

    @apply_s.setter
    def apply_s(self, seconds: float) -> None:
        self.log.apply_s = seconds

    @property
    def clocks(self) -> dict[int, int]:
        """Worker id -> iterations received from it, in id order."""
        return self.workers.clocks()

    # -- queries --------------------------------------------------------------------------

    def not_serving(self) -> Reject | None:
        """The refusal every push and pull gets once the shard stopped serving (DESIGN §5)."""
        if self.status == "fenced":
            return Reject(
                Code.FAILED_PRECONDITION,
                f"shard {self.spec.shard_id} at epoch {self.epoch} was replaced by a "
                "newer epoch; re-resolve it from the store",
            )
        if self.status == "stopped":
            return Reject(Code.UNAVAILABLE, "shard is stopping; re-resolve it from the store")
        return None

    def check_info(self, run_id: str) -> Reject | None:
        """A status read names the run it means, or none; it is answered while stopping too."""
        if run_id and run_id != self.spec.run_id:
            return Reject(Code.INVALID_ARGUMENT, f"unknown run {run_id!r}")
        return None

    def _check_member(self, run_id: str, worker_id: int) -> Reject | None:
        if run_id != self.spec.run_id:
            return Reject(
                Code.INVALID_ARGUMENT,
                f"unknown run {run_id!r}: shard {self.spec.shard_id} serves run "
                f"{self.spec.run_id!r}",
            )
        return self.workers.check(worker_id)

    def check_push_header(self, h: PushHeader) -> Reject | None:
        """Everything about a push that can be judged before its bytes arrive."""
        if rejected := self.not_serving():
            return rejected
        if rejected := self._check_member(h.run_id, h.worker_id):
            return rejected
        if h.epoch != self.epoch:
            return Reject(
                Code.FAILED_PRECONDITION,
                f"stale epoch {h.epoch}: shard {self.spec.shard_id} is at epoch {self.epoch}; "
                "pull again",
            )
        if h.length != self.dense.length:
            return Reject(
                Code.INVALID_ARGUMENT,
                f"gradient has {h.length} elements but shard {self.spec.shard_id} holds "
                f"{self.dense.length}",
            )
        entry = self.workers[h.worker_id]
        if h.seq <= entry.last_seq:
            return None  # a retry of an accepted push: acknowledged as a duplicate in push()
        if h.clock > entry.clock:
            return Reject(
                Code.FAILED_PRECONDITION,
                f"clock from the future: worker {h.worker_id} pushed clock {h.clock} but the "
                f"shard has received {entry.clock} iterations from it",
            )
        if h.clock < entry.clock:
            return Reject(
                Code.ABORTED,
                f"worker {h.worker_id} pushed clock {h.clock} with new seq {h.seq}, but clock "
                f"{h.clock} was already received; redo the iteration at clock {entry.clock}",
            )
        if not 0 <= h.read_version <= self.version:
            return Reject(
                Code.INVALID_ARGUMENT,
                f"read version {h.read_version} is outside 0..{self.version} (the shard's version)",
            )
        return None

    # -- events ---------------------------------------------------------------------------

    def push(self, h: PushHeader, parts: Parts | Part, now: float) -> Ack | Reject:
        """A worker's update for its clock: one event, one `seq`, a part per table (a bare part
        is the dense table's, as the wire's Push carries it). Parts are consumed (used as
        scratch); a part may be a function that reads it (see `Parts`)."""
        if rejected := self.check_push_header(h):
            return rejected
        entry = self.workers[h.worker_id]
        bsp = self.spec.consistency.aggregates
        if h.seq <= entry.last_seq:
            # A retry: acknowledged once what it was part of is durable (BSP: its clock).
            needed = h.clock + 1 if bsp else self.version
            applied = not any(h.worker_id in t.held() for t in self.tables.values())
            return Ack(
                self.version, self.epoch, applied, duplicate=True,
                durable_needed=self.log.durable_needed(needed),
            )  # fmt: skip
        given = parts if isinstance(parts, Mapping) else {DENSE: parts}
        if set(given) != set(self.tables):
            return Reject(
                Code.INVALID_ARGUMENT,
                f"a push carries a part for each of the tables {sorted(self.tables)}, "
                f"not {sorted(given)}",
            )
        read: dict[str, Part] = {}
        who = f"worker {h.worker_id} at clock {h.clock}"
        for name, part in given.items():
            if callable(part):
                part = part()
                if part is None:
                    return Reject(
                        Code.FAILED_PRECONDITION,
                        f"shard {self.spec.shard_id} cannot read the gradient's segment; "
                        "pull again",
                    )
            if rejected := self.tables[name].check(part, who):
                return rejected
            read[name] = part
        # The gradient-norm guard (DESIGN §10) reads the dense part only, and only when on.
        norm = l2_norm(read[DENSE]) if self.guard.on else None
        if norm is not None:
            if rejected := self.guard.check(norm, who):
                return rejected
            self.guard.accepted(norm)
        entry.last_seq = h.seq
        entry.clock += 1
        entry.last_seen = now
        self.stats.pushes_accepted += 1
        self.revision += 1
        self.log.changed(now)
        bump(self.stats.staleness_hist, self.version - h.read_version)
        if not bsp:
            self._apply(read)
            return Ack(
                self.version, self.epoch, applied=True,
                durable_needed=self.log.durable_needed(self.version),
            )  # fmt: skip
        # BSP (DESIGN §3): hold the parts until every member pushed this clock. With sync
        # replication the push is acknowledged once its clock is applied and durable.
        for name, part in read.items():
            self.tables[name].hold(h.worker_id, part)
        needed = self.log.durable_needed(h.clock + 1)
        ids = self.workers.membership.ids
        if len(self.dense.held()) < len(ids):
            return Ack(self.version, self.epoch, applied=False, durable_needed=needed)
        self._apply({name: t.aggregate(ids) for name, t in self.tables.items()})
        return Ack(self.version, self.epoch, applied=True, durable_needed=needed)

    def _apply(self, parts: Mapping[str, Part]) -> None:
        """Apply one update, a part per table, and (when the shard replicates) keep what redoes
        it as the log entry of the version it produces (DESIGN §5)."""
        arrays: dict[str, np.ndarray] = {}
        started = time.perf_counter()
        for name, part in parts.items():
            for key, value in self.tables[name].apply(part).items():
                arrays[f"{name}.{key}"] = value
        self._applied(time.perf_counter() - started)
        if self.log.logs:
            self.log.append(LogEntry(self.version, self.applied_tables, arrays))

    def replay(self, position: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Redo a logged update (a recovery, `codec.recover`) from its arrays, named
        `"{table}.{name}"`: applied as it was, not logged again. Raises StoreError unless it is
        the update right after the current version."""
        if position != self.version + 1:
            raise StoreError(
                f"shard {self.spec.shard_id}: log entry {position} does not follow version "
                f"{self.version}"
            )
        started = time.perf_counter()
        for name, table in self.tables.items():
            prefix = name + "."
            table.replay({k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)})
        self._applied(time.perf_counter() - started)

    def _applied(self, took_s: float) -> None:
        self.log.applied(took_s)
        self.version += 1
        self.stats.updates_applied += 1
        if self.log.logs:
            self.applied_tables = self.record()

    @property
    def keeps_gradients(self) -> bool:
        """Whether a pushed gradient outlives its push: held for a BSP clock, or kept as a log
        entry. An adapter that hands push() a view of memory the worker reuses copies it then."""
        return self.spec.consistency.aggregates or self.log.logs

    def record(self) -> dict[str, Any]:
        """The small tables as they stand (JSON): what a log entry or base records besides its
        arrays, and what a recovery restores from the last one it replays."""
        return {
            "version": self.version,
            "revision": self.revision,
            **self.workers.to_meta(),
            "stats": dataclasses.asdict(self.stats),
        }

    def pull(
        self,
        run_id: str,
        worker_id: int,
        clock: int,
        now: float,
        into: np.ndarray | None = None,
    ) -> Serve | Wait | Reject:
        """A worker at `clock` asks for the parameters of its next iteration; served as wire
        chunks, or copied into `into` (the worker's same-host segment) when one is given."""
        if rejected := self.not_serving():
            return rejected
        if rejected := self._check_member(run_id, worker_id):
            return rejected
        entry = self.workers[worker_id]
        bsp = self.spec.consistency.aggregates
        # Under SSP and ASP a worker may pull clock c while its push of c-1 is still in flight
        # (it overlaps communication with computation); the staleness rule below counts that
        # push as not yet received, so the bound holds. BSP never overlaps.
        ahead = 0 if bsp else 1
        if clock < 0 or clock > entry.clock + ahead:
            return Reject(
                Code.FAILED_PRECONDITION,
                f"worker {worker_id} pulled at clock {clock} but shard {self.spec.shard_id} has "
                f"received {entry.clock} iterations from it (a clock from the future)",
            )
        # clock < entry.clock: a restarted worker redoing an iteration some shard already has
        # (its pushes there are duplicates); it reads like any other pull.
        entry.last_seen = now
        clocks = self.workers.clocks()
        if not may_read(self.spec.consistency, clock, clocks):
            return Wait(blocking_workers(self.spec.consistency, clock, clocks))
        version, previous = self.version, False
        if bsp and clock == self.version - 1:
            # BSP: clock `clock` was applied meanwhile; serve the parameters it was computed from.
            version, previous = clock, True
        elif bsp and clock != self.version:
            return Reject(
                Code.FAILED_PRECONDITION,
                f"worker {worker_id} pulled at clock {clock} but shard {self.spec.shard_id} is at "
                f"BSP version {self.version}",
            )
        gap = clock_gap(clock, clocks)
        self.stats.pulls_served += 1
        self.stats.max_clock_gap = max(self.stats.max_clock_gap, gap)
        bump(self.stats.clock_gap_hist, max(gap, 0))
        chunks = self.dense.serve(previous, into)
        return Serve(version, self.epoch, gap, chunks, in_segment=into is not None)

    def observe(self) -> Serve | Reject:
        """A read outside the clock protocol (launcher evaluation, benchmarks)."""
        if rejected := self.not_serving():
            return rejected
        return Serve(self.version, self.epoch, 0, self.dense.serve(False, None))

    def pull_timed_out(self, worker_id: int, clock: int, waited_s: float, now: float) -> Reject:
        """A pull's deadline passed: fail it with the whole picture (DESIGN §3)."""
        blocking = blocking_workers(self.spec.consistency, clock, self.workers.clocks())
        detail = ", ".join(
            f"worker {w} at clock {self.workers[w].clock} "
            f"(last seen {_ago(self.workers[w].last_seen, now)})"
            for w in blocking
        )
        return Reject(
            Code.DEADLINE_EXCEEDED,
            f"shard {self.spec.shard_id}: worker {worker_id} waited {waited_s:.1f}s at clock "
            f"{clock} under {self.spec.consistency.describe()} for {detail or 'no one'}",
        )

    def stop(self, *, fenced: bool) -> Stop:
        """Fail every waiting call and refuse new pushes and pulls: a graceful stop, or a zombie
        learning from the store that a newer epoch replaced it (fenced, DESIGN §5)."""
        self.status = "fenced" if fenced or self.status == "fenced" else "stopped"
        refusal = self.not_serving()
        assert refusal is not None
        return Stop(refusal)

    # -- replication (DESIGN §5): the log cursor decides, the state keeps the statistics -------

    def replication_due(self, now: float) -> bool:
        return self.log.replication_due(now)

    def replication_wait_s(self, now: float) -> float | None:
        return self.log.wait_s(now)

    def log_batch(self) -> list[LogEntry]:
        return self.log.batch()

    def replicated(self, position: int, now: float) -> None:
        """The adapter made the log durable up to `position`."""
        if position <= self.log.durable_version:
            return
        lag = self.log.replicated(position, now)
        self.stats.replications += 1
        if lag is not None:
            self.stats.replication_lag_max_s = max(self.stats.replication_lag_max_s, lag)
            self.stats.replication_lag_sum_s += lag

    @functools.cached_property
    def state_nbytes(self) -> int:
        """Bytes of a base: every table's (fixed for a shard: the shapes never change)."""
        return sum(t.nbytes for t in self.tables.values())

    def compaction_due(self) -> bool:
        return self.log.compaction_due(self.state_nbytes)

    def base_saved(self, version: int) -> None:
        self.log.base_saved(version)

    def replay_estimate_s(self) -> float:
        return self.log.replay_estimate_s()

    def durable_ack(self, ack: Ack, *, waited: bool = False) -> Ack | Wait | Reject:
        """What to answer a push that push() acknowledged with `ack` (DESIGN §5). Wait: its version
        is not durable yet; ask again (waited=True) when the replicator reports progress."""
        if ack.durable_needed <= self.log.durable_version:
            # After a wait, BSP's clock is applied: report the version the worker reads next.
            fresh = Ack(self.version, self.epoch, applied=True, duplicate=ack.duplicate)
            return fresh if waited else ack
        if rejected := self.not_serving():
            return rejected
        return Wait(())

    def push_timed_out(self, worker_id: int, clock: int, waited_s: float) -> Reject:
        """A sync acknowledgement could not be given before its deadline (DESIGN §3, §5)."""
        missing = self.workers.behind(clock)
        why = (
            f"clock {clock} still misses workers {missing}"
            if missing and self.spec.consistency.aggregates
            else f"version {self.version} is not durable yet (durable: {self.durable_version})"
        )
        return Reject(
            Code.DEADLINE_EXCEEDED,
            f"shard {self.spec.shard_id}: the push of worker {worker_id} at clock {clock} waited "
            f"{waited_s:.1f}s: {why}",
        )

    # -- observers ------------------------------------------------------------------------

    def report(self, serving: ServingCounters | None = None) -> ShardReport:
        """The shard's numbers as one frozen value (with the servicer's counters, when given):
        the one source of `InfoReply`, the heartbeat and the run summary (`report.py`)."""
        spec, stats, log = self.spec, self.stats, self.log
        serving = serving or ServingCounters()
        return ShardReport(
            shard_id=spec.shard_id,
            epoch=self.epoch,
            version=self.version,
            offset=spec.offset,
            length=spec.length,
            mode=spec.consistency.mode.value,
            staleness=spec.consistency.staleness,
            updates_applied=stats.updates_applied,
            pushes_accepted=stats.pushes_accepted,
            pulls_served=stats.pulls_served,
            max_clock_gap=stats.max_clock_gap,
            clock_gap_hist=tuple(stats.clock_gap_hist),
            staleness_hist=tuple(stats.staleness_hist),
            workers=tuple(
                MemberClock(w, e.clock, e.last_seq, e.last_seen) for w, e in self.workers.items()
            ),
            replication=spec.replication.mode,
            durable_version=log.durable_version,
            replications=stats.replications,
            replication_lag_max_s=stats.replication_lag_max_s,
            replication_lag_mean_s=stats.replication_lag_sum_s / max(stats.replications, 1),
            restored_version=self.restored_version,
            pull_wait_s=serving.pull_wait_s,
            segment_pulls=serving.segment_pulls,
            segment_pushes=serving.segment_pushes,
            waiting=serving.waiting,
            pushes_rejected_norm=self.guard.rejected,
            base_version=log.base_version,
            log_entries=len(log.since_base),
            recovered=self.recovered,
        )

    # -- invariants (STYLE §3) -------------------------------------------------------------

    def validate(self) -> None:
        """Raise AssertionError when an invariant is broken; tests call it after every event."""
        assert self.version >= self._validated_version, "the version went back"
        self._validated_version = self.version
        for table in self.tables.values():
            table.validate()
        self.workers.validate()
        self.log.validate(self.version)
        self.guard.validate()
        bound = self.spec.consistency.read_bound
        if bound is not None:
            assert self.stats.max_clock_gap <= bound, (
                f"served clock gap {self.stats.max_clock_gap} exceeds the bound {bound}"
            )
        clocks = self.workers.clocks()
        if self.spec.consistency.aggregates:
            # Each BSP clock is applied exactly once: the version counts complete clocks, and
            # only workers one clock ahead of it hold a part in every table.
            assert self.version == min(clocks.values()), (self.version, clocks)
            for name, table in self.tables.items():
                held = set(table.held())
                for w, c in clocks.items():
                    assert c in (self.version, self.version + 1), (w, c, self.version)
                    assert (w in held) == (c == self.version + 1), (name, w, c, held)
        else:
            applied_once = self.version == sum(clocks.values())
            assert applied_once, "an accepted push was not applied exactly once"
        assert self.stats.pushes_accepted == sum(clocks.values())
        assert self.restored_version <= self.version
        order = STATUS_ORDER.index
        assert order(self.status) >= order(self._validated_status), "a stopped shard was revived"
        self._validated_status = self.status


def _ago(t: float, now: float) -> str:
    return "never" if t <= 0 else f"{now - t:.1f}s ago"

"""The sans-I/O shard state machine (STYLE §2).

Events go in (a push, a pull, a pull's deadline passing, a replication completing, the shard
stopping), instructions come out (acknowledge, serve, wait, reject, stop). The gRPC servicer and
the store replicator are adapters around it that share one lock through ``ShardHost``; every
consistency, de-duplication, fencing, durability and barrier decision lives here and is tested
with no sockets and no database. The replica's encoding for the store is in ``codec``.
``validate()`` checks the invariants after every event.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import numpy as np

from tether.config import OptimizerConfig, ReplicationPolicy
from tether.consistency import Consistency, blocking_workers, clock_gap, may_read
from tether.server.optim import Optimizer
from tether.store.base import LogEntry, StoreError
from tether.wire import DEFAULT_CHUNK_BYTES, FLOAT, chunk_bytes_of


class Code(StrEnum):
    """The small error vocabulary, mapped to gRPC status codes once, in the servicer."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # bad input: never retry as is
    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # fenced, stale epoch, clock out of step
    ABORTED = "ABORTED"  # redo pull-compute-push
    UNAVAILABLE = "UNAVAILABLE"  # retry the same call
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # a wait for other workers ran out (DESIGN §3)


# ---- instructions (what the adapter must do) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Reject:
    code: Code
    message: str


@dataclass(frozen=True, slots=True)
class Ack:
    version: int
    epoch: int
    applied: bool  # False: a BSP gradient held until the other workers' arrive
    duplicate: bool = False
    # With sync replication the acknowledgement may only leave once this shard version is
    # durable in the store (DESIGN §5); 0 = nothing to wait for.
    durable_needed: int = 0


@dataclass(frozen=True, slots=True)
class Serve:
    """Send these parameters. The core cuts them into wire chunks itself, under the shard's lock,
    on purpose: it is the one copy a read makes, and no update can interleave with it."""

    version: int
    epoch: int
    clock_gap: int
    chunks: tuple[bytes, ...]  # the shard's slice as little-endian float32 bytes, one snapshot
    # The slice was copied into the buffer the pull named (a same-host segment): no chunks.
    in_segment: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    waiting_for: tuple[int, ...]  # whose clocks hold a pull back; (): an ack awaits durability


# serving -> stopped -> fenced, never back: a stopped shard never serves again (DESIGN §5).
Status = Literal["serving", "stopped", "fenced"]
_STATUS_ORDER: tuple[Status, ...] = ("serving", "stopped", "fenced")


@dataclass(frozen=True, slots=True)
class Stop:
    refusal: Reject  # the shard stopped serving: wake every waiting call, each now gets this


# ---- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushHeader:
    run_id: str
    worker_id: int
    clock: int
    seq: int
    read_version: int
    epoch: int
    length: int


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """What a shard is: its place in the run and the rules it serves by."""

    run_id: str
    shard_id: int
    offset: int
    length: int
    num_workers: int
    consistency: Consistency
    optimizer: OptimizerConfig
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    replication: ReplicationPolicy = ReplicationPolicy()
    # The task's own optax transformation (its `optimizer()`), used in place of `optimizer`'s
    # named one; None for the named one (DESIGN §11).
    transformation: Any = None


@dataclass(slots=True)
class WorkerEntry:
    clock: int = 0  # iterations received from this worker
    last_seq: int = -1  # the de-duplication table: highest seq accepted
    last_seen: float = 0.0  # unix time of the last push or pull, for timeout messages


@dataclass(slots=True)
class Stats:
    updates_applied: int = 0
    pushes_accepted: int = 0
    pulls_served: int = 0
    max_clock_gap: int = 0
    clock_gap_hist: list[int] = field(default_factory=list)
    staleness_hist: list[int] = field(default_factory=list)
    replications: int = 0
    replication_lag_max_s: float = 0.0  # first unreplicated change -> durable
    replication_lag_sum_s: float = 0.0


def _bump(hist: list[int], index: int) -> None:
    if index >= len(hist):
        hist.extend([0] * (index + 1 - len(hist)))
    hist[index] += 1


def split_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """Balanced contiguous (offset, length) ranges of a flat vector (DESIGN §2)."""
    if parts < 1 or total < parts:
        raise ValueError(f"cannot split {total} parameters into {parts} shards")
    bounds = [total * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)]


class ShardState:
    """One shard's parameters, optimizer state, version, epoch, clock and de-dup tables."""

    def __init__(
        self, spec: ShardSpec, params: np.ndarray, epoch: int = 1, restored_version: int = -1
    ) -> None:
        if params.shape != (spec.length,):
            raise ValueError(
                f"shard {spec.shard_id} expects {spec.length} params, got {params.shape}"
            )
        self.spec = spec
        self.params = np.array(params, dtype=FLOAT, copy=True)
        # The offset aligns the optimizer's compiled blocks to the run's flat vector, so every
        # element goes through the same code whatever the shard count (DESIGN §3, §4).
        self.optimizer = Optimizer(
            spec.optimizer, spec.length, offset=spec.offset, transformation=spec.transformation
        )
        self.epoch = epoch
        self.version = 0
        self.workers = [WorkerEntry() for _ in range(spec.num_workers)]
        self.pending: dict[int, np.ndarray] = {}  # BSP: worker id -> gradient of the open clock
        # BSP keeps the parameters of the previous version: a worker restarted between its pushes
        # to two shards must recompute its gradient from the same parameters (DESIGN §5).
        self.prev_params = self.params.copy() if spec.consistency.aggregates else None
        self.stats = Stats()
        # Replication bookkeeping (DESIGN §5): `revision` counts accepted pushes; every applied
        # update becomes a log entry (`unlogged` until the replicator reports it durable through
        # replicated()); `durable_version` is the store's last log position.
        self.revision = 0
        self.durable_version = 0
        self.unlogged: list[LogEntry] = []
        self.dirty_since: float | None = None  # time of the first entry not yet durable
        self.last_replicated_at = 0.0
        # Compaction (DESIGN §5): the base the store holds, and per durable entry after it
        # (position, bytes, estimated replay seconds), which the compaction budget is judged on.
        self.base_version = 0
        self.since_base: deque[tuple[int, int, float]] = deque()
        self.apply_s = 0.0  # moving average of one optimizer apply, for the replay estimate
        # How this shard was rebuilt from the store (None: a fresh one): base version, entries
        # replayed, seconds reading and replaying (codec.recover, server/main.py).
        self.recovered: dict[str, Any] | None = None
        self.restored_version = restored_version  # the replicated version it started from; -1
        self.status: Status = "serving"  # fenced: the store says a newer epoch replaced it
        self.applied_tables = self.tables()  # as of the last applied update: a base's tables
        self.rebase_invariants()

    def rebase_invariants(self) -> None:
        """Take the state as it is now as validate()'s baseline (also after a restore)."""
        self._validated_version = self.version  # what validate() saw last, for monotonicity
        self._validated_seqs = [w.last_seq for w in self.workers]
        self._validated_status = self.status

    # -- queries --------------------------------------------------------------------------

    @property
    def clocks(self) -> list[int]:
        return [w.clock for w in self.workers]

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
        if not 0 <= worker_id < self.spec.num_workers:
            return Reject(
                Code.INVALID_ARGUMENT,
                f"unknown worker {worker_id}: the run has workers 0..{self.spec.num_workers - 1}",
            )
        return None

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
        if h.length != self.spec.length:
            return Reject(
                Code.INVALID_ARGUMENT,
                f"gradient has {h.length} elements but shard {self.spec.shard_id} holds "
                f"{self.spec.length}",
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

    def push(
        self, h: PushHeader, grad: np.ndarray | Callable[[], np.ndarray | None], now: float
    ) -> Ack | Reject:
        """A worker's gradient for its clock; `grad` is consumed (used as scratch). It may be a
        function that reads the values (from a same-host segment, DESIGN §2): called only once
        the push is known not to be a duplicate; None from it means they cannot be read."""
        if rejected := self.check_push_header(h):
            return rejected
        entry = self.workers[h.worker_id]
        bsp = self.spec.consistency.aggregates
        if h.seq <= entry.last_seq:
            # A retry: acknowledged once what it was part of is durable (BSP: its clock).
            needed = h.clock + 1 if bsp else self.version
            applied = h.worker_id not in self.pending
            return Ack(
                self.version, self.epoch, applied, duplicate=True,
                durable_needed=self._durable_needed(needed),
            )  # fmt: skip
        if callable(grad):
            read = grad()
            if read is None:
                return Reject(
                    Code.FAILED_PRECONDITION,
                    f"shard {self.spec.shard_id} cannot read the gradient's segment; pull again",
                )
            grad = read
        if grad.dtype != FLOAT or grad.shape != (self.spec.length,):
            return Reject(Code.INVALID_ARGUMENT, "gradient is not a flat float32 vector")
        if not _all_finite(grad):
            return Reject(
                Code.INVALID_ARGUMENT,
                f"gradient from worker {h.worker_id} at clock {h.clock} contains NaN or Inf",
            )
        entry.last_seq = h.seq
        entry.clock += 1
        entry.last_seen = now
        self.stats.pushes_accepted += 1
        self.revision += 1
        if self.dirty_since is None:
            self.dirty_since = now
        _bump(self.stats.staleness_hist, self.version - h.read_version)
        if not bsp:
            self._apply(grad)
            return Ack(
                self.version, self.epoch, applied=True,
                durable_needed=self._durable_needed(self.version),
            )  # fmt: skip
        # BSP (DESIGN §3): hold the gradient until all W workers pushed this clock. With sync
        # replication the push is acknowledged once its clock is applied and durable.
        self.pending[h.worker_id] = grad
        needed = self._durable_needed(h.clock + 1)
        if len(self.pending) < self.spec.num_workers:
            return Ack(self.version, self.epoch, applied=False, durable_needed=needed)
        # Sum in worker-id order, then average: the order is fixed so results are bit-for-bit
        # reproducible and independent of arrival order.
        total = self.pending.pop(0)
        for w in range(1, self.spec.num_workers):
            np.add(total, self.pending.pop(w), out=total)
        np.divide(total, np.float32(self.spec.num_workers), out=total)
        self._apply(total)
        return Ack(self.version, self.epoch, applied=True, durable_needed=needed)

    def _durable_needed(self, version: int) -> int:
        """The log position that must be durable before an acknowledgement of `version` leaves:
        all of it under sync; under async all but the last `every_updates`, which bounds both
        what a crash may lose and the entries held in memory (DESIGN §5)."""
        policy = self.spec.replication
        if policy.mode == "sync":
            return version
        if policy.mode == "async":
            return max(0, version - policy.every_updates)
        return 0

    def _apply(self, grad: np.ndarray, *, log: bool = True) -> None:
        """Apply one update (the optimizer only reads `grad`) and, when the shard replicates,
        keep `grad` as its log entry: it is what redoes the update exactly (DESIGN §5)."""
        if self.prev_params is not None:
            np.copyto(self.prev_params, self.params)
        started = time.perf_counter()
        self.optimizer.apply(self.params, grad)
        took = time.perf_counter() - started
        self.apply_s = took if self.apply_s == 0 else 0.8 * self.apply_s + 0.2 * took
        self.version += 1
        self.stats.updates_applied += 1
        if self.spec.replication.mode != "off":
            self.applied_tables = self.tables()
            if log:
                self.unlogged.append(LogEntry(self.version, self.applied_tables, {"grad": grad}))

    def replay(self, position: int, grad: np.ndarray) -> None:
        """Redo a logged update (a recovery, `codec.recover`): applied as it was, not logged
        again. Raises StoreError unless it is the update right after the current version."""
        if position != self.version + 1:
            raise StoreError(
                f"shard {self.spec.shard_id}: log entry {position} does not follow version "
                f"{self.version}"
            )
        self._apply(grad, log=False)

    @property
    def keeps_gradients(self) -> bool:
        """Whether a pushed gradient outlives its push: held for a BSP clock, or kept as a log
        entry. An adapter that hands push() a view of memory the worker reuses copies it then."""
        return self.spec.consistency.aggregates or self.spec.replication.mode != "off"

    def tables(self) -> dict[str, Any]:
        """The small tables as they stand (JSON): what a log entry or base records besides its
        arrays, and what a recovery restores from the last one it replays."""
        return {
            "version": self.version,
            "revision": self.revision,
            "clocks": self.clocks,
            "last_seq": [w.last_seq for w in self.workers],
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
        # Under SSP and ASP a worker may pull clock c while its push of c-1 is still in flight
        # (it overlaps communication with computation); the staleness rule below counts that
        # push as not yet received, so the bound holds. BSP never overlaps.
        ahead = 0 if self.spec.consistency.aggregates else 1
        if clock < 0 or clock > entry.clock + ahead:
            return Reject(
                Code.FAILED_PRECONDITION,
                f"worker {worker_id} pulled at clock {clock} but shard {self.spec.shard_id} has "
                f"received {entry.clock} iterations from it (a clock from the future)",
            )
        # clock < entry.clock: a restarted worker redoing an iteration some shard already has
        # (its pushes there are duplicates); it reads like any other pull.
        entry.last_seen = now
        clocks = self.clocks
        if not may_read(self.spec.consistency, clock, clocks):
            return Wait(blocking_workers(self.spec.consistency, clock, clocks))
        version, params = self.version, self.params
        if self.prev_params is not None and clock == self.version - 1:
            # BSP: clock `clock` was applied meanwhile; serve the parameters it was computed from.
            version, params = clock, self.prev_params
        elif self.prev_params is not None and clock != self.version:
            return Reject(
                Code.FAILED_PRECONDITION,
                f"worker {worker_id} pulled at clock {clock} but shard {self.spec.shard_id} is at "
                f"BSP version {self.version}",
            )
        gap = clock_gap(clock, clocks)
        self.stats.pulls_served += 1
        self.stats.max_clock_gap = max(self.stats.max_clock_gap, gap)
        _bump(self.stats.clock_gap_hist, max(gap, 0))
        if into is not None:
            np.copyto(into, params)  # the one copy, under the lock like the chunks'
            return Serve(version, self.epoch, gap, (), in_segment=True)
        return Serve(version, self.epoch, gap, self._chunks(params))

    def observe(self) -> Serve | Reject:
        """A read outside the clock protocol (launcher evaluation, benchmarks)."""
        if rejected := self.not_serving():
            return rejected
        return Serve(self.version, self.epoch, 0, self._chunks(self.params))

    def pull_timed_out(self, worker_id: int, clock: int, waited_s: float, now: float) -> Reject:
        """A pull's deadline passed: fail it with the whole picture (DESIGN §3)."""
        blocking = blocking_workers(self.spec.consistency, clock, self.clocks)
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

    def _chunks(self, params: np.ndarray) -> tuple[bytes, ...]:
        """The slice as wire chunks: one copy, taken while no update can interleave (Serve)."""
        return tuple(chunk_bytes_of(params, self.spec.chunk_bytes))

    def stop(self, *, fenced: bool) -> Stop:
        """Fail every waiting call and refuse new pushes and pulls: a graceful stop, or a zombie
        learning from the store that a newer epoch replaced it (fenced, DESIGN §5)."""
        self.status = "fenced" if fenced or self.status == "fenced" else "stopped"
        refusal = self.not_serving()
        assert refusal is not None
        return Stop(refusal)

    # -- replication (DESIGN §5) ----------------------------------------------------------

    def replication_due(self, now: float) -> bool:
        """Should the adapter append the unlogged entries to the store now?"""
        if not self.unlogged:
            return False
        policy = self.spec.replication
        if policy.mode == "sync":
            return True
        if policy.mode == "async":
            started = self.dirty_since if self.dirty_since is not None else now
            return len(self.unlogged) >= policy.every_updates or now - started >= policy.interval_s
        return False

    def replication_wait_s(self, now: float) -> float | None:
        """How long until an async append falls due by time (None: nothing pending)."""
        if not self.unlogged or self.dirty_since is None:
            return None
        return max(0.0, self.dirty_since + self.spec.replication.interval_s - now)

    def log_batch(self) -> list[LogEntry]:
        """The entries to append next: every unlogged one (a group commit; no copy is made,
        the optimizer never writes a gradient it applied)."""
        return list(self.unlogged)

    def replicated(self, position: int, now: float) -> None:
        """The adapter made the log durable up to `position`."""
        if position <= self.durable_version:
            return
        self.durable_version = position
        while self.unlogged and self.unlogged[0].position <= position:
            entry = self.unlogged.pop(0)
            self.since_base.append((entry.position, entry.nbytes, self.replay_cost_s(entry.nbytes)))
        self.stats.replications += 1
        if self.dirty_since is not None:
            lag = now - self.dirty_since
            self.stats.replication_lag_max_s = max(self.stats.replication_lag_max_s, lag)
            self.stats.replication_lag_sum_s += lag
        # Entries after the batch are still pending: they are at most `now` old.
        self.dirty_since = now if self.unlogged else None
        self.last_replicated_at = now

    # -- compaction (DESIGN §5) --------------------------------------------------------------

    @functools.cached_property
    def state_nbytes(self) -> int:
        """Bytes of a base: parameters, previous parameters and per-element optimizer state
        (fixed for a shard: the shapes never change)."""
        arrays = self.optimizer.state_arrays().values()
        n = self.params.nbytes + sum(a.nbytes for a in arrays if a.ndim == 1 and a.size > 1)
        return n + (0 if self.prev_params is None else self.prev_params.nbytes)

    def replay_cost_s(self, nbytes: int) -> float:
        """Estimated seconds a recovery spends replaying one entry of `nbytes`."""
        return self.apply_s + REPLAY_FIXED_S + nbytes / REPLAY_READ_BPS

    def replay_estimate_s(self) -> float:
        """Seconds a recovery would spend replaying the durable log after the base."""
        return sum(cost for _, _, cost in self.since_base)

    def compaction_due(self) -> bool:
        """Is the durable log past its budget, so that a new base should be written? The budget
        is replay time (`compact_replay_s`) once the log holds `COMPACT_MIN_FACTOR` bases' worth
        of bytes (so bases never cost more than half of what the log writes), and bytes alone at
        `COMPACT_LOG_FACTOR` bases' worth."""
        if not self.since_base:
            return False
        logged = sum(n for _, n, _ in self.since_base)
        base = self.state_nbytes
        return (
            self.replay_estimate_s() >= self.spec.replication.compact_replay_s
            and logged >= COMPACT_MIN_FACTOR * base
        ) or logged >= COMPACT_LOG_FACTOR * base

    def base_saved(self, version: int) -> None:
        """The store now holds a base at `version`: the entries up to it no longer count."""
        self.base_version = max(self.base_version, version)
        while self.since_base and self.since_base[0][0] <= version:
            self.since_base.popleft()

    def durable_ack(self, ack: Ack, *, waited: bool = False) -> Ack | Wait | Reject:
        """What to answer a push that push() acknowledged with `ack` (DESIGN §5). Wait: its version
        is not durable yet; ask again (waited=True) when the replicator reports progress."""
        if ack.durable_needed <= self.durable_version:
            # After a wait, BSP's clock is applied: report the version the worker reads next.
            fresh = Ack(self.version, self.epoch, applied=True, duplicate=ack.duplicate)
            return fresh if waited else ack
        if rejected := self.not_serving():
            return rejected
        return Wait(())

    def push_timed_out(self, worker_id: int, clock: int, waited_s: float) -> Reject:
        """A sync acknowledgement could not be given before its deadline (DESIGN §3, §5)."""
        missing = [w for w, e in enumerate(self.workers) if e.clock <= clock]
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

    # -- invariants (STYLE §3) -------------------------------------------------------------

    def validate(self) -> None:
        """Raise AssertionError when an invariant is broken; tests call it after every event."""
        assert self.version >= self._validated_version, "the version went back"
        self._validated_version = self.version
        assert self.params.dtype == FLOAT and self.params.shape == (self.spec.length,)
        bound = self.spec.consistency.read_bound
        if bound is not None:
            assert self.stats.max_clock_gap <= bound, (
                f"served clock gap {self.stats.max_clock_gap} exceeds the bound {bound}"
            )
        clocks = self.clocks
        if self.spec.consistency.aggregates:
            # Each BSP clock is applied exactly once: the version counts complete clocks, and
            # only workers one clock ahead of it hold a pending gradient.
            assert self.version == min(clocks), (self.version, clocks)
            for w, c in enumerate(clocks):
                assert c in (self.version, self.version + 1), (w, c, self.version)
                assert (w in self.pending) == (c == self.version + 1), (w, c, self.pending.keys())
        else:
            assert self.version == sum(clocks), "an accepted push was not applied exactly once"
        assert self.stats.pushes_accepted == sum(clocks)
        assert self.durable_version <= self.version
        assert self.base_version <= self.durable_version
        positions = [e.position for e in self.unlogged]
        # The unlogged entries are exactly the versions past the durable log, in order.
        assert positions == list(range(self.durable_version + 1, self.version + 1)) or (
            self.spec.replication.mode == "off" and not positions
        ), (positions, self.durable_version, self.version)
        seqs = [w.last_seq for w in self.workers]
        # An accepted seq is never accepted again: the de-dup table only moves forward.
        assert all(a >= b for a, b in zip(seqs, self._validated_seqs, strict=True)), seqs
        self._validated_seqs = seqs
        assert self.restored_version <= self.version
        order = _STATUS_ORDER.index
        assert order(self.status) >= order(self._validated_status), "a stopped shard was revived"
        self._validated_status = self.status


# The replay estimate of one log entry: the optimizer's apply (measured), a fixed cost per
# entry (opening, decoding) and its bytes at a conservative read rate.
REPLAY_FIXED_S = 2e-4
REPLAY_READ_BPS = 1e9
# The log is compacted once it holds this many bases' worth of bytes, whatever the replay time,
# and not before it holds COMPACT_MIN_FACTOR bases' worth, whatever the replay budget: a base
# then costs at most half of what the log writes (a 32M-parameter shard's 0.25 s of replay is
# two entries, and writing its 270 MB base every two clocks doubled the bytes per clock).
COMPACT_LOG_FACTOR = 8.0
COMPACT_MIN_FACTOR = 2.0


def _all_finite(a: np.ndarray) -> bool:
    # A finite sum proves every element finite (NaN and Inf propagate); only when the sum is not
    # finite (Inf/NaN, or overflow of large finite values) is the full elementwise check paid.
    # The float32 sum allocates nothing and is 4x faster than a float64 one on the push path.
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(np.add.reduce(a))):
            return True
    return bool(np.isfinite(a).all())


def _ago(t: float, now: float) -> str:
    return "never" if t <= 0 else f"{now - t:.1f}s ago"

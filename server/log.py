"""A shard's replication-log cursor (DESIGN §5): what is applied but not yet durable, what the
store holds, and when to append or compact. Pure bookkeeping, like raft's `log_unstable`: no
I/O, no lock, no parameters; the shard core (`state.py`) feeds it and the replication adapters
(`replication.py`) act on its answers. `validate()` checks its invariants after every event.
"""

from __future__ import annotations

from collections import deque

from tether.config import ReplicationPolicy
from tether.store.base import LogEntry

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


class LogCursor:
    """Where a shard's log stands: `unlogged` entries (applied, not yet durable, in position
    order), the store's `durable_version` and `base_version`, and per durable entry after the
    base (position, bytes, estimated replay seconds), which the compaction budget is judged on.
    """

    def __init__(self, policy: ReplicationPolicy, durable_version: int = 0) -> None:
        self.policy = policy
        self.durable_version = durable_version
        self.base_version = durable_version
        self.unlogged: list[LogEntry] = []
        self.dirty_since: float | None = None  # time of the first change not yet durable
        self.last_replicated_at = 0.0
        self.since_base: deque[tuple[int, int, float]] = deque()
        self.apply_s = 0.0  # moving average of one update's apply, for the replay estimate

    @property
    def logs(self) -> bool:
        return self.policy.mode != "off"

    # -- events from the core ---------------------------------------------------------------

    def changed(self, now: float) -> None:
        """A push was accepted: the state is ahead of the store from `now` on."""
        if self.dirty_since is None:
            self.dirty_since = now

    def applied(self, took_s: float) -> None:
        """An update was applied (or replayed) in `took_s` seconds."""
        self.apply_s = took_s if self.apply_s == 0 else 0.8 * self.apply_s + 0.2 * took_s

    def append(self, entry: LogEntry) -> None:
        """An applied update's entry, to be appended to the store next."""
        self.unlogged.append(entry)

    def recovered(self, version: int, entries: list[LogEntry]) -> None:
        """A recovery replayed `entries` after the base: all of it is durable at `version`, and
        the entries count against the compaction budget at the step time the replay measured."""
        self.durable_version = version
        for e in entries:
            self.since_base.append((e.position, e.nbytes, self.replay_cost_s(e.nbytes)))

    # -- replication --------------------------------------------------------------------------

    def durable_needed(self, version: int) -> int:
        """The log position that must be durable before an acknowledgement of `version` leaves:
        all of it under sync; under async all but the last `every_updates`, which bounds both
        what a crash may lose and the entries held in memory (DESIGN §5)."""
        if self.policy.mode == "sync":
            return version
        if self.policy.mode == "async":
            return max(0, version - self.policy.every_updates)
        return 0

    def replication_due(self, now: float) -> bool:
        """Should the adapter append the unlogged entries to the store now?"""
        if not self.unlogged:
            return False
        if self.policy.mode == "sync":
            return True
        if self.policy.mode == "async":
            started = self.dirty_since if self.dirty_since is not None else now
            return (
                len(self.unlogged) >= self.policy.every_updates
                or now - started >= self.policy.interval_s
            )
        return False

    def wait_s(self, now: float) -> float | None:
        """How long until an async append falls due by time (None: nothing pending)."""
        if not self.unlogged or self.dirty_since is None:
            return None
        return max(0.0, self.dirty_since + self.policy.interval_s - now)

    def batch(self) -> list[LogEntry]:
        """The entries to append next: every unlogged one (a group commit; no copy is made,
        the optimizer never writes a gradient it applied)."""
        return list(self.unlogged)

    def replicated(self, position: int, now: float) -> float | None:
        """The adapter made the log durable up to `position`. Returns the replication lag (first
        change not durable -> now) when this moved the durable version, else None."""
        if position <= self.durable_version:
            return None
        self.durable_version = position
        while self.unlogged and self.unlogged[0].position <= position:
            entry = self.unlogged.pop(0)
            self.since_base.append((entry.position, entry.nbytes, self.replay_cost_s(entry.nbytes)))
        lag = None if self.dirty_since is None else now - self.dirty_since
        # Entries after the batch are still pending: they are at most `now` old.
        self.dirty_since = now if self.unlogged else None
        self.last_replicated_at = now
        return lag

    # -- compaction -------------------------------------------------------------------------

    def replay_cost_s(self, nbytes: int) -> float:
        """Estimated seconds a recovery spends replaying one entry of `nbytes`."""
        return self.apply_s + REPLAY_FIXED_S + nbytes / REPLAY_READ_BPS

    def replay_estimate_s(self) -> float:
        """Seconds a recovery would spend replaying the durable log after the base."""
        return sum(cost for _, _, cost in self.since_base)

    def compaction_due(self, base_nbytes: int) -> bool:
        """Is the durable log past its budget, so that a new base (of `base_nbytes`) should be
        written? The budget is replay time (`compact_replay_s`) once the log holds
        `COMPACT_MIN_FACTOR` bases' worth of bytes (so bases never cost more than half of what
        the log writes), and bytes alone at `COMPACT_LOG_FACTOR` bases' worth."""
        if not self.since_base:
            return False
        logged = sum(n for _, n, _ in self.since_base)
        return (
            self.replay_estimate_s() >= self.policy.compact_replay_s
            and logged >= COMPACT_MIN_FACTOR * base_nbytes
        ) or logged >= COMPACT_LOG_FACTOR * base_nbytes

    def base_saved(self, version: int) -> None:
        """The store now holds a base at `version`: the entries up to it no longer count."""
        self.base_version = max(self.base_version, version)
        while self.since_base and self.since_base[0][0] <= version:
            self.since_base.popleft()

    # -- invariants (STYLE §3) ----------------------------------------------------------------

    def validate(self, version: int) -> None:
        """Raise AssertionError when an invariant is broken, for a state at `version`."""
        assert self.durable_version <= version, (self.durable_version, version)
        assert self.base_version <= self.durable_version, (self.base_version, self.durable_version)
        positions = [e.position for e in self.unlogged]
        # The unlogged entries are exactly the versions past the durable log, in order.
        assert positions == list(range(self.durable_version + 1, version + 1)) or (
            not self.logs and not positions
        ), (positions, self.durable_version, version)
        counted = [p for p, _, _ in self.since_base]
        # The compaction budget counts durable entries after the base, each once, in order.
        assert counted == sorted(set(counted)), counted
        assert all(self.base_version < p <= self.durable_version for p in counted), (
            counted, self.base_version, self.durable_version,
        )  # fmt: skip

"""A member's record parsed once, and the one view of a run with one aliveness rule (DESIGN §5, §9).

`MemberView.of(member)` reads a store record (`tether.store.Member`, whose `info` is the object
the member's heartbeats merged into, `tether.member.report`) once into a frozen, typed value, as
pymongo parses a `hello` reply once into a `ServerDescription`: the common fields, what the
heartbeat thread adds (`BeatReport`) and the role's own numbers (`ShardNumbers`,
`WorkerReport`, `LauncherReport`, all in `tether.member.report`). Everything that reads members
uses it -- the driver, the worker's re-resolution, `tether status`, the chaos timeline -- and
none reads `info` by key. A field that a record does not carry (a member still starting, a run
written by an older version) is None.

`RunView` is a run as a reader of the store sees it: its members, and whether each is alive,
decided by one rule (`is_alive`) with the liveness detector's lease (`lease`, DESIGN §5
Liveness). The launcher's progress line and `tether status` both render it. `observe` is pure:
the previous view and a new read of the records in, an updated copy out (pymongo's
`updated_topology_description`), so a reader that keeps reading (the launcher) learns each
member's heartbeat intervals and its lease adapts, while a reader with one read (`tether status`)
has no interval yet and uses the floor -- as the detector does for a member it has not seen beat
twice.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tether.config import LivenessPolicy, RunConfig
from tether.member.report import (
    BeatReport,
    LauncherReport,
    ShardNumbers,
    WorkerReport,
    parse,
)
from tether.store import Member, Role

# -- one member's record ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberView:
    """One registration of a process in a run, parsed from its store record once."""

    run_id: str
    role: Role
    member_id: int
    epoch: int
    address: str  # "host:port" a shard serves and a worker's liveness probe answers on
    pid: int
    host: str
    started_at: float  # unix time of the registration
    heartbeat: float  # unix time of the last heartbeat, as the store took it
    state: str  # "running" | "exited" | "failed"
    phase: str | None = None  # a shard's "starting"/"serving", the launcher's "train"
    beat: BeatReport = field(default_factory=BeatReport)
    shard: ShardNumbers | None = None  # a shard's numbers (role "server")
    worker: WorkerReport | None = None  # a worker's report (role "worker")
    launcher: LauncherReport | None = None  # the driver's report (role "launcher")

    @classmethod
    def of(cls, m: Member) -> MemberView:
        info: Mapping[str, Any] = m.info if isinstance(m.info, Mapping) else {}
        return cls(
            run_id=m.run_id,
            role=m.role,
            member_id=m.member_id,
            epoch=m.epoch,
            address=m.address,
            pid=m.pid,
            host=m.host,
            started_at=m.started_at,
            heartbeat=m.heartbeat,
            state=m.state,
            phase=parse(str, info.get("phase")),
            beat=BeatReport.from_info(info),
            shard=ShardNumbers.from_info(info) if m.role == "server" else None,
            worker=WorkerReport.from_info(info) if m.role == "worker" else None,
            launcher=LauncherReport.from_info(info) if m.role == "launcher" else None,
        )

    @property
    def key(self) -> tuple[str, int]:
        return (self.role, self.member_id)

    @property
    def ready_at(self) -> float | None:
        """When this registration started serving (unix time): a shard once its state is loaded
        and gRPC is up, a worker once its clock was read back from the shards; else None. What
        ends start-up for the detector and a recovery for the supervisor (DESIGN §5)."""
        if self.shard is not None:
            return self.shard.serving_since
        if self.worker is not None:
            return self.worker.resumed_at
        return None

    @property
    def serving(self) -> bool:
        return self.ready_at is not None

    @property
    def clock(self) -> int | None:
        """A worker's clock (iterations done); None for other roles or before its first report."""
        return None if self.worker is None else self.worker.clock

    @property
    def version(self) -> int | None:
        """A shard's parameter version; None for other roles or before it serves."""
        return None if self.shard is None else self.shard.version

    @property
    def spawn(self) -> str:
        """The driver's token for the start that made this process ("" if it reported none)."""
        return self.beat.spawn or ""

    @property
    def metrics_url(self) -> str | None:
        """Its Prometheus endpoint, when it serves one (`--metrics-port`, DESIGN §13)."""
        return self.beat.metrics_url

    @property
    def heartbeats_skipped(self) -> int:
        return self.beat.heartbeats_skipped or 0

    @property
    def peak_rss_bytes(self) -> int | None:
        return self.beat.peak_rss_bytes


def member_views(members: Iterable[Member]) -> list[MemberView]:
    return [MemberView.of(m) for m in members]


# -- the aliveness rule -------------------------------------------------------------------------


def lease(policy: LivenessPolicy, intervals: Iterable[float]) -> float:
    """How long a member's heartbeat may be silent before it is no longer taken as alive: the
    run's lease (`--lease`), or `adaptive_factor` times the longest of its recent heartbeat
    intervals, capped at `lease_cap_s` (DESIGN §5 Liveness). The liveness detector suspects a
    member past this lease; every view calls it not alive past it."""
    longest = max(intervals, default=0.0)
    return min(policy.lease_cap_s, max(policy.lease_s, policy.adaptive_factor * longest))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True, slots=True)
class Here:
    """Where the reader runs: a pid can only be checked on its own host."""

    host: str
    pid_alive: Callable[[int], bool]

    @classmethod
    def this_host(cls) -> Here:
        return cls(socket.gethostname(), pid_alive)


def is_alive(m: MemberView, age_s: float, lease_s: float, here: Here) -> bool:
    """The one aliveness rule: running, heard from within its lease and, on the reader's host,
    a live pid."""
    if m.state != "running" or age_s > lease_s:
        return False
    return m.host != here.host or here.pid_alive(m.pid)


# -- a run --------------------------------------------------------------------------------------

# One registration: (role, member id, epoch). A restarted member is a new registration.
Registration = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class Beats:
    """The heartbeats a reader has seen of one registration: the last value (the store's time)
    and the intervals between successive values, the newest `LivenessPolicy.history` of them."""

    last: float
    intervals: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class MemberLife:
    """A member as one read of the run saw it: alive or not, and why."""

    view: MemberView
    alive: bool
    heartbeat_age_s: float  # at the read
    lease_s: float  # the lease the rule applied

    @property
    def why_not_alive(self) -> str | None:
        """None when alive; else a few words: "exited", "failed", "silent 7s", "no process"."""
        if self.alive:
            return None
        if self.view.state != "running":
            return self.view.state
        if self.heartbeat_age_s > self.lease_s:
            return f"silent {self.heartbeat_age_s:.0f}s"
        return "no process"


@dataclass(frozen=True, slots=True)
class RunView:
    """A run's members and whether each is alive, as of one read (`at`, unix time)."""

    run_id: str
    at: float
    policy: LivenessPolicy
    members: tuple[MemberLife, ...] = ()
    beats: Mapping[Registration, Beats] = field(default_factory=dict)

    def role(self, role: str) -> list[MemberLife]:
        return [life for life in self.members if life.view.role == role]

    @property
    def workers(self) -> list[MemberLife]:
        return self.role("worker")

    @property
    def launcher(self) -> MemberView | None:
        found = self.role("launcher")
        return found[0].view if found else None


def observe(
    previous: RunView | None,
    run_id: str,
    members: Sequence[MemberView],
    policy: LivenessPolicy,
    *,
    now: float,
    here: Here,
) -> RunView:
    """The run after one more read of its records (`now`, unix time): an updated copy of
    `previous` (None: the first read), which is not modified. Heartbeat intervals are the
    differences between successive heartbeat values of one registration, on the store's clock,
    so they do not depend on how often the reader reads; only registrations still present are
    remembered."""
    known = previous.beats if previous is not None and previous.run_id == run_id else {}
    beats: dict[Registration, Beats] = {}
    lives: list[MemberLife] = []
    for m in members:
        key = (m.role, m.member_id, m.epoch)
        seen = known.get(key)
        if seen is None or m.heartbeat < seen.last:
            now_beats = Beats(m.heartbeat)
        elif m.heartbeat > seen.last:
            intervals = (*seen.intervals, m.heartbeat - seen.last)[-policy.history :]
            now_beats = Beats(m.heartbeat, intervals)
        else:
            now_beats = seen
        beats[key] = now_beats
        age_s = now - m.heartbeat
        lease_s = lease(policy, now_beats.intervals)
        lives.append(MemberLife(m, is_alive(m, age_s, lease_s, here), age_s, lease_s))
    return RunView(run_id, now, policy, tuple(lives), beats)


def run_liveness(config: Mapping[str, Any]) -> LivenessPolicy:
    """The liveness settings a run was launched with, from its stored config; a config that
    is not a whole `RunConfig` (written by another version) gives its `lease_s`, else the
    default."""
    try:
        return RunConfig.from_dict(dict(config)).liveness_policy
    except (TypeError, ValueError):
        default = LivenessPolicy()
        lease_s = parse(float, config.get("lease_s")) or default.lease_s
        if not 0 < lease_s < float("inf"):
            lease_s = default.lease_s
        return LivenessPolicy(lease_s=lease_s, lease_cap_s=max(default.lease_cap_s, lease_s))

"""Failure detection that tells slow from dead, as a state machine with no I/O (DESIGN §5).

The launcher feeds it what it observes -- a member was spawned, its heartbeat in the store moved
on, it started serving, a direct probe answered or failed -- and asks it on every tick what to do:
probe a member, or kill it with a recorded cause. Nothing here reads a clock or a socket; times
are the caller's monotonic seconds.

The rules (docs/liveness.md explains why each exists):

- A member is *starting* from its spawn until it serves (a shard: state loaded and gRPC up; a
  worker: clock read back). Start-up is not under the heartbeat lease -- importing JAX, building
  or loading a large state and compiling can take long on a busy machine -- but under its own,
  generous deadline (``startup_timeout_s``); past it the member is killed with that cause.
- A serving member whose heartbeat has not been seen to move for longer than its lease becomes
  *suspect*. A late heartbeat only raises suspicion: the member is then probed directly (gRPC
  health, which a SIGSTOPped or deadlocked process cannot answer, but a busy one does), one
  probe at a time, every ``probe_interval_s``. A probe that answers counts as proof of life,
  like a heartbeat. Only a member whose probes kept failing for ``probe_timeout_s`` (at least
  ``min_failed_probes`` of them, none answering) is killed.
- The lease adapts to the heartbeat intervals observed for that member (``adaptive_factor``
  times the longest recent one), never below ``lease_s`` and never above ``lease_cap_s``: a
  member on a loaded machine that beats every 3 s is not suspected every 5 s.
- Probe results carry the probe's number; a result for an older probe is dropped (pymongo's
  stale-response rule), so a slow answer cannot clear a newer suspicion or count twice.
"""

from __future__ import annotations

import signal
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from tether.config import LivenessPolicy
from tether.member.view import lease

# (role, member id, pid): one process of one member. A restarted member is a new key.
Key = tuple[str, int, int]

CauseKind = Literal["exited", "probe_failed", "startup_deadline", "node_lost"]


@dataclass(frozen=True, slots=True)
class Cause:
    """Why a member's process ended and was restarted: what a user reads in the summary."""

    kind: CauseKind
    detail: str  # one sentence, e.g. "killed after failing the liveness probe for 10.2s"
    exit_code: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "detail": self.detail, "exit_code": self.exit_code}


def exit_cause(exit_code: int) -> Cause:
    """The cause of an exit the detector did not order (a crash, a signal from elsewhere)."""
    detail = f"exited with code {exit_code}"
    if exit_code < 0:
        try:
            detail += f" ({signal.Signals(-exit_code).name})"
        except ValueError:
            pass
    return Cause("exited", detail, exit_code)


def node_lost(reason: str, exit_code: int) -> Cause:
    """The cause of an exit that the member's node caused: the node was lost (an engine's word)."""
    return Cause("node_lost", f"was lost with its node: {reason}", exit_code)


@dataclass(frozen=True, slots=True)
class Probe:
    key: Key
    number: int  # echoed back in probe_result


@dataclass(frozen=True, slots=True)
class Kill:
    key: Key
    cause: Cause


Action = Probe | Kill


class Phase(StrEnum):
    STARTING = "starting"
    SERVING = "serving"
    SUSPECT = "suspect"
    KILLED = "killed"


@dataclass(slots=True)
class Watched:
    key: Key
    spawned_at: float
    phase: Phase = Phase.STARTING
    beat: float | None = None  # the heartbeat value last read from the store
    beat_seen_at: float | None = None  # when that value was first seen (our clock)
    alive_at: float | None = None  # last proof of life: a heartbeat moving or a probe answering
    intervals: deque[float] = field(default_factory=deque)
    suspect_since: float | None = None
    probe_number: int = 0
    probe_in_flight: bool = False
    last_probe_at: float | None = None
    failed_probes: int = 0  # since suspect_since
    last_probe_error: str = ""
    # What the run summary reports (measured, not assumed):
    max_silence_s: float = 0.0  # longest gap between two heartbeats seen while serving
    suspicions: int = 0
    probes: int = 0
    probes_failed: int = 0
    startup_s: float | None = None


class Detector:
    def __init__(self, policy: LivenessPolicy) -> None:
        self.policy = policy
        self.members: dict[Key, Watched] = {}

    # -- observations ---------------------------------------------------------------------

    def spawned(self, key: Key, now: float) -> None:
        self.members[key] = Watched(key, spawned_at=now)

    def forget(self, key: Key) -> Watched | None:
        """The process exited (or is no longer ours to watch); returns what was known of it."""
        return self.members.pop(key, None)

    def heartbeat(self, key: Key, beat: float, serving: bool, now: float) -> None:
        """The member's store record as just read: its heartbeat value and whether it serves."""
        w = self.members.get(key)
        if w is None or w.phase is Phase.KILLED:
            return
        if serving and w.phase is Phase.STARTING:
            w.phase = Phase.SERVING
            w.startup_s = now - w.spawned_at
            w.alive_at = w.beat_seen_at = now
            w.beat = beat
            return
        if beat == w.beat:
            return
        if w.phase is not Phase.STARTING and w.beat_seen_at is not None:
            gap = now - w.beat_seen_at
            w.max_silence_s = max(w.max_silence_s, gap)
            w.intervals.append(gap)
            while len(w.intervals) > self.policy.history:
                w.intervals.popleft()
        w.beat, w.beat_seen_at = beat, now
        w.alive_at = now
        if w.phase is Phase.SUSPECT:
            self._clear(w)

    def probe_result(self, key: Key, number: int, ok: bool, now: float, error: str = "") -> None:
        w = self.members.get(key)
        if w is None or number != w.probe_number or not w.probe_in_flight:
            return  # a result for a probe that no longer matters
        w.probe_in_flight = False
        if w.phase is not Phase.SUSPECT:
            return
        if ok:
            w.alive_at = now  # slow, not dead
            self._clear(w)
            return
        w.failed_probes += 1
        w.probes_failed += 1
        w.last_probe_error = error

    # -- decisions --------------------------------------------------------------------------

    def lease(self, key: Key) -> float:
        """The member's lease, by the rule every view of a run applies too (`view.lease`)."""
        return lease(self.policy, self.members[key].intervals)

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for w in self.members.values():
            if w.phase is Phase.STARTING:
                if now - w.spawned_at > self.policy.startup_timeout_s:
                    actions.append(self._kill(w, self._startup_cause(w, now)))
            elif w.phase is Phase.SERVING:
                assert w.alive_at is not None
                if now - w.alive_at > self.lease(w.key):
                    w.phase = Phase.SUSPECT
                    w.suspect_since = now
                    w.failed_probes = 0
                    w.suspicions += 1
                    actions.append(self._probe(w, now))
            elif w.phase is Phase.SUSPECT:
                assert w.suspect_since is not None
                suspect_for = now - w.suspect_since
                if (
                    suspect_for >= self.policy.probe_timeout_s
                    and w.failed_probes >= self.policy.min_failed_probes
                ):
                    actions.append(self._kill(w, self._probe_cause(w, now)))
                elif not w.probe_in_flight and (
                    w.last_probe_at is None or now - w.last_probe_at >= self.policy.probe_interval_s
                ):
                    actions.append(self._probe(w, now))
        return actions

    def phase(self, key: Key) -> Phase | None:
        w = self.members.get(key)
        return None if w is None else w.phase

    def validate(self) -> None:
        """Invariants that hold after every event (STYLE §3: invariants are code)."""
        for w in self.members.values():
            assert (w.phase is Phase.SUSPECT) == (w.suspect_since is not None), w
            if w.phase in (Phase.SERVING, Phase.SUSPECT):
                assert w.alive_at is not None and w.startup_s is not None, w
            assert 0 <= w.failed_probes <= w.probes_failed <= w.probes, w
            assert len(w.intervals) <= self.policy.history, w
            assert self.policy.lease_s <= self.lease(w.key) <= self.policy.lease_cap_s, w

    # -- internals --------------------------------------------------------------------------

    def _clear(self, w: Watched) -> None:
        w.phase = Phase.SERVING
        w.suspect_since = None
        w.failed_probes = 0

    def _probe(self, w: Watched, now: float) -> Probe:
        w.probe_number += 1
        w.probe_in_flight = True
        w.last_probe_at = now
        w.probes += 1
        return Probe(w.key, w.probe_number)

    def _kill(self, w: Watched, cause: Cause) -> Kill:
        w.phase = Phase.KILLED
        w.suspect_since = None
        w.probe_in_flight = False
        return Kill(w.key, cause)

    def _startup_cause(self, w: Watched, now: float) -> Cause:
        return Cause(
            "startup_deadline",
            f"killed: not serving {now - w.spawned_at:.1f}s after it was started (start-up "
            f"deadline {self.policy.startup_timeout_s:g}s)",
        )

    def _probe_cause(self, w: Watched, now: float) -> Cause:
        assert w.suspect_since is not None and w.alive_at is not None
        error = f"; last probe: {w.last_probe_error}" if w.last_probe_error else ""
        return Cause(
            "probe_failed",
            f"killed after failing the liveness probe for {now - w.suspect_since:.1f}s "
            f"({w.failed_probes} probes, none answered; no sign of life for "
            f"{now - w.alive_at:.1f}s, lease {self.lease(w.key):.1f}s){error}",
        )

    def report(self, w: Watched) -> dict[str, Any]:
        return {
            "role": w.key[0],
            "id": w.key[1],
            "pid": w.key[2],
            "startup_s": None if w.startup_s is None else round(w.startup_s, 3),
            "max_heartbeat_gap_s": round(w.max_silence_s, 3),
            "suspicions": w.suspicions,
            "probes": w.probes,
            "probes_failed": w.probes_failed,
        }

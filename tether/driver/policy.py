"""The driver's decisions about member exits, with no I/O (DESIGN §5, §12).

`classify_exit` says what an exit means (a finished worker, a replaced process ending, a failure
before training that fails the run, or a crash to restart); `Supervisor` decides restarts. The
driver reports what it observes — a child exited, and why (its exit code, or the liveness detector's
decision that killed it, `driver.liveness`), a member's record in the store — and gets back what to
do: restart the member, or fail the run naming it. Every restart keeps its cause, so a user can tell
a real failure from a detector decision. Recoveries are timed from the moment the death was seen to
the moment the replacement says it is serving again (a shard: state loaded and gRPC up; a worker:
clock read back from the shards).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tether.driver.liveness import Cause, exit_cause
from tether.member.view import MemberView
from tether.roles import member_name


@dataclass(slots=True)
class Recovery:
    role: str
    member_id: int
    exit_code: int
    detected_at: float
    old_epoch: int
    cause: Cause
    recovery_s: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "role": self.role,
            "id": self.member_id,
            "exit_code": self.exit_code,
            "epoch": self.old_epoch,
            "t": self.detected_at,
            "cause": self.cause.kind,
            "detail": self.cause.detail,
            "recovery_s": self.recovery_s,
        }


@dataclass(frozen=True, slots=True)
class Restart:
    attempt: int  # 1 for the first restart of this member


@dataclass(frozen=True, slots=True)
class GiveUp:
    message: str


class Supervisor:
    def __init__(self, max_restarts: int) -> None:
        self.max_restarts = max_restarts
        self.restarts: Counter[tuple[str, int]] = Counter()
        self.pending: dict[tuple[str, int], Recovery] = {}
        self.recoveries: list[Recovery] = []

    def member_exited(
        self,
        role: str,
        member_id: int,
        exit_code: int,
        now: float,
        epoch: int,
        cause: Cause | None = None,
    ) -> Restart | GiveUp:
        """``cause`` is the detector's, when it killed the member; else the exit code's."""
        cause = cause or exit_cause(exit_code)
        key = (role, member_id)
        if self.restarts[key] >= self.max_restarts:
            return GiveUp(
                f"{member_name(role, member_id)} {cause.detail} after "
                f"{self.restarts[key]} restarts (--max-restarts {self.max_restarts})"
            )
        self.restarts[key] += 1
        recovery = Recovery(role, member_id, exit_code, now, epoch, cause)
        self.pending[key] = recovery
        self.recoveries.append(recovery)
        return Restart(self.restarts[key])

    def observed(self, member: MemberView) -> Recovery | None:
        """A member's store record; returns the recovery it completes, if any."""
        recovery = self.pending.get((member.role, member.member_id))
        if recovery is None or member.epoch <= recovery.old_epoch:
            return None
        ready_at = member.ready_at
        if ready_at is None:
            return None
        recovery.recovery_s = max(0.0, ready_at - recovery.detected_at)
        del self.pending[(member.role, member.member_id)]
        return recovery

    def counts(self) -> dict[str, int]:
        out = {"server": 0, "worker": 0}
        for (role, _), n in self.restarts.items():
            out[role] += n
        return out


@dataclass(frozen=True, slots=True)
class Finished:
    """A worker completed its steps (exit code 0)."""


@dataclass(frozen=True, slots=True)
class Replaced:
    """A process that had been replaced while alive ended: expected, it restarts nothing."""


@dataclass(frozen=True, slots=True)
class FailedAtStart:
    """A member died before training began (any shard exit, a worker's non-zero one)."""


@dataclass(frozen=True, slots=True)
class Crashed:
    """A member died during training: `Supervisor.member_exited` decides its restart."""


ExitMeaning = Finished | Replaced | FailedAtStart | Crashed


def classify_exit(role: str, exit_code: int, superseded: bool, training: bool) -> ExitMeaning:
    """What a member's exit means. Before training a shard must not exit at all (it serves
    until told to stop), and a worker only by finishing; during training a crash of either is
    restarted within the budget."""
    if superseded:
        return Replaced()
    if role == "worker" and exit_code == 0:
        return Finished()
    if not training:
        return FailedAtStart()
    return Crashed()

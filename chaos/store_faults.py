"""Store-member faults for chaos runs on a real MongoDB replica set (DESIGN §7).

Only where `mongod` is on PATH: the runner starts a three-member set on loopback for the run
(`replica_set.start_replica_set`), and faults kill, pause, resume or stop its members —
``store:N`` by index, ``store:primary`` for whichever member is primary when the fault fires. A
paused member is what its peers and clients see of a partitioned one: it answers nothing. The
recovery of a store fault is timed until a live member accepts writes as primary again.
"""

from __future__ import annotations

import contextlib
import time

from tether.chaos.timeline import SIGNALS as TIMELINE_SIGNALS
from tether.chaos.timeline import FaultRecord, Watch
from tether.devtools.replica_set import ReplicaSet, _direct
from tether.retry import PollTimeout, poll_until

# A store member is killed, paused, resumed or stopped, never replaced or restarted by the run.
SIGNALS = {a: TIMELINE_SIGNALS[a] for a in ("kill", "pause", "resume", "stop")}
RECOVERY_WAIT_S = 120.0  # a store fault's recovery is left untimed after this long


class StoreMembers:
    """The members of the run's replica set, as the timeline's `StoreFaults`."""

    def __init__(self, rs: ReplicaSet) -> None:
        self.rs = rs
        self.down: set[int] = set()  # members killed, stopped or paused by this run
        self.paused: list[int] = []

    def primary(self) -> int | None:
        for i, port in enumerate(self.rs.ports):
            if i in self.down:
                continue
            client = _direct(port, 500)
            try:
                if client.admin.command("hello").get("isWritablePrimary"):
                    return i
            except Exception:  # noqa: BLE001 - a member that does not answer is not primary
                continue
            finally:
                client.close()
        return None

    def fire(
        self,
        record: FaultRecord,
        action: str,
        member_id: int | None,
        watch: Watch,
    ) -> None:
        if action not in SIGNALS:
            raise LookupError(f"store members can be {', '.join(SIGNALS)}ed, not {action}")
        if member_id is not None:
            index: int | None = member_id
        elif action == "resume":
            # "the primary" paused earlier is no longer primary: resume the member paused last.
            index = self.paused[-1] if self.paused else None
        else:
            index = self.primary()
        if index is None:
            raise LookupError(f"no store member to {action}: none is primary or paused")
        if action == "pause":
            self.paused.append(index)
        elif action == "resume" and index in self.paused:
            self.paused.remove(index)
        proc = self.rs.procs[index]
        proc.send_signal(SIGNALS[action])
        record.pid = proc.pid
        if action == "resume":
            self.down.discard(index)
            return
        self.down.add(index)
        t = record.t
        assert t is not None

        def recovered() -> None:
            with contextlib.suppress(PollTimeout):
                poll_until(lambda: self.primary() is not None, RECOVERY_WAIT_S, "a primary", 0.1)
                record.recovery_s = time.time() - t

        watch(recovered)

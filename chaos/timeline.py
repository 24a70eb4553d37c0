"""The fault timeline of a chaos run: fire each fault when its trigger is reached (DESIGN §7).

Triggers are read from the store, like any observer would: ``at_step`` fires once the slowest
worker has reported that clock (workers report every heartbeat, so "at step 40" means "as soon as
every worker is seen past 40"), ``at_s`` counts from the moment every worker is running, and
``after_s`` from the previous fault. Process faults go through the launcher, which owns the
children; link faults through the fault proxy's API; store faults to the MongoDB members this
run started. Each fault's recovery is timed: from the fault to the moment its member is serving
again at a newer epoch (a shard: state loaded and gRPC up; a worker: clock read back).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from tether.chaos.links import LinkPlan, ProxyAPIError, link_name
from tether.chaos.scenario import FaultSpec, LinkTarget, ProcessTarget
from tether.member.view import MemberView, member_views
from tether.retry import PollTimeout, poll_until
from tether.store import MetricRow, Store, StoreError

T = TypeVar("T")

SIGNALS = {
    "kill": signal.SIGKILL,
    "pause": signal.SIGSTOP,
    "resume": signal.SIGCONT,
    "stop": signal.SIGTERM,
    "restart": signal.SIGTERM,  # graceful stop; the supervisor starts the replacement
}
POLL_S = 0.02
TARGET_WAIT_S = 20.0  # how long a fault waits for its target to have a live process


class Controller(Protocol):
    """What the timeline needs of the process that owns the run's children (the launcher)."""

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the loop that owns the children; LookupError when it is not running."""
        ...

    def signal_member(self, role: str, member_id: int, sig: int) -> int: ...
    def signal_pid(self, pid: int, sig: int) -> None: ...
    def replace_member(self, role: str, member_id: int) -> int: ...


@dataclass(slots=True)
class FaultRecord:
    index: int
    fault: FaultSpec
    t: float | None = None  # unix time it fired
    step: int | None = None  # the slowest worker's clock when it fired
    pid: int | None = None
    error: str | None = None
    recovery_s: float | None = None  # process faults: until the member served again
    heal_workers: list[int] = field(default_factory=list)  # link heals: whose progress to time

    def to_json(self, t0: float) -> dict[str, Any]:
        return {
            "index": self.index,
            "fault": self.fault.describe(),
            "action": self.fault.action,
            "target": self.fault.target.describe(),
            "fired": self.t is not None and self.error is None,
            "t": self.t,
            "at_s": None if self.t is None else round(self.t - t0, 3),
            "step": self.step,
            "pid": self.pid,
            "error": self.error,
            "recovery_s": self.recovery_s,
            "heal": False,  # the runner times heals (link restored) from the metrics
        }


Watch = Callable[[Callable[[], None]], None]  # runs a recovery watcher in its own thread


class StoreFaults(Protocol):
    """Faults of the store's own members (``store_faults.StoreMembers``)."""

    def fire(
        self, record: FaultRecord, action: str, member_id: int | None, watch: Watch
    ) -> None: ...


class Timeline(threading.Thread):
    def __init__(
        self,
        faults: tuple[FaultSpec, ...],
        launcher: Controller,
        store: Store,
        run_id: str,
        workers: int,
        links: LinkPlan | None,
        store_members: StoreFaults | None = None,  # for store faults
    ) -> None:
        super().__init__(name="chaos-timeline", daemon=True)
        self.faults = faults
        self.launcher, self.store, self.run_id = launcher, store, run_id
        self.workers, self.links, self.store_members = workers, links, store_members
        self.records = [FaultRecord(i, f) for i, f in enumerate(faults)]
        self.done = threading.Event()  # set by the runner when the run has ended
        self.t0: float | None = None  # every worker running
        self.paused: dict[str, int] = {}  # target -> pid paused by this timeline
        self._watchers: list[threading.Thread] = []

    # -- observations ---------------------------------------------------------------------

    def slowest_clock(self) -> int | None:
        try:
            workers = member_views(self.store.members(self.run_id, "worker"))
        except StoreError:
            return None  # the run is not created yet, or the store is briefly unavailable
        if len(workers) < self.workers:
            return None
        return min(m.clock or 0 for m in workers)

    def _until_done(self, value: Callable[[], T | None], what: str) -> T | None:
        """Poll `value` until it is truthy and return it; None once the run has ended. The end
        is looked at first: a trigger reached as the run ends does not fire."""
        return poll_until(
            lambda: None if self.done.is_set() else value(), None, what, POLL_S, stop=self.done
        )

    def _wait(self, ready: Callable[[], bool]) -> bool:
        return bool(self._until_done(ready, "a fault's trigger"))

    # -- the timeline ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # noqa: BLE001 - reported in the faults, never lost in a thread
            for record in self.records:
                if record.t is None or record.error is None:
                    record.error = record.error or f"timeline failed: {type(e).__name__}: {e}"

    def _run(self) -> None:
        if not self._wait(lambda: self.slowest_clock() is not None):
            return
        self.t0 = time.time()
        previous = self.t0
        for record in self.records:
            f = record.fault
            if f.at_step is not None:
                at_step = f.at_step
                ok = self._wait(lambda: (self.slowest_clock() or 0) >= at_step)  # noqa: B023
            else:
                due = (self.t0 + f.at_s) if f.at_s is not None else previous + (f.after_s or 0)
                ok = self._wait(lambda: time.time() >= due)  # noqa: B023 - used at once
            if not ok:
                record.error = "never fired: the run ended first"
                continue
            record.step = self.slowest_clock()
            record.t = time.time()
            try:
                self._fire(record)
            except (LookupError, ProxyAPIError, OSError, TimeoutError) as e:
                record.error = f"{type(e).__name__}: {e}"
            previous = time.time()

    def join_watchers(self, timeout_s: float = 10.0) -> None:
        for w in self._watchers:
            w.join(timeout_s)

    def _fire(self, record: FaultRecord) -> None:
        f = record.fault
        if isinstance(f.target, LinkTarget):
            self._fire_link(record, f.target)
        elif f.target.role == "store":
            assert self.store_members is not None  # a scenario with store faults runs a set
            self.store_members.fire(record, f.action, f.target.member_id, self._watch_thread)
        else:
            self._fire_member(record, f.target)

    def _fire_member(self, record: FaultRecord, target: ProcessTarget) -> None:
        f, role = record.fault, target.role
        assert target.member_id is not None
        member_id = target.member_id
        before = self.store.member(self.run_id, role, member_id)  # type: ignore[arg-type]
        epoch = before.epoch if before is not None else 0
        key = target.describe()
        if f.action == "resume":
            if key not in self.paused:
                raise LookupError(f"{key} was not paused by this scenario")
            pid = self.paused.pop(key)
            self.launcher.call(lambda: self.launcher.signal_pid(pid, signal.SIGCONT))
            record.pid = pid
            return
        if f.action == "replace":
            record.pid = self._retry(lambda: self.launcher.replace_member(role, member_id))
        else:
            sig = SIGNALS[f.action]
            record.pid = self._retry(lambda: self.launcher.signal_member(role, member_id, sig))
            if f.action == "pause":
                self.paused[key] = record.pid
        self._watch_thread(lambda: self._recovered(record, role, member_id, epoch))

    def _retry(self, fn: Callable[[], int]) -> int:
        """Run `fn` (it returns a pid) in the launcher's loop; a target being restarted is waited
        for, up to TARGET_WAIT_S or the end of the run, after which its last LookupError is
        raised."""
        failure: LookupError | None = None

        def attempt() -> int | None:
            nonlocal failure
            try:
                return self.launcher.call(fn)
            except LookupError as e:
                failure = e
                return None

        try:
            pid = poll_until(attempt, TARGET_WAIT_S, "a live target", POLL_S, stop=self.done)
        except PollTimeout:
            pid = None
        if pid is None:
            assert failure is not None
            raise failure
        return pid

    def _watch_thread(self, fn: Callable[[], None]) -> None:
        t = threading.Thread(target=fn, name="chaos-recovery", daemon=True)
        t.start()
        self._watchers.append(t)

    def _recovered(self, record: FaultRecord, role: str, member_id: int, epoch: int) -> None:
        """Time the recovery: the member serving again at an epoch newer than at the fault."""
        assert record.t is not None

        def serving() -> MemberView | None:
            m = self.store.member(self.run_id, role, member_id)  # type: ignore[arg-type]
            view = None if m is None else MemberView.of(m)
            if view is not None and view.epoch > epoch and view.ready_at is not None:
                return view
            return None

        if (m := self._until_done(serving, f"{role} {member_id} serving again")) is not None:
            assert m.ready_at is not None
            record.recovery_s = max(0.0, m.ready_at - record.t)

    def _fire_link(self, record: FaultRecord, target: LinkTarget) -> None:
        assert self.links is not None
        f = record.fault
        pairs = target.links(self.workers, self.links.shards)
        for w, s in pairs:
            name = link_name(w, s)
            if f.action == "add_toxic":
                assert f.toxic is not None
                self.links.api.add_toxic(name, f.toxic.body())
            elif f.action == "remove_toxic":
                assert f.toxic_name is not None
                self.links.api.remove_toxic(name, f.toxic_name)
            else:
                # The listen address is given so the proxy comes back on the same port.
                enabled = f.action == "enable"
                self.links.api.update(name, enabled=enabled, listen=self.links.listen[(w, s)])
        if f.action in ("enable", "remove_toxic"):
            record.heal_workers = sorted({w for w, _ in pairs})


def progress_after(metrics: list[MetricRow], workers: list[int], t: float) -> float | None:
    """Seconds from `t` until every worker in `workers` completed an iteration after it."""
    firsts = []
    for w in workers:
        times = [r.t for r in metrics if r.source == f"worker:{w}" and r.t > t]
        if not times:
            return None
        firsts.append(min(times))
    return max(firsts) - t if firsts else None

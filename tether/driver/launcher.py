"""The run driver behind `tether launch`: one run, through the entry points a scheduler would use.

The driver writes the run's config to the store, starts S `tether server` and W `tether worker`
members through a `Spawner` (the local one: child processes in this process group, logs in
<run-dir>/logs), watches them, shows progress, and when the workers are done reads the final
parameters from the shards, evaluates them, stops the shards and writes the `RunSummary`
(DESIGN §1, §9, §12). The decisions are made by pure objects and carried out here:
- what an exit means and whether to restart (`policy.classify_exit`, `policy.Supervisor`);
- which silent member to probe or kill (`liveness.Detector`: late heartbeats raise suspicion,
  failed direct probes confirm it);
- control requests from other threads (chaos timelines) run in the watch loop (`control.Mailbox`).
A member is restarted with its cause recorded, up to --max-restarts; then the run fails with a
message naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from tether.config import RunConfig
from tether.driver.conclude import RunFailed, final_params
from tether.driver.control import Mailbox
from tether.driver.evaluate import Evaluator
from tether.driver.liveness import Cause, Detector, Kill, Probe, Watched, exit_cause, node_lost
from tether.driver.policy import (
    Crashed,
    FailedAtStart,
    Finished,
    GiveUp,
    Replaced,
    Supervisor,
    classify_exit,
)
from tether.driver.probe import Prober
from tether.driver.progress import ProgressView
from tether.driver.spawner import Handle, LocalSpawner, MemberSpec, Spawner, stop_all
from tether.driver.summary import Outcome, RunSummary, last_losses, summarise
from tether.member.heartbeat import Heartbeat
from tether.member.report import LauncherReport
from tether.member.view import Here, MemberView, RunView, member_views, observe
from tether.metrics.collect import LauncherCollector, MetricsServer, registry_of, serve_metrics
from tether.retry import PollTimeout, poll_until
from tether.roles import Role, member_name
from tether.shm import remove_leftovers
from tether.store import Member, Store, open_store
from tether.tasks.build import context_of, own_optimizer_name, runtime_of
from tether.transport import Security, run_security

# How long the end of a run waits for a shard that was restarted at the very end and already
# answered its final read to heartbeat that it serves (a few heartbeat intervals).
_LAST_RECOVERY_WAIT_S = 10.0
# How long the members have to exit on their own once the run is marked finished (a shard
# flushes its replication first); those still running then are stopped.
MEMBERS_EXIT_S = 20.0
# One health check's deadline. A busy member answers well within it; a frozen one never does.
PROBE_ATTEMPT_S = 2.0


@dataclass(frozen=True, slots=True)
class LaunchOptions:
    config: RunConfig
    run_dir: Path
    store_uri: str
    export: Path | None = None
    # worker id -> shard id -> address the worker dials for that shard (a fault proxy, DESIGN §7)
    routes: dict[int, dict[int, str]] = field(default_factory=dict)
    # Evaluate the shards' parameters every this many seconds into the `eval` metrics (DESIGN §8)
    eval_interval_s: float | None = None
    # Called with the registered shards before any worker starts (a chaos run points its
    # proxies at them, so no worker ever dials a link that leads nowhere).
    before_workers: Callable[[list[Member]], None] | None = None
    # Serve the driver's Prometheus metrics on this port (0: a free one), and start every member
    # with `--metrics-port 0`, so each member of the run can be scraped (DESIGN §13).
    metrics_port: int | None = None


@dataclass(slots=True)
class Child:
    """One member process the driver started."""

    role: Role
    member_id: int
    handle: Handle
    spawn: str = ""  # the start's token, which the member reports in its heartbeats
    # Replaced while still alive (a pause followed by a replacement): its exit is expected and
    # restarts nothing; if it runs again it is a zombie the store fences (DESIGN §5).
    superseded: bool = False
    stopped: bool = False  # sent SIGSTOP by this driver, and no SIGCONT since

    @property
    def name(self) -> str:
        return member_name(self.role, self.member_id)

    @property
    def pid(self) -> int:
        return self.handle.pid

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.role, self.member_id, self.handle.pid)

    def failure(self, what: str) -> str:
        """`what` happened to this member, with the last lines of its log."""
        return f"{what}; last lines of {self.handle.log_where}:\n{self.handle.log_tail()}"


class Launcher:
    def __init__(
        self, opts: LaunchOptions, err: TextIO = sys.stderr, spawner: Spawner | None = None
    ) -> None:
        self.opts = opts
        self.config = opts.config
        self.err = err
        self.spawner: Spawner = spawner or LocalSpawner(opts.run_dir)
        self.children: list[Child] = []
        self.store: Store | None = None
        self.epoch = 0  # the launcher's own membership epoch
        self.supervisor = Supervisor(opts.config.max_restarts)
        # What happened to the members, in order: exits, restarts, liveness kills, recoveries.
        # A chaos run reads it to time recoveries and to check that a zombie was fenced.
        self.events: list[dict[str, Any]] = []
        self.detector = Detector(opts.config.liveness_policy)
        # Made once the run exists: the probes carry its TLS (DESIGN §13).
        self.security: Security | None = None
        self.prober: Prober | None = None
        self._kill_causes: dict[int, Cause] = {}  # pid -> why the detector killed it
        self.liveness: list[dict[str, Any]] = []  # what the detector saw of each ended process
        self._beats_skipped: dict[tuple[str, int, int], int] = {}  # as members last reported
        self.watch_max_gap_s = 0.0
        self.evaluator: Evaluator | None = None
        self.mailbox = Mailbox()
        self._spawns = 0  # starts so far: each gets a token (MemberSpec.spawn)
        self.metrics: MetricsServer | None = None  # the driver's /metrics (--metrics-port)

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def _event(self, kind: str, child: Child, **detail: Any) -> None:
        self.events.append(
            {"t": time.time(), "kind": kind, "role": child.role, "id": child.member_id,
             "pid": child.pid, **detail}
        )  # fmt: skip

    # -- control from another thread (chaos runs), executed by the watch loop ---------------

    def call(self, fn: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        """Run `fn` in the driver's watch loop (which owns the children) and return its result.

        Raises LookupError when the loop is not running (before training or after the workers
        finished), rather than waiting for a loop that will not serve it.
        """
        return self.mailbox.call(fn, timeout_s)

    def live_child(self, role: str, member_id: int) -> Child:
        """The current (not superseded) process of a member; call from the watch loop."""
        for child in self.children:
            if (child.role, child.member_id) == (role, member_id) and not child.superseded:
                if child.handle.poll() is None:
                    return child
        raise LookupError(f"{member_name(role, member_id)} has no live process right now")

    def signal_member(self, role: str, member_id: int, sig: int) -> int:
        """Send `sig` to a member's current process; returns its pid (call via `call`)."""
        child = self.live_child(role, member_id)
        self._signal(child, sig)
        return child.pid

    def _signal(self, child: Child, sig: int) -> None:
        child.handle.send_signal(sig)
        if sig in (signal.SIGSTOP, signal.SIGCONT):
            child.stopped = sig == signal.SIGSTOP
        self._event("signal", child, signal=signal.Signals(sig).name)

    def signal_pid(self, pid: int, sig: int) -> None:
        """Send `sig` to one of this driver's children by pid (e.g. resume a superseded one)."""
        for child in self.children:
            if child.pid == pid and child.handle.poll() is None:
                self._signal(child, sig)
                return
        raise LookupError(f"pid {pid} is not a live child of this launcher")

    def replace_member(self, role: Role, member_id: int) -> int:
        """Start a replacement while the current process lives on (paused or partitioned).

        The replacement registers the next epoch; the old process is superseded: its exit
        restarts nothing, and the store fences it if it runs again (DESIGN §5).
        """
        old = self.live_child(role, member_id)
        old.superseded = True
        self._unwatch(old)  # left alive on purpose: a zombie for the store to fence
        self._event("superseded", old)
        new = self._spawn(role, member_id)
        self._event("replacement", new, replaces=old.pid)
        return new.pid

    # -- starting members ----------------------------------------------------------------------

    def _spawn(self, role: Role, member_id: int) -> Child:
        routes = self.opts.routes.get(member_id, {}) if role == "worker" else {}
        self._spawns += 1
        spawn = f"{os.getpid()}.{self._spawns}"
        spec = MemberSpec(
            role, member_id, self.opts.store_uri, self.config.run_id, routes, spawn=spawn,
            metrics_port=None if self.opts.metrics_port is None else 0,
        )  # fmt: skip
        child = Child(role, member_id, self.spawner.start(spec), spawn)
        self.children.append(child)
        self.detector.spawned(child.key, time.monotonic())
        self._event("start", child, where=child.handle.log_where)
        return child

    def _unwatch(self, child: Child) -> None:
        watched = self.detector.forget(child.key)
        if watched is not None:
            self.liveness.append(self._process_report(watched))

    def _process_report(self, watched: Watched) -> dict[str, Any]:
        skipped = self._beats_skipped.pop(watched.key, 0)
        return self.detector.report(watched) | {"heartbeats_skipped": skipped}

    def _check_children(self) -> None:
        """Before training: any shard exit, or a worker's failure, fails the run."""
        for child in self.children:
            rc = child.handle.poll()
            if rc is None:
                continue
            if isinstance(classify_exit(child.role, rc, child.superseded, False), FailedAtStart):
                what = f"{child.name} (pid {child.pid}) exited with code {rc}"
                raise RunFailed(child.failure(what))

    def _wait_for(self, what: str, ready: Callable[[], bool]) -> None:
        timeout_s = self.config.startup_timeout_s

        def check() -> bool:
            if ready():
                return True
            self._check_children()
            return False

        try:
            poll_until(check, timeout_s, what, interval_s=0.05)
        except PollTimeout:
            raise RunFailed(
                f"{what} did not happen within {timeout_s:.0f}s (--startup-timeout)"
            ) from None

    def start_shards(self) -> list[Member]:
        """Create the run in the store, start its shards and wait until all registered."""
        cfg = self.config
        self.opts.run_dir.mkdir(parents=True, exist_ok=True)
        store = self.store = open_store(self.opts.store_uri)
        store.create_run(cfg.run_id, cfg.to_dict())
        self.security = run_security(store, self.opts.store_uri, cfg, who="tether launch")
        self.prober = Prober(PROBE_ATTEMPT_S, self.security)
        self._serve_metrics()
        self.epoch = store.register(
            cfg.run_id, "launcher", 0, address="", pid=os.getpid(), host=socket.gethostname()
        )
        for i in range(cfg.shards):
            self._spawn("server", i)
        self._wait_for(
            f"all {cfg.shards} shards registering",
            lambda: len(store.members(cfg.run_id, "server")) == cfg.shards,
        )
        return store.members(cfg.run_id, "server")

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> RunSummary:
        cfg = self.config
        t_start = time.monotonic()
        self.say(
            f"tether: run {cfg.run_id} — {cfg.consistency.describe()}, {cfg.shards} shards, "
            f"{cfg.workers} workers, {cfg.task_config.describe()}, "
            f"{cfg.num_params} parameters, {cfg.steps} steps, "
            f"{own_optimizer_name(cfg) or f'{cfg.optimizer} lr={cfg.lr}'}, seed {cfg.seed}\n"
            f"tether: run dir {self.opts.run_dir}, store {self.opts.store_uri}"
        )
        try:
            shards = self.start_shards()
            store = self._open_store()
            if self.opts.before_workers is not None:
                self.opts.before_workers(shards)
            for w in range(cfg.workers):
                self._spawn("worker", w)
            t_train = time.monotonic()
            beating = self._keep_alive()
            evaluator = None
            if self.opts.eval_interval_s is not None:
                assert self.security is not None  # made with the run
                evaluator = Evaluator(
                    cfg, self.opts.store_uri, self.opts.eval_interval_s, self.security
                )
                evaluator.start()
            try:
                with ProgressView(cfg, self.err) as view, self.mailbox.open():
                    self._watch_members(store, view)
            finally:
                beating.close()
                if evaluator is not None:
                    evaluator.close()
            self.evaluator = evaluator
            train_s = time.monotonic() - t_train
            summary = self._finish(store, t_start, train_s)
            result = summary.to_json()
            # Marked finished first: every member then exits 0 on its own (DESIGN §12), and
            # only those that do not are stopped.
            store.finish_run(cfg.run_id, result)
            self._wait_members_exit(MEMBERS_EXIT_S)
        except BaseException:
            self.stop_children()
            self.close_metrics()
            raise
        self.stop_children()
        self.close_metrics()
        store.set_member_state(cfg.run_id, "launcher", 0, self.epoch, "exited")
        (self.opts.run_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        store.close()
        return summary

    def _wait_members_exit(self, timeout_s: float) -> None:
        live = [c for c in self.children if not c.superseded]
        with contextlib.suppress(PollTimeout):
            poll_until(
                lambda: all(c.handle.poll() is not None for c in live), timeout_s,
                "the members to exit", interval_s=0.05,
            )  # fmt: skip

    def _open_store(self) -> Store:
        if self.store is None:
            raise RunFailed("the run's store is not open (start_shards did not run)")
        return self.store

    def _watch_members(self, store: Store, view: ProgressView) -> None:
        """Until every worker finished: restart dead members, time recoveries, show progress."""
        cfg = self.config
        done: set[int] = set()
        last_view = 0.0
        last_pass = time.monotonic()
        here, policy = Here.this_host(), self.detector.policy
        run: RunView | None = None
        while len(done) < cfg.workers:
            now = time.monotonic()
            # How far this loop fell behind its 20 ms: on a loaded machine, the driver too.
            self.watch_max_gap_s = max(self.watch_max_gap_s, now - last_pass)
            last_pass = now
            self.mailbox.serve()
            for child in list(self.children):
                rc = child.handle.poll()
                if rc is None or child.member_id in done and child.role == "worker":
                    continue
                self._exited(store, child, rc, done)
            members = member_views(store.members(cfg.run_id))
            self._detect(members)
            self._observe_recoveries(members)
            # The run as `tether status` sees it, by the same rule (tether.member.view).
            run = observe(run, cfg.run_id, members, policy, now=time.time(), here=here)
            now = time.monotonic()
            if now - last_view > 0.25:
                last_view = now
                view.update(run)
            time.sleep(0.02)
        members = member_views(store.members(cfg.run_id))
        view.update(observe(run, cfg.run_id, members, policy, now=time.time(), here=here))
        self._await_replaced(store, done)

    def _await_replaced(self, store: Store, done: set[int]) -> None:
        """Replaced processes that run again (resumed zombies) are fenced at their next write
        to the store, and exit: give them `MEMBERS_EXIT_S` to, so that each exit and its code
        are in the run's record even when the workers finished first."""

        def running() -> list[Child]:
            return [
                c for c in self.children
                if c.superseded and not c.stopped and c.handle.poll() is None
            ]  # fmt: skip

        with contextlib.suppress(PollTimeout):
            poll_until(
                lambda: not running(), MEMBERS_EXIT_S, "the replaced processes to exit",
                interval_s=0.05,
            )  # fmt: skip
        for child in list(self.children):
            if child.superseded and (rc := child.handle.poll()) is not None:
                self._exited(store, child, rc, done)

    def _exited(self, store: Store, child: Child, rc: int, done: set[int]) -> None:
        self._unwatch(child)
        meaning = classify_exit(child.role, rc, child.superseded, True)
        if isinstance(meaning, Replaced):
            self.children.remove(child)
            self._event("exit", child, exit_code=rc, superseded=True)
            self.say(f"tether: {child.name} (pid {child.pid}, replaced) exited with code {rc}")
        elif isinstance(meaning, Finished):
            done.add(child.member_id)
            self._event("exit", child, exit_code=0)
        elif isinstance(meaning, Crashed):
            # A lost node is the cause even when the probes that failed with it came first.
            killed = self._kill_causes.pop(child.pid, None)
            lost = child.handle.lost()
            cause = (
                killed if killed is not None and lost is None else lost_or_exit(child.handle, rc)
            )
            self._event("exit", child, exit_code=rc, cause=cause.kind)
            self._restart(store, child, rc, cause)

    def _observe_recoveries(self, members: list[MemberView]) -> None:
        for m in members:
            if m.role != "launcher" and (rec := self.supervisor.observed(m)) is not None:
                self.events.append(
                    {"t": time.time(), "kind": "serving", "role": m.role, "id": m.member_id,
                     "pid": m.pid, "epoch": m.epoch, "recovery_s": rec.recovery_s}
                )  # fmt: skip
                self.say(
                    f"tether: {member_name(rec.role, rec.member_id)} serving again at epoch "
                    f"{m.epoch}, {rec.recovery_s:.2f}s after its exit was seen"
                )

    def _keep_alive(self) -> Heartbeat:
        """Heartbeat from a thread with its own store handle (tether.member.heartbeat); returns it.

        The watch loop only reads the store, so a member frozen while it holds SQLite's write
        lock (writes wait on it; WAL reads do not) cannot stop the driver from seeing the
        frozen member, probing it and killing it, which frees the lock.
        """

        def info() -> dict[str, Any]:
            return self.report().to_info()

        return Heartbeat(
            self.opts.store_uri, self.config.run_id, "launcher", 0, self.epoch,
            interval_s=1.0, info=info,
            metrics_url=None if self.metrics is None else self.metrics.url,
        ).start()  # fmt: skip

    def report(self) -> LauncherReport:
        """What the driver publishes about the run (and its metrics collector reads)."""
        return LauncherReport(
            phase="train",
            restarts=self.supervisor.counts(),
            recoveries=tuple(r.to_json() for r in self.supervisor.recoveries),
        )

    def _metrics_sample(self) -> tuple[LauncherReport, dict[str, int]]:
        running: dict[str, int] = {"server": 0, "worker": 0}
        for child in list(self.children):
            if child.handle.poll() is None and not child.superseded:
                running[child.role] = running.get(child.role, 0) + 1
        return self.report(), running

    def _serve_metrics(self) -> None:
        """The driver's own /metrics, on loopback like every member's default (DESIGN §13)."""
        if self.opts.metrics_port is not None and self.metrics is None:
            collector = LauncherCollector(self.config.run_id, self._metrics_sample)
            self.metrics = serve_metrics(
                registry_of([collector]), "127.0.0.1", self.opts.metrics_port
            )

    def _detect(self, members: list[MemberView]) -> None:
        """Feed the liveness detector what the store shows, then carry out what it decides.

        Probes go to the member's registered address directly, never through a chaos proxy: a
        broken link is not a dead process. A kill is only ever a confirmed one (the probes
        failed past --probe-timeout, or start-up ran past --startup-timeout); the exit it causes
        is restarted with that cause (DESIGN §5).
        """
        now = time.monotonic()
        by_key = self._records(members)
        for child in self.children:
            m = by_key.get(child.key)
            if m is not None and m.state == "running":
                self.detector.heartbeat(child.key, m.heartbeat, m.serving, now)
                self._beats_skipped[child.key] = m.heartbeats_skipped
        assert self.prober is not None  # made with the run
        for key, number, ok, error in self.prober.drain():
            self.detector.probe_result(key, number, ok, now, error)
        for action in self.detector.tick(now):
            m = by_key.get(action.key)
            if isinstance(action, Probe):
                self.prober.submit(action.key, action.number, m.address if m else "")
            elif isinstance(action, Kill):
                self._kill(action)

    def _records(self, members: list[MemberView]) -> dict[tuple[str, int, int], MemberView]:
        """Each child's record in the store: the one that reports the child's spawn token, or
        (before its first heartbeat) the one with the child's pid."""
        by_spawn = {m.spawn: m for m in members if m.spawn}
        by_pid: dict[tuple[str, int, int], MemberView] = {
            (m.role, m.member_id, m.pid): m for m in members
        }
        found = {}
        for child in self.children:
            m = by_spawn.get(child.spawn) or by_pid.get(child.key)
            if m is not None and (m.role, m.member_id) == (child.role, child.member_id):
                found[child.key] = m
        return found

    def _kill(self, action: Kill) -> None:
        for child in self.children:
            if child.key == action.key and child.handle.poll() is None:
                self.say(f"tether: {child.name} (pid {child.pid}) {action.cause.detail}")
                self._kill_causes[child.pid] = action.cause
                self._event("liveness_kill", child, cause=action.cause.kind,
                            detail=action.cause.detail)  # fmt: skip
                child.handle.kill()
                return

    def _restart(self, store: Store, child: Child, rc: int, cause: Cause) -> None:
        cfg = self.config
        member = store.member(cfg.run_id, child.role, child.member_id)
        epoch = member.epoch if member is not None else 0
        decision = self.supervisor.member_exited(
            child.role, child.member_id, rc, time.time(), epoch, cause
        )
        if isinstance(decision, GiveUp):
            raise RunFailed(child.failure(decision.message))
        self.children.remove(child)
        self.say(
            f"tether: {child.name} (pid {child.pid}) {cause.detail}; restarting "
            f"({decision.attempt}/{cfg.max_restarts})"
        )
        self._spawn(child.role, child.member_id)

    # -- the end of the run --------------------------------------------------------------------

    def _shards_seen(self, store: Store) -> list[Member]:
        """The shards' records, noting the recovery of any restarted one that serves again."""
        members = store.members(self.config.run_id)
        self._observe_recoveries(member_views(members))
        return [m for m in members if m.role == "server"]

    def _shards_recovered(self, store: Store) -> bool:
        """Whether every restarted shard has been seen serving again (read from the store)."""
        self._shards_seen(store)
        return not any(role == "server" for role, _ in self.supervisor.pending)

    def _finish(self, store: Store, t_start: float, train_s: float) -> RunSummary:
        cfg = self.config
        workers = member_views(store.members(cfg.run_id, "worker"))
        assert self.security is not None  # made with the run
        flat, infos = final_params(
            cfg, lambda: self._shards_seen(store), cfg.startup_timeout_s, self.security
        )
        # A shard restarted at the very end answers before its heartbeat says it serves: wait
        # for that heartbeat, so that its recovery is in the summary like any other.
        with contextlib.suppress(PollTimeout):
            poll_until(
                lambda: self._shards_recovered(store), _LAST_RECOVERY_WAIT_S,
                "the restarted shards' heartbeats", interval_s=0.05,
            )  # fmt: skip
        # The task's evaluate on the final parameters (DESIGN §11), on the CPU backend.
        runtime = runtime_of(cfg, device="cpu")
        evaluation = runtime.evaluate(
            flat, context_of(cfg, "driver", store_uri=self.opts.store_uri)
        )
        if self.evaluator is not None and evaluation:  # the loss curve's last point
            store.log_metrics(cfg.run_id, [self.evaluator.row(evaluation, infos)])
        if self.opts.export is not None:
            self.opts.export.parent.mkdir(parents=True, exist_ok=True)
            np.savez(self.opts.export, params=flat)
        return summarise(
            cfg,
            Outcome(
                run_dir=str(self.opts.run_dir),
                store_uri=self.opts.store_uri,
                export=str(self.opts.export) if self.opts.export else None,
                evaluation=evaluation,
                last_losses=last_losses(workers),
                wall_s=time.monotonic() - t_start,
                train_s=train_s,
            ),
            flat,
            infos,
            workers,
            recoveries=[r.to_json() for r in self.supervisor.recoveries],
            restarts=self.supervisor.counts(),
            liveness=self._liveness_report(),
            events=self.events,
        )

    def _liveness_report(self) -> dict[str, Any]:
        """What the detector measured per process: start-up time, the longest heartbeat gap,
        suspicions and probes (the evidence that slow members were told from dead ones)."""
        live = [self._process_report(w) for w in list(self.detector.members.values())]
        procs = sorted(self.liveness + live, key=lambda r: (r["role"], r["id"], r["pid"]))
        policy = self.config.liveness_policy
        return {
            "lease_s": policy.lease_s,
            "probe_timeout_s": policy.probe_timeout_s,
            "startup_timeout_s": policy.startup_timeout_s,
            "max_heartbeat_gap_s": max((p["max_heartbeat_gap_s"] for p in procs), default=0.0),
            "suspicions": sum(p["suspicions"] for p in procs),
            "probes_failed": sum(p["probes_failed"] for p in procs),
            "heartbeats_skipped": sum(p["heartbeats_skipped"] for p in procs),
            "watch_loop_max_gap_s": round(self.watch_max_gap_s, 3),
            "processes": procs,
        }

    def close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def stop_children(self, grace_s: float = 5.0) -> None:
        """SIGTERM every live child, then SIGKILL what is left after the grace period; reap all."""
        if self.prober is not None:
            self.prober.close()
        stop_all([c.handle for c in self.children], grace_s)
        self.spawner.close()
        # Same-host segments a killed worker made and had not unlinked yet (DESIGN §2).
        remove_leftovers(self.config.run_id)


def lost_or_exit(handle: Handle, exit_code: int) -> Cause:
    """Why a process the detector did not kill ended: its node was lost, or it exited."""
    reason = handle.lost()
    return node_lost(reason, exit_code) if reason is not None else exit_cause(exit_code)

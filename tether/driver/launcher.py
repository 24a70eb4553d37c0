"""`tether launch`: one run on this machine, through the same entry points a scheduler would use.

The launcher writes the run's config to the store, starts S `tether server` and W `tether worker`
child processes (each in this launcher's process group, with its log in <run-dir>/logs), watches
them, shows progress, and when the workers are done reads the final parameters from the shards,
evaluates them, stops the shards and writes the summary (DESIGN §1, §9). A member that exits, or
that the liveness detector finds frozen (tether/liveness.py: late heartbeats raise suspicion,
failed direct probes confirm it), is restarted with its cause recorded, up to --max-restarts;
then the run fails with a message naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from tether.config import RunConfig
from tether.driver.evaluate import Evaluator
from tether.driver.liveness import Cause, Detector, Kill, Probe, Watched, exit_cause
from tether.driver.probe import Prober
from tether.driver.progress import ProgressView
from tether.driver.supervisor import READY_FIELD, GiveUp, Supervisor, member_name
from tether.member.heartbeat import Heartbeat
from tether.proto.ps_pb2 import InfoReply
from tether.store import Member, Store, open_store
from tether.wire import FLOAT
from tether.worker.client import read_params

# One health check's deadline. A busy member answers well within it; a frozen one never does.
PROBE_ATTEMPT_S = 2.0


class RunFailed(RuntimeError):
    """The run could not finish; the message names the member that failed."""


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


@dataclass(slots=True)
class Child:
    role: str
    member_id: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    # Replaced while still alive (a pause followed by a replacement): its exit is expected and
    # restarts nothing; if it runs again it is a zombie the store fences (DESIGN §5).
    superseded: bool = False

    @property
    def name(self) -> str:
        return member_name(self.role, self.member_id)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.role, self.member_id, self.proc.pid)

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text[-lines:])


def member_command(
    role: str, store_uri: str, run_id: str, member_id: int, routes: dict[int, str] | None = None
) -> list[str]:
    """The exact command line a cluster scheduler would run for this member (DESIGN §1)."""
    flag = "--shard-id" if role == "server" else "--worker-id"
    cmd = [
        sys.executable, "-m", "tether", role,
        "--store", store_uri, "--run", run_id, flag, str(member_id),
    ]  # fmt: skip
    for shard, address in sorted((routes or {}).items()):
        cmd += ["--route", f"{shard}={address}"]
    return cmd


def resolve_config(config: RunConfig) -> RunConfig:
    """Fill in the data set's and model's sizes (and validate both names) before the run starts."""
    from dataclasses import replace

    from tether.tasks.data import load_dataset
    from tether.tasks.models import build_model, parse_model

    data = load_dataset(config.dataset)
    spec = parse_model(config.model)
    model = build_model(spec, data.in_dim, data.num_classes, device=config.device)
    if config.shards > model.num_params:
        raise ValueError(f"--shards {config.shards} exceeds the {model.num_params} parameters")
    return replace(
        config,
        model=spec.describe(),
        num_params=model.num_params,
        in_dim=data.in_dim,
        num_classes=data.num_classes,
    )


def params_sha256(flat: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(flat, dtype=FLOAT).tobytes()).hexdigest()


class Launcher:
    def __init__(self, opts: LaunchOptions, err: TextIO = sys.stderr) -> None:
        self.opts = opts
        self.config = opts.config
        self.err = err
        self.children: list[Child] = []
        self.store: Store | None = None
        self.epoch = 0  # the launcher's own membership epoch
        self.supervisor = Supervisor(opts.config.max_restarts)
        # What happened to the members, in order: exits, restarts, liveness kills, recoveries.
        # A chaos run reads it to time recoveries and to check that a zombie was fenced.
        self.events: list[dict[str, Any]] = []
        self.detector = Detector(opts.config.liveness_policy)
        self.prober = Prober(attempt_timeout_s=PROBE_ATTEMPT_S)
        self._kill_causes: dict[int, Cause] = {}  # pid -> why the detector killed it
        self.liveness: list[dict[str, Any]] = []  # what the detector saw of each ended process
        self._beats_skipped: dict[tuple[str, int, int], int] = {}  # as members last reported
        self.watch_max_gap_s = 0.0
        self.evaluator: Evaluator | None = None
        self._requests: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._requests_lock = threading.Lock()
        self._watching = False

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def _event(self, kind: str, child: Child, **detail: Any) -> None:
        self.events.append(
            {"t": time.time(), "kind": kind, "role": child.role, "id": child.member_id,
             "pid": child.proc.pid, **detail}
        )  # fmt: skip

    # -- control from another thread (chaos runs), executed by the watch loop ---------------

    def call(self, fn: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        """Run `fn` in the launcher's watch loop (which owns the children) and return its result.

        Raises LookupError when the loop is not running (before training or after the workers
        finished), rather than waiting for a loop that will not serve it.
        """
        future: Future[Any] = Future()
        with self._requests_lock:
            if not self._watching:
                raise LookupError("the run is not training now (not started, or finished)")
            self._requests.put((fn, future))
        return future.result(timeout=timeout_s)

    def _serve_requests(self) -> None:
        while True:
            try:
                fn, future = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller, not fatal to the run
                future.set_exception(e)

    def live_child(self, role: str, member_id: int) -> Child:
        """The current (not superseded) process of a member; call from the watch loop."""
        for child in self.children:
            if (child.role, child.member_id) == (role, member_id) and not child.superseded:
                if child.proc.poll() is None:
                    return child
        raise LookupError(f"{member_name(role, member_id)} has no live process right now")

    def signal_member(self, role: str, member_id: int, sig: int) -> int:
        """Send `sig` to a member's current process; returns its pid (call via `call`)."""
        child = self.live_child(role, member_id)
        child.proc.send_signal(sig)
        self._event("signal", child, signal=signal.Signals(sig).name)
        return child.proc.pid

    def signal_pid(self, pid: int, sig: int) -> None:
        """Send `sig` to one of this launcher's children by pid (e.g. resume a superseded one)."""
        for child in self.children:
            if child.proc.pid == pid and child.proc.poll() is None:
                child.proc.send_signal(sig)
                self._event("signal", child, signal=signal.Signals(sig).name)
                return
        raise LookupError(f"pid {pid} is not a live child of this launcher")

    def replace_member(self, role: str, member_id: int) -> int:
        """Start a replacement while the current process lives on (paused or partitioned).

        The replacement registers the next epoch; the old process is superseded: its exit
        restarts nothing, and the store fences it if it runs again (DESIGN §5).
        """
        old = self.live_child(role, member_id)
        old.superseded = True
        self._unwatch(old)  # left alive on purpose: a zombie for the store to fence
        self._event("superseded", old)
        new = self._spawn(role, member_id)
        self._event("replacement", new, replaces=old.proc.pid)
        return new.proc.pid

    def _spawn(self, role: str, member_id: int) -> Child:
        logs = self.opts.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{role}-{member_id}.log"
        routes = self.opts.routes.get(member_id) if role == "worker" else None
        cmd = member_command(role, self.opts.store_uri, self.config.run_id, member_id, routes)
        with open(log_path, "ab") as log:
            # stdin closed; children share the launcher's process group so one signal to the
            # group (Ctrl-C, a test's teardown) reaches all of them.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        child = Child(role, member_id, proc, log_path)
        self.children.append(child)
        self.detector.spawned(child.key, time.monotonic())
        self._event("start", child)
        return child

    def _unwatch(self, child: Child) -> None:
        watched = self.detector.forget(child.key)
        if watched is not None:
            self.liveness.append(self._process_report(watched))

    def _process_report(self, watched: Watched) -> dict[str, Any]:
        skipped = self._beats_skipped.pop(watched.key, 0)
        return self.detector.report(watched) | {"heartbeats_skipped": skipped}

    def _check_children(self, roles: tuple[str, ...]) -> None:
        for child in self.children:
            rc = child.proc.poll()
            if rc is None or child.role not in roles:
                continue
            if child.role == "server" or rc != 0:
                raise RunFailed(
                    f"{child.name} (pid {child.proc.pid}) exited with code {rc}; "
                    f"last lines of {child.log_path}:\n{child.log_tail()}"
                )

    def _wait_for(self, what: str, ready: Callable[[], bool]) -> None:
        timeout_s = self.config.startup_timeout_s
        deadline = time.monotonic() + timeout_s
        while not ready():
            self._check_children(("server", "worker"))
            if time.monotonic() > deadline:
                raise RunFailed(
                    f"{what} did not happen within {timeout_s:.0f}s (--startup-timeout)"
                )
            time.sleep(0.05)

    def start_shards(self) -> list[Member]:
        """Create the run in the store, start its shards and wait until all registered."""
        cfg = self.config
        self.opts.run_dir.mkdir(parents=True, exist_ok=True)
        store = self.store = open_store(self.opts.store_uri)
        store.create_run(cfg.run_id, cfg.to_dict())
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

    def run(self) -> dict[str, Any]:
        cfg = self.config
        t_start = time.monotonic()
        self.say(
            f"tether: run {cfg.run_id} — {cfg.consistency.describe()}, {cfg.shards} shards, "
            f"{cfg.workers} workers, {cfg.model} on {cfg.dataset}, {cfg.steps} steps, "
            f"{cfg.optimizer} lr={cfg.lr}, seed {cfg.seed}\n"
            f"tether: run dir {self.opts.run_dir}, store {self.opts.store_uri}"
        )
        try:
            shards = self.start_shards()
            store = self.store
            assert store is not None
            if self.opts.before_workers is not None:
                self.opts.before_workers(shards)
            for w in range(cfg.workers):
                self._spawn("worker", w)
            t_train = time.monotonic()
            beating = self._keep_alive()
            evaluator = None
            if self.opts.eval_interval_s is not None:
                evaluator = Evaluator(cfg, self.opts.store_uri, self.opts.eval_interval_s)
                evaluator.start()
            try:
                with ProgressView(cfg, self.err) as view:
                    self._watch(store, view)
            finally:
                beating.close()
                if evaluator is not None:
                    evaluator.close()
            self.evaluator = evaluator
            train_s = time.monotonic() - t_train
            summary = self._finish(store, t_start, train_s)
        except BaseException:
            self.stop_children()
            raise
        self.stop_children()
        store.set_member_state(cfg.run_id, "launcher", 0, self.epoch, "exited")
        store.finish_run(cfg.run_id, summary)
        (self.opts.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        store.close()
        return summary

    def _watch(self, store: Store, view: ProgressView) -> None:
        """Until every worker finished: restart dead members, time recoveries, show progress."""
        with self._requests_lock:
            self._watching = True
        try:
            self._watch_members(store, view)
        finally:
            with self._requests_lock:
                self._watching = False
            while not self._requests.empty():
                _, future = self._requests.get_nowait()
                future.set_exception(LookupError("the run finished before the request was served"))

    def _watch_members(self, store: Store, view: ProgressView) -> None:
        cfg = self.config
        done: set[int] = set()
        last_view = 0.0
        last_pass = time.monotonic()
        while len(done) < cfg.workers:
            now = time.monotonic()
            # How far this loop fell behind its 20 ms: on a loaded machine, the launcher too.
            self.watch_max_gap_s = max(self.watch_max_gap_s, now - last_pass)
            last_pass = now
            self._serve_requests()
            for child in list(self.children):
                rc = child.proc.poll()
                if rc is None or child.member_id in done and child.role == "worker":
                    continue
                self._unwatch(child)
                if child.superseded:
                    self.children.remove(child)
                    self._event("exit", child, exit_code=rc, superseded=True)
                    self.say(
                        f"tether: {child.name} (pid {child.proc.pid}, replaced) exited with "
                        f"code {rc}"
                    )
                    continue
                if child.role == "worker" and rc == 0:
                    done.add(child.member_id)
                    self._event("exit", child, exit_code=0)
                    continue
                cause = self._kill_causes.pop(child.proc.pid, None) or exit_cause(rc)
                self._event("exit", child, exit_code=rc, cause=cause.kind)
                self._restart(store, child, rc, cause)
            members = store.members(cfg.run_id)
            self._detect(members)
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
            now = time.monotonic()
            if now - last_view > 0.25:
                last_view = now
                view.update([m for m in members if m.role == "worker"])
            time.sleep(0.02)
        view.update(store.members(cfg.run_id, "worker"))

    def _keep_alive(self) -> Heartbeat:
        """Heartbeat from a thread with its own store handle (tether.member.heartbeat); returns it.

        The watch loop only reads the store, so a member frozen while it holds SQLite's write
        lock (writes wait on it; WAL reads do not) cannot stop the launcher from seeing the
        frozen member, probing it and killing it, which frees the lock.
        """

        def info() -> dict[str, Any]:
            return {
                "phase": "train",
                "restarts": self.supervisor.counts(),
                "recoveries": [r.to_json() for r in self.supervisor.recoveries],
            }

        return Heartbeat(
            self.opts.store_uri, self.config.run_id, "launcher", 0, self.epoch,
            interval_s=1.0, info=info,
        ).start()  # fmt: skip

    def _detect(self, members: list[Member]) -> None:
        """Feed the liveness detector what the store shows, then carry out what it decides.

        Probes go to the member's registered address directly, never through a chaos proxy: a
        broken link is not a dead process. A kill is only ever a confirmed one (the probes
        failed past --probe-timeout, or start-up ran past --startup-timeout); the exit it causes
        is restarted with that cause (DESIGN §5).
        """
        now = time.monotonic()
        by_key: dict[tuple[str, int, int], Member] = {
            (m.role, m.member_id, m.pid): m for m in members
        }
        for child in self.children:
            m = by_key.get(child.key)
            if m is not None and m.state == "running":
                serving = m.info.get(READY_FIELD[child.role]) is not None
                self.detector.heartbeat(child.key, m.heartbeat, serving, now)
                self._beats_skipped[child.key] = int(m.info.get("heartbeats_skipped", 0))
        for key, number, ok, error in self.prober.drain():
            self.detector.probe_result(key, number, ok, now, error)
        for action in self.detector.tick(now):
            m = by_key.get(action.key)
            if isinstance(action, Probe):
                self.prober.submit(action.key, action.number, m.address if m else "")
            elif isinstance(action, Kill):
                self._kill(action)

    def _kill(self, action: Kill) -> None:
        for child in self.children:
            if child.key == action.key and child.proc.poll() is None:
                self.say(f"tether: {child.name} (pid {child.proc.pid}) {action.cause.detail}")
                self._kill_causes[child.proc.pid] = action.cause
                self._event("liveness_kill", child, cause=action.cause.kind,
                            detail=action.cause.detail)  # fmt: skip
                child.proc.kill()
                return

    def _restart(self, store: Store, child: Child, rc: int, cause: Cause) -> None:
        cfg = self.config
        member = store.member(cfg.run_id, child.role, child.member_id)  # type: ignore[arg-type]
        epoch = member.epoch if member is not None else 0
        decision = self.supervisor.member_exited(
            child.role, child.member_id, rc, time.time(), epoch, cause
        )
        if isinstance(decision, GiveUp):
            raise RunFailed(
                f"{decision.message}; last lines of {child.log_path}:\n{child.log_tail()}"
            )
        self.children.remove(child)
        self.say(
            f"tether: {child.name} (pid {child.proc.pid}) {cause.detail}; restarting "
            f"({decision.attempt}/{cfg.max_restarts})"
        )
        self._spawn(child.role, child.member_id)

    def _finish(self, store: Store, t_start: float, train_s: float) -> dict[str, Any]:
        from tether.tasks.data import load_dataset
        from tether.tasks.models import build_model, parse_model

        cfg = self.config
        shards = store.members(cfg.run_id, "server")
        workers = store.members(cfg.run_id, "worker")
        flat, infos = read_params(cfg, shards)
        recoveries = self.supervisor.recoveries
        data = load_dataset(cfg.dataset)
        model = build_model(parse_model(cfg.model), data.in_dim, data.num_classes)
        final_loss, train_accuracy = model.evaluate(flat, data.x_train, data.y_train)
        if self.evaluator is not None:  # the last point of the loss curve: the final parameters
            store.log_metrics(cfg.run_id, [self.evaluator.row(final_loss, train_accuracy, infos)])
        _, test_accuracy = model.evaluate(flat, data.x_test, data.y_test)
        if self.opts.export is not None:
            self.opts.export.parent.mkdir(parents=True, exist_ok=True)
            np.savez(self.opts.export, params=flat)
        samples = cfg.workers * cfg.steps * cfg.batch_size
        return {
            "run_id": cfg.run_id,
            "run_dir": str(self.opts.run_dir),
            "store": self.opts.store_uri,
            "mode": cfg.mode,
            "staleness": cfg.staleness,
            "shards": cfg.shards,
            "workers": cfg.workers,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "model": cfg.model,
            "dataset": cfg.dataset,
            "num_params": cfg.num_params,
            "optimizer": cfg.optimizer,
            "lr": cfg.lr,
            "seed": cfg.seed,
            "final_loss": float(final_loss),
            "test_accuracy": float(test_accuracy),
            "updates_applied": min(i.updates_applied for i in infos),
            "pushes_accepted": sum(i.pushes_accepted for i in infos),
            "max_clock_gap": max(i.max_clock_gap for i in infos),
            "clock_gap_hist": _sum_hists([list(i.clock_gap_hist) for i in infos]),
            "version_staleness_hist": _sum_hists([list(i.staleness_hist) for i in infos]),
            "pull_wait_s": sum(i.pull_wait_s for i in infos),
            "wall_s": time.monotonic() - t_start,
            "train_s": train_s,
            "samples_per_s": samples / train_s,
            "params_sha256": params_sha256(flat),
            "replication": cfg.replication,
            "restarts": self.supervisor.counts(),
            "recovery_s": [r.recovery_s for r in recoveries if r.recovery_s is not None],
            "recoveries": [r.to_json() for r in recoveries],
            "liveness": self._liveness_report(),
            "lost_updates": lost_updates(workers),
            "ledger": audit_ledger(cfg.steps, infos, workers),
            "events": self.events,
            "durable_versions": [i.durable_version for i in infos],
            "replication_lag_max_s": max(i.replication_lag_max_s for i in infos),
            "export": str(self.opts.export) if self.opts.export else None,
        }

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

    def stop_children(self, grace_s: float = 5.0) -> None:
        """SIGTERM every live child, then SIGKILL what is left after the grace period; reap all."""
        self.prober.close()
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                child.proc.send_signal(signal.SIGCONT)  # a paused child handles it too
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


def lost_updates(workers: list[Member]) -> int:
    """Acknowledged updates that recoveries lost, from the workers' ack ledgers (DESIGN §5).

    Each worker reports, per shard recovery (shard:epoch), how far the restored version fell
    behind the highest version it had been acknowledged; the largest report per recovery counts.
    """
    worst: dict[str, int] = {}
    for m in workers:
        for key, n in (m.info.get("lost_updates") or {}).items():
            worst[key] = max(worst.get(key, 0), int(n))
    return sum(worst.values())


def audit_ledger(steps: int, infos: list[InfoReply], workers: list[Member]) -> dict[str, Any]:
    """The workers' ack ledgers against the shards' applied logs (DESIGN §7).

    A shard's log of worker w is its de-duplication entry: how many of w's pushes it accepted
    and the highest seq among them. Seqs are the iterations 0..steps-1, pushed in order, so after
    a complete run every shard must hold exactly `steps` pushes of every worker with last seq
    steps-1: fewer means a push is missing, more means one was applied twice. Every seq a worker
    saw acknowledged must be in the final log, and no recovery may have restored a log without
    a push that had been acknowledged (`lost_acked`, reported by the workers as they reconnect).
    """
    problems: list[str] = []
    by_id = {m.member_id: m for m in workers}
    applied = 0
    for info in infos:
        for entry in info.workers:
            applied += entry.clock
            where = f"shard {info.shard_id}, worker {entry.worker_id}"
            if entry.clock != entry.last_seq + 1:
                problems.append(
                    f"{where}: {entry.clock} pushes accepted but the last seq is "
                    f"{entry.last_seq} (a push applied twice or skipped)"
                )
            elif entry.clock != steps:
                problems.append(f"{where}: {entry.clock} of {steps} pushes in the log")
            member = by_id.get(entry.worker_id)
            acked = (member.info.get("acked_seqs") or []) if member else []
            if info.shard_id < len(acked) and acked[info.shard_id] > entry.last_seq:
                problems.append(
                    f"{where}: seq {acked[info.shard_id]} was acknowledged but the log ends "
                    f"at {entry.last_seq}"
                )
    lost = {
        f"worker {m.member_id} shard:epoch {key}": int(n)
        for m in workers
        for key, n in (m.info.get("lost_acked") or {}).items()
    }
    # `ok` is the log's consistency; acknowledged pushes lost to a crash are reported apart, as
    # async replication may lose its window by design (DESIGN §5) while sync must lose none.
    return {
        "ok": not problems,
        "problems": problems,
        "pushes_in_logs": applied,
        "lost_acked_pushes": sum(lost.values()),
        "lost_acked": lost,
    }


def _sum_hists(hists: list[list[int]]) -> list[int]:
    out = [0] * max((len(h) for h in hists), default=0)
    for h in hists:
        for i, v in enumerate(h):
            out[i] += v
    return out

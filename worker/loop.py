"""The `tether worker` process: one independent JAX program on one device (DESIGN §1, §3).

Iteration c: pull every shard's slice (the shard serves it when the consistency rule admits
clock c), compute the gradient on the mini-batch that (seed, worker id, c) selects, push each
slice of the gradient back with `(worker_id, clock=c, seq=c)`. The worker holds nothing that
cannot be rebuilt from the shards: its clock is read back from them at start (DESIGN §5).

This module is the I/O loop. Finding the shards again after a failure, and which failures call
for it, is `resolve.py`; what was acknowledged and what recoveries lost is the pure `AckLedger`
in `ledger.py`.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import numpy as np

from tether.config import RunConfig
from tether.malloc import tune_allocator
from tether.member.health import serve_health
from tether.member.heartbeat import Heartbeat, peak_rss_bytes
from tether.member.join import DEFAULT_RUN_WAIT_S, advertised_address, wait_for_run
from tether.member.report import WorkerReport
from tether.metrics.buckets import StepCounters
from tether.metrics.collect import (
    MetricsServer,
    WorkerCollector,
    listen_host,
    registry_of,
    serve_metrics,
)
from tether.proto import ps_pb2
from tether.retry import RetryPolicy, with_retry
from tether.store import (
    Fenced,
    MetricRow,
    Store,
    StoreError,
    StoreUnavailable,
    open_store,
)
from tether.tasks.build import context_of, runtime_of
from tether.transport import Security, TlsFiles, run_security
from tether.wire import Pieces
from tether.worker.client import ChannelClosed, InSegment, Pulled, prefetched
from tether.worker.ledger import AckLedger
from tether.worker.local import GRADS, PARAMS, LocalPath
from tether.worker.resolve import (
    Fatal,
    GiveUp,
    ResolvedShards,
    StaleShard,
    WorkerFailed,
    after_failure,
    status_of,
)

T = TypeVar("T")
EXIT_STOPPED = 128 + signal.SIGTERM  # the shell's code for a process ended by SIGTERM
# The worker's own per-step metric names; a task metric of the same name is logged as task.NAME.
_OWN = frozenset({"loss", "step_s", "pull_s", "push_s", "clock_gap", "read_version"})


def _settle(pending: Future[None] | None) -> None:
    """Wait for an in-flight push to end, success or not: after a failure the clock read back
    from the shards decides what is redone, so its own outcome no longer matters."""
    if pending is not None:
        with contextlib.suppress(Exception):
            pending.result()


def _each(pool: ThreadPoolExecutor, fn: Callable[[int], T], n: int) -> list[T]:
    """fn(0..n-1), on the pool's threads at once; on this thread when there is one (a hand-off
    to another thread and back costs more than a same-host call takes)."""
    return [fn(0)] if n == 1 else list(pool.map(fn, range(n)))


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e)


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    store_uri: str
    run_id: str
    worker_id: int
    heartbeat_s: float = 0.5
    listen: str = "127.0.0.1:0"  # where the liveness endpoint listens (port 0: a free one)
    advertise: str | None = None  # HOST[:PORT] the driver's probes dial, if not the listen host
    run_wait_s: float = DEFAULT_RUN_WAIT_S  # how long to wait for the run to be created
    # shard id -> "host:port" to dial instead of the shard's registered address: a fault proxy
    # in front of this worker's link to that shard (DESIGN §7). The store still names the shard
    # and its epoch; only the dialled address changes.
    routes: dict[int, str] = field(default_factory=dict)
    # Called once this worker has done its last step, with the store still open: a run without
    # a driver (`tether run create`) is concluded by its last worker (DESIGN §12). The CLI
    # passes the driver's conclusion (a layer above); its return value is the exit code.
    conclude: Callable[[Store, str, RunConfig, Security], int] | None = None
    spawn: str = ""  # the driver's token for this start (TETHER_SPAWN), read by the CLI
    tls: TlsFiles | None = None  # --tls-*: instead of the run config's files (DESIGN §13)
    allow_unauthenticated: bool = False  # call a run from before tokens without one
    metrics_port: int | None = None  # serve Prometheus metrics here (0: a free port; DESIGN §13)


class Worker:
    def __init__(
        self, opts: WorkerOptions, store: Store, config: RunConfig, security: Security
    ) -> None:
        if not 0 <= opts.worker_id < config.workers:
            raise ValueError(
                f"--worker-id {opts.worker_id} is outside 0..{config.workers - 1} for this run"
            )
        self.opts, self.store, self.config = opts, store, config
        self.security = security  # the run's token and TLS, for every channel (DESIGN §13)
        self.wid = opts.worker_id
        # The run's task (DESIGN §11): the user's loss and batches, differentiated with respect
        # to the parameter tree, which is made of views of `self.flat`.
        self.runtime = runtime_of(config)
        self.task = self.runtime.task
        self.ctx = context_of(config, "worker", self.wid, opts.store_uri)
        self.delay_s = config.stragglers.get(self.wid, 0) / 1000
        self.rng = random.Random(config.seed * 1_000_003 + self.wid)  # retry jitter only
        self.stop = threading.Event()
        self.run_finished = threading.Event()  # the store marks the run finished: stop, exit 0
        # Transient UNAVAILABLE is retried briefly; longer outages go through re-resolution.
        self.policy = RetryPolicy(attempts=3, initial_s=0.02, max_s=0.1)
        self.shards = ResolvedShards(store, config, opts.routes, self.policy, self.rng, security)
        # The ack ledger (DESIGN §7): what the shards acknowledged, audited against their applied
        # logs, and what their recoveries lost.
        self.ledger = AckLedger(config.shards)
        self.metric_rows: list[MetricRow] = []  # per-step metrics not yet in the store
        self.reconnects = 0
        # Counted every step whether metrics are served or not (DESIGN §13).
        self.steps = StepCounters()
        self.loss: float | None = None  # the last mini-batch loss
        self.epoch = 0  # this worker's membership epoch, set when it registers
        self.clock = 0  # iterations completed, read back from the shards in connect()
        self.ranges: list[tuple[int, int]] = []
        # The parameters as pulled, one view per shard's slice (set once the ranges are known).
        # Aligned, so that the parameter leaves JAX reads are views of it, not copies; the first
        # region of a new same-host segment at every resolution (DESIGN §2).
        self.local = LocalPath(config.run_id, self.wid, config.num_params, config.shared_memory)
        self.flat = np.empty(0, dtype=np.float32)  # made by connect()
        self.views: list[np.ndarray] = []
        self.all_mapped = False  # every shard has served a pull since the segment was made
        # Shards that could not map this segment (another machine): pulled as bytes until the
        # next resolution, without asking again.
        self.streamed: set[int] = set()
        # shard -> (clock, what it served): pulls answered in the reply of the last push.
        self.prefetched: dict[int, tuple[int, Pulled]] = {}
        # Threads start on first use; one per shard, so every pull and push runs at once.
        self.pool = ThreadPoolExecutor(max_workers=config.shards, thread_name_prefix="io")
        # Overlap (SSP/ASP): the push of clock c runs on its own threads while c+1 is pulled
        # and computed (each step's gradient is a fresh set of XLA buffers, so nothing is shared).
        self.overlap = config.overlap and not config.consistency.aggregates
        self.push_pool = ThreadPoolExecutor(max_workers=config.shards, thread_name_prefix="push")
        self.pusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")

    def connect(self) -> None:
        """Resolve every shard from the store and read this worker's clock back from them.

        The clock is the smallest any shard holds: iterations some shards already have are
        redone, and their pushes there are acknowledged as duplicates (DESIGN §5).
        """
        shards, infos = self.shards.resolve()
        self.ranges = [(i.offset, i.length) for i in infos]
        self.flat = self.local.renew()
        self.views = [self.flat[o : o + n] for o, n in self.ranges]
        self.all_mapped = False
        self.prefetched = {}
        self.streamed = set(self.opts.routes)  # a proxied link carries its bytes (DESIGN §7)
        for i, (m, info) in enumerate(zip(shards, infos, strict=True)):
            self.ledger.resolved(
                i,
                epoch=m.epoch,
                served_epoch=info.epoch,
                version=info.version,
                last_seq=info.workers[self.wid].last_seq,
            )
        self.clock = min(i.workers[self.wid].clock for i in infos)

    def _pull_all(self, clock: int) -> list[Pulled]:
        """Pull every shard's slice into its view of `self.flat`, in parallel; a slice the
        previous push's reply already carried (`prefetched`) is not pulled again."""
        ready, self.prefetched = self.prefetched, {}

        def pull(i: int) -> Pulled:
            if (have := ready.get(i)) is not None and have[0] == clock:
                got = have[1]
                self._check_epoch(i, got)
                return got
            segment = None if i in self.streamed else self.local.ref(PARAMS, self.ranges[i][0])
            got = with_retry(
                lambda: self.shards.clients[i].pull_into(
                    self.views[i],
                    worker_id=self.wid,
                    clock=clock,
                    wait_timeout_s=self.config.wait_timeout_s,
                    segment=segment,
                    request_id=self.local.next_request_id(),
                ),
                self.policy,
                self.rng,
            )
            self._check_epoch(i, got)
            if segment is not None and not got.in_segment:
                self.streamed.add(i)
            return got

        pulled = _each(self.pool, pull, len(self.shards.clients))
        if not self.all_mapped:
            self.all_mapped = True
            self.local.mapped()  # every shard has the segment mapped now, or streams bytes
        return pulled

    def _check_epoch(self, i: int, got: Pulled) -> None:
        resolved_at = self.shards.epochs[i]
        if got.epoch < resolved_at:
            # A zombie answered: its parameters are stale and must not be used (DESIGN §5).
            raise StaleShard(f"shard {i} answered at epoch {got.epoch} < {resolved_at}")

    def _next_pull(self, i: int, clock: int) -> ps_pb2.PullRequest | None:
        """The pull of `clock` to send with a same-host push (SSP/ASP, not overlapping: the
        overlapped push runs while that pull is already under way), or None."""
        segment = self.local.ref(PARAMS, self.ranges[i][0])
        if self.overlap or self.config.consistency.aggregates or clock >= self.config.steps:
            return None
        if segment is None:
            return None
        return ps_pb2.PullRequest(
            run_id=self.config.run_id,
            worker_id=self.wid,
            clock=clock,
            wait_timeout_ms=int(self.config.wait_timeout_s * 1000),
            segment=segment,
            request_id=self.local.next_request_id(),
        )

    def _push_all(self, grad: Pieces, clock: int, pulled: list[Pulled], loss: float) -> None:
        """Push each slice of the gradient to its shard, in parallel; retries reuse the seq."""

        def push(i: int) -> None:
            o, n = self.ranges[i]
            data: Pieces | InSegment = grad.slice(o, o + n)
            segment = self.local.ref(GRADS, o) if pulled[i].in_segment else None
            if segment is not None:
                # Written once, before any attempt: a retry sends the same bytes.
                self.local.write_grad(grad.slice(o, o + n), o)
                data = InSegment(segment, n)
            reply = with_retry(
                lambda: self.shards.clients[i].push(
                    data,
                    worker_id=self.wid,
                    clock=clock,
                    seq=clock,
                    read_version=pulled[i].version,
                    epoch=pulled[i].epoch,
                    loss=loss,
                    then_pull=self._next_pull(i, clock + 1) if segment is not None else None,
                ),
                self.policy,
                self.rng,
            )
            self.ledger.acked(i, seq=clock, version=reply.version)
            if (got := prefetched(reply)) is not None:
                self.prefetched[i] = (clock + 1, got)

        _each(self.push_pool, push, len(self.shards.clients))

    def run(self) -> None:
        config = self.config
        samples, wait_s, last_beat, t0 = 0, 0.0, 0.0, time.monotonic()
        failures = 0  # failed attempts at the current clock
        pending: Future[None] | None = None  # the push of the previous clock, when overlapping
        try:
            while self.clock < config.steps and not self.stop.is_set():
                clock = self.clock
                t_pull = time.monotonic()
                try:
                    pulled = self._pull_all(clock)
                    pull_s = time.monotonic() - t_pull
                    wait_s += pull_s
                    step = self.runtime.step(self.flat, self.task.batch(self.ctx, clock))
                    loss, metrics, grad = step.loss, step.metrics, step.grad
                    # The gradient's buffers are held by `grad` (and a push in flight) only, so
                    # they are freed as soon as their push is done: one gradient in memory, not
                    # two, while the next one is computed (BSP), two at most when overlapping.
                    del step
                    if self.delay_s:
                        time.sleep(self.delay_s)  # --straggler: a deliberately slow worker
                    if pending is not None:
                        # The previous clock's push: its failure is handled as this clock's,
                        # and the clock read back from the shards then says what to redo.
                        done, pending = pending, None
                        done.result()
                    t_push = time.monotonic()
                    if self.overlap and clock + 1 < config.steps:
                        pending = self.pusher.submit(self._push_all, grad, clock, pulled, loss)
                    else:
                        self._push_all(grad, clock, pulled, loss)
                    push_s = time.monotonic() - t_push  # overlapped: the hand-off only
                    del grad
                except (grpc.RpcError, StaleShard, ChannelClosed) as e:
                    _settle(pending)
                    pending = None
                    decision = after_failure(status_of(e), failures)
                    if isinstance(decision, Fatal):
                        raise
                    if isinstance(decision, GiveUp):
                        raise WorkerFailed(
                            f"worker {self.wid} made no progress at clock {clock} after "
                            f"{decision.resolutions} re-resolutions; last error: {_describe(e)}"
                        ) from e
                    failures += 1
                    self.reconnects += 1
                    self.connect()  # a shard may have been replaced: resolve, re-read the clock
                    continue
                failures = 0
                self.clock = clock + 1
                samples += config.batch_size
                now = time.monotonic()
                self.metric_rows.append(
                    MetricRow(
                        source=f"worker:{self.wid}",
                        step=clock,
                        t=time.time(),
                        values={
                            "loss": float(loss),
                            "step_s": now - t_pull,
                            "pull_s": pull_s,
                            # Until every shard acknowledged (with the next pull when fused).
                            "push_s": push_s,
                            # What the shards measured when they served this iteration's pulls.
                            "clock_gap": float(max(p.clock_gap for p in pulled)),
                            "read_version": float(sum(p.version for p in pulled)),
                            # The task's own metrics (its loss's aux dict), under their names.
                            **{k if k not in _OWN else f"task.{k}": v for k, v in metrics.items()},
                        },
                    )
                )
                self.loss = float(loss)
                self.steps.step(now - t_pull, pull_s, push_s, config.batch_size)
                self.steps.task = metrics
                if now - last_beat >= self.opts.heartbeat_s or self.clock == config.steps:
                    last_beat = now
                    self.report_progress(loss, samples / max(now - t0, 1e-9), wait_s)
        finally:
            _settle(pending)  # stopped early: let the last push end before the channels close
            for pool in (self.pusher, self.push_pool, self.pool):
                pool.shutdown(wait=True)
            self.shards.close()
            self.local.close()

    def start_heartbeat(self, metrics_url: str | None = None) -> Heartbeat:
        """Heartbeat from a thread with its own store connection, so a worker waiting at a
        barrier, compiling or flushing metrics still shows it is alive (DESIGN §5)."""

        def on_fenced(_: Fenced) -> None:
            self.stop.set()  # a newer incarnation of this worker took over

        def on_run_finished() -> None:
            self.run_finished.set()
            self.stop.set()

        return Heartbeat(
            self.opts.store_uri, self.config.run_id, "worker", self.wid, self.epoch,
            interval_s=self.opts.heartbeat_s, after_beat=self.shards.close_replaced,
            on_fenced=on_fenced, on_run_finished=on_run_finished, spawn=self.opts.spawn,
            metrics_url=metrics_url,
        ).start()  # fmt: skip

    def flush_metrics(self) -> None:
        """Write the per-step metrics gathered since the last flush (DESIGN §8).

        Metrics are observations, not state: if the store is unreachable they wait for the next
        flush rather than stop training.
        """
        if not self.metric_rows:
            return
        try:
            self.store.log_metrics(self.config.run_id, self.metric_rows)
        except StoreError as e:
            print(f"tether worker: metrics not written yet: {e}", file=sys.stderr, flush=True)
            return
        self.metric_rows = []

    def report_progress(self, loss: float, samples_per_s: float, wait_s: float) -> None:
        self.flush_metrics()
        try:
            self._write_progress(loss, samples_per_s, wait_s)
        except StoreUnavailable as e:
            # Progress reports are observations: training goes on and the next beat reports.
            print(f"tether worker: heartbeat not written: {e}", file=sys.stderr, flush=True)

    def progress(self, loss: float, samples_per_s: float, wait_s: float) -> WorkerReport:
        """What this worker publishes every heartbeat interval while it trains."""
        return WorkerReport(
            clock=self.clock,
            loss=loss,
            samples_per_s=samples_per_s,
            wait_s=wait_s,
            reconnects=self.reconnects,
            lost_updates=self.ledger.lost_updates,
            acked_seqs=tuple(self.ledger.acked_seqs),
            lost_acked=self.ledger.lost_acked,
            peak_rss_bytes=peak_rss_bytes(),
        )

    def metrics_sample(self) -> tuple[WorkerReport, StepCounters]:
        """What the metrics collector reads at a scrape (from the scraping thread)."""
        report = WorkerReport(clock=self.clock, loss=self.loss, reconnects=self.reconnects)
        return report, self.steps

    def publish(self, report: WorkerReport) -> None:
        """Merge `report` into this worker's record (fenced by its epoch)."""
        self.store.heartbeat(self.config.run_id, "worker", self.wid, self.epoch, report.to_info())

    def _write_progress(self, loss: float, samples_per_s: float, wait_s: float) -> None:
        self.publish(self.progress(loss, samples_per_s, wait_s))


def run_worker(opts: WorkerOptions) -> int:
    tune_allocator()
    store = open_store(opts.store_uri)
    record = wait_for_run(store, opts.run_id, opts.run_wait_s, "tether worker")
    config = RunConfig.from_dict(record.config)
    if record.finished:  # started again after the end (a scheduler's late retry): nothing to do
        print(f"tether worker: run {opts.run_id} has finished", file=sys.stderr)
        store.close()
        return 0
    if config.device == "gpu":
        # GPU scatter-adds may use atomics whose order varies; BSP promises bit-for-bit results.
        # Read by XLA when the backend starts, which is after import and before the first use.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()
    security = run_security(
        store, opts.store_uri, config, tls=opts.tls,
        allow_unauthenticated=opts.allow_unauthenticated, who="tether worker",
    )  # fmt: skip
    worker = Worker(opts, store, config, security)  # ValueError: bad id/device -> exit 2
    for sig in (signal.SIGTERM, signal.SIGINT):  # before registering: a stop is never fatal
        signal.signal(sig, lambda *_: worker.stop.set())
    # The worker's address in the store is its health endpoint: what the launcher's liveness
    # probe asks when the heartbeats fall silent (a frozen process cannot answer it).
    health_server, health_port = serve_health(opts.listen, worker.security)
    health_address = advertised_address(opts.listen, health_port, opts.advertise)
    metrics: MetricsServer | None = None
    if opts.metrics_port is not None:
        registry = registry_of(
            [WorkerCollector(opts.run_id, opts.worker_id, worker.metrics_sample)]
        )
        metrics = serve_metrics(
            registry, listen_host(opts.listen), opts.metrics_port, listen_host(health_address)
        )
    worker.epoch = store.register(
        opts.run_id,
        "worker",
        opts.worker_id,
        address=health_address,
        pid=os.getpid(),
        host=socket.gethostname(),
    )
    print(
        f"tether worker: worker {opts.worker_id} of run {opts.run_id} (seed {config.seed}, "
        f"device {config.device}, task {config.task or config.model}, "
        f"{worker.runtime.num_params} parameters)",
        file=sys.stderr,
        flush=True,
    )
    beat = worker.start_heartbeat(None if metrics is None else metrics.url)
    try:
        return _work(worker, store, opts, config)
    finally:
        beat.close()
        health_server.stop(grace=0)
        if metrics is not None:
            metrics.close()


def _work(worker: Worker, store: Store, opts: WorkerOptions, config: RunConfig) -> int:
    try:
        worker.connect()
        # "Serving again" for a restarted worker: its clock is read back from the shards.
        worker.publish(WorkerReport(clock=worker.clock, resumed_at=time.time()))
        worker.run()
    except (grpc.RpcError, WorkerFailed) as e:
        if worker.run_finished.is_set():  # the shards ended with the run: nothing is missing
            print(f"tether worker: run {opts.run_id} has finished", file=sys.stderr)
            return 0
        store.set_member_state(opts.run_id, "worker", opts.worker_id, worker.epoch, "failed")
        if isinstance(e, WorkerFailed):
            print(f"tether worker: {e}", file=sys.stderr)
            return 1
        print(
            f"tether worker: worker {opts.worker_id} failed at clock {worker.clock}: "
            f"{e.code().name}: {e.details()}",
            file=sys.stderr,
        )
        return 1
    try:
        # The last clock first: a driverless run's last worker reads it to know all are done.
        worker.publish(WorkerReport(clock=worker.clock))
        store.set_member_state(opts.run_id, "worker", opts.worker_id, worker.epoch, "exited")
    except Fenced:
        pass  # a newer incarnation of this worker owns the record now
    if worker.run_finished.is_set():
        store.close()
        print(f"tether worker: run {opts.run_id} has finished", file=sys.stderr)
        return 0
    if worker.clock < config.steps:
        # Stopped before its last step (SIGTERM, or replaced): not a success, so a supervisor
        # that sees the exit restarts it instead of taking the worker for finished.
        store.close()
        return EXIT_STOPPED
    try:
        return (
            0
            if opts.conclude is None
            else opts.conclude(store, opts.store_uri, config, worker.security)
        )
    finally:
        store.close()

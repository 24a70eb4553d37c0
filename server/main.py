"""The `tether server` process: one shard of one run (DESIGN §1).

It reads the run's config from the store, registers its address and epoch, starts heartbeating
(from its own thread and store connection, so that neither building or loading a large state nor
the replicator's writes delay a beat), builds or loads its slice of the parameters, serves gRPC on
the address it was given (port 0 picks a free port) with the standard health service that the
launcher's liveness probe asks, and stops gracefully on SIGTERM/SIGINT or once the store marks the
run finished (then it exits 0: how a scheduler's job ends, DESIGN §12). It waits for a run that
does not exist yet, and publishes `--advertise` when the address it listens on cannot be dialled.
A shard that learns from the store that a newer epoch replaced it stops serving and exits
(fencing, DESIGN §5).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tether.config import RunConfig
from tether.malloc import tune_allocator
from tether.member.heartbeat import Heartbeat
from tether.member.join import DEFAULT_RUN_WAIT_S, advertised_address, wait_for_run
from tether.metrics.collect import (
    MetricsServer,
    ShardCollector,
    ShardSample,
    listen_host,
    registry_of,
    serve_metrics,
)
from tether.proto import ps_pb2_grpc
from tether.server.codec import recover
from tether.server.host import ShardHost
from tether.server.replication import Compactor, Replicator
from tether.server.servicer import RawBytesServicer, ShardServicer
from tether.server.state import ShardSpec, ShardState, split_ranges
from tether.store import Fenced, Store, open_store
from tether.transport import Security, TlsFiles, run_security
from tether.wire import CHANNEL_OPTIONS

log = logging.getLogger("tether.server")
SERVICE_NAME = "tether.v1.ParameterServer"
ZOMBIE_LINGER_S = 1.0


def initial_params(config: RunConfig, offset: int, length: int) -> np.ndarray:
    """This shard's range of the run's initial flat vector, deterministic from (task, seed)."""
    if config.model.startswith("vector"):
        # A bare vector with no model behind it: what `tether bench pushpull` moves around.
        return np.zeros(length, dtype=np.float32)
    from tether.tasks.build import runtime_of  # JAX only when a task is used

    # On the CPU backend whatever the run's device: the same bits on every machine.
    return runtime_of(config, device="cpu").init_flat(config.seed, offset, offset + length)


def shard_spec(config: RunConfig, shard_id: int) -> ShardSpec:
    from tether.tasks.build import task_optimizer  # loads a task (and JAX) only if there is one

    if not 0 <= shard_id < config.shards:
        raise ValueError(f"--shard-id {shard_id} is outside 0..{config.shards - 1} for this run")
    offset, length = split_ranges(config.num_params, config.shards)[shard_id]
    return ShardSpec(
        run_id=config.run_id,
        shard_id=shard_id,
        offset=offset,
        length=length,
        num_workers=config.workers,
        consistency=config.consistency,
        optimizer=config.optimizer_config,
        chunk_bytes=config.chunk_bytes,
        replication=config.replication_policy,
        transformation=task_optimizer(config),  # None unless the task names its own
        guard=config.gradient_guard,
    )


def create_server(address: str, *, max_workers: int, security: Security) -> tuple[grpc.Server, int]:
    """Build and bind (not start) a server; returns the bound port (grpc examples).

    Binding first lets a shard publish its address while it is still loading its state: a
    worker that connects early is refused and retries. ``security`` is the run's token and TLS
    (DESIGN §13).
    """
    return security.server(address, max_workers=max_workers, name="shard", options=CHANNEL_OPTIONS)


def add_services(server: grpc.Server, servicer: ShardServicer) -> health.HealthServicer:
    """Register the shard, raw-bytes and health services (before the server starts)."""
    ps_pb2_grpc.add_ParameterServerServicer_to_server(servicer, server)
    ps_pb2_grpc.add_RawBytesServicer_to_server(RawBytesServicer(), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return health_servicer


def pool_size(num_workers: int) -> int:
    # Every worker may hold one waiting pull and one push at once, plus status/bench calls: the
    # pool must exceed that so a waiting pull never starves the push that would release it.
    return 2 * num_workers + 8


@dataclass(frozen=True, slots=True)
class ServerOptions:
    store_uri: str
    run_id: str
    shard_id: int
    listen: str = "127.0.0.1:0"
    advertise: str | None = None  # HOST[:PORT] others dial, when --listen names no such host
    heartbeat_s: float = 0.5
    run_wait_s: float = DEFAULT_RUN_WAIT_S  # how long to wait for the run to be created
    spawn: str = ""  # the driver's token for this start (TETHER_SPAWN), read by the CLI
    tls: TlsFiles | None = None  # --tls-*: instead of the run config's files (DESIGN §13)
    allow_unauthenticated: bool = False  # serve a run from before tokens without one
    metrics_port: int | None = None  # serve Prometheus metrics here (0: a free port; DESIGN §13)


def load_or_init(store: Store, config: RunConfig, spec: ShardSpec, epoch: int) -> ShardState:
    """Claim the shard for `epoch`, then rebuild it from its replicated base and log, if any.

    Claiming first fences every older epoch: once the claim is made, a paused or partitioned
    predecessor can no longer append, so the log loaded next ends where the shard will go on
    (DESIGN §5).
    """
    store.claim_shard(config.run_id, spec.shard_id, epoch)
    started = time.perf_counter()
    stored = store.load_shard_log(config.run_id, spec.shard_id)
    load_s = time.perf_counter() - started
    state = recover(spec, epoch, stored, lambda: initial_params(config, spec.offset, spec.length))
    if state.recovered is not None:
        state.recovered["load_s"] = load_s
    return state


def _restored(recovered: dict[str, Any], version: int) -> str:
    return (
        f", restored version {version}: base {recovered['base_version']} and "
        f"{recovered['entries']} log entries (read {recovered.get('load_s', 0):.3f}s, replayed "
        f"{recovered['replay_s']:.3f}s)"
    )


def _metrics_sample(
    serving: list[ShardServicer], adapters: list[Replicator | Compactor]
) -> ShardSample | None:
    """What the shard's metrics collector reads at a scrape (DESIGN §13): the report under the
    lock, as the heartbeat takes it, and what the replicator and compactor counted."""
    if not serving:
        return None
    servicer = serving[0]
    with servicer.host.locked() as state:
        report = state.report(servicer.counters)
        dirty_since, status = state.log.dirty_since, state.status
    replicators = [a for a in adapters if isinstance(a, Replicator)]
    compactors = [a for a in adapters if isinstance(a, Compactor)]
    return ShardSample(
        report=report,
        counters=servicer.counters,
        serving=status == "serving",
        replication_lag_s=0.0 if dirty_since is None else max(time.time() - dirty_since, 0.0),
        appended_bytes=sum(r.appended_bytes for r in replicators),
        appends=sum(r.appends for r in replicators),
        compactions=sum(c.bases for c in compactors),
    )


def serve(opts: ServerOptions) -> int:
    tune_allocator()
    store = open_store(opts.store_uri)
    record = wait_for_run(store, opts.run_id, opts.run_wait_s, "tether server")
    config = RunConfig.from_dict(record.config)
    spec = shard_spec(config, opts.shard_id)
    if record.finished:  # started again after the end (a scheduler's late retry): nothing to do
        print(f"tether server: run {opts.run_id} has finished", file=sys.stderr)
        store.close()
        return 0
    # Signals first: a stop requested while the state is still loading is honoured, not fatal.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    security = run_security(
        store, opts.store_uri, config, tls=opts.tls,
        allow_unauthenticated=opts.allow_unauthenticated, who="tether server",
    )  # fmt: skip
    server, port = create_server(
        opts.listen, max_workers=pool_size(config.workers), security=security
    )
    address = advertised_address(opts.listen, port, opts.advertise)
    epoch = store.register(
        opts.run_id, "server", opts.shard_id, address=address, pid=os.getpid(),
        host=socket.gethostname(),
    )  # fmt: skip
    serving: list[ShardServicer] = []  # the servicer, once the state is loaded and served
    adapters: list[Replicator | Compactor] = []
    metrics: MetricsServer | None = None
    if opts.metrics_port is not None:
        collector = ShardCollector(
            opts.run_id, opts.shard_id, lambda: _metrics_sample(serving, adapters)
        )
        metrics = serve_metrics(
            registry_of([collector]), listen_host(opts.listen), opts.metrics_port,
            listen_host(address),
        )  # fmt: skip
    fenced: list[Fenced] = []
    failed: list[BaseException] = []
    finished = threading.Event()  # the store marks the run finished: stop, and exit 0

    def on_run_finished() -> None:
        finished.set()
        stop.set()

    def on_fenced(e: Fenced) -> None:
        # A replacement registered a newer epoch: this shard is a zombie (DESIGN §5).
        fenced.append(e)
        stop.set()

    def beat_info() -> dict[str, Any]:
        if not serving:
            return {"phase": "starting"}
        return serving[0].heartbeat_info(lock_timeout_s=0.05)

    beat = Heartbeat(
        opts.store_uri, opts.run_id, "server", opts.shard_id, epoch,
        interval_s=opts.heartbeat_s, info=beat_info, on_fenced=on_fenced,
        on_run_finished=on_run_finished, spawn=opts.spawn,
        metrics_url=metrics.url if metrics is not None else None,
    ).start()  # fmt: skip
    state = load_or_init(store, config, spec, epoch)
    restored = state.restored_version
    shard = ShardHost(state)  # the one lock the servicer and the replicator share
    servicer = ShardServicer(shard, wait_timeout_s=config.wait_timeout_s)
    health_servicer = add_services(server, servicer)
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    servicer.serving_since = time.time()
    serving.append(servicer)

    def on_failure(e: BaseException) -> None:
        if isinstance(e, Fenced):
            fenced.append(e)
        else:
            failed.append(e)
        stop.set()

    replicator = compactor = None
    if spec.replication.mode != "off":
        replicator = Replicator(shard, store, on_failure=on_failure, seed=config.seed)
        replicator.start()
        compactor = Compactor(
            shard, store, on_failure=on_failure, seed=config.seed,
            initial=lambda: initial_params(config, spec.offset, spec.length),
        )  # fmt: skip
        compactor.start()
        adapters += [replicator, compactor]
    print(
        f"tether server: shard {opts.shard_id} of run {opts.run_id} serving "
        f"[{spec.offset}, {spec.offset + spec.length}) on {address} at epoch {epoch}, "
        f"replication {spec.replication.mode}, {security.describe()}"
        + (", fresh state" if state.recovered is None else _restored(state.recovered, restored)),
        file=sys.stderr,
        flush=True,
    )
    stop.wait()
    beat.close()
    shard.stop(fenced=bool(fenced))
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if compactor is not None:
        compactor.stop()
    if replicator is not None:
        replicator.stop()  # flushes the last changes on a graceful stop; a zombie writes nothing
    if fenced:
        # A resumed zombie's clients are mid-call right now: refuse them with
        # FAILED_PRECONDITION ("re-resolve") for a moment rather than have the server's shutdown
        # cancel their calls, which tells them nothing.
        time.sleep(ZOMBIE_LINGER_S)
    server.stop(grace=2.0).wait()
    if metrics is not None:
        metrics.close()
    if fenced:
        print(f"tether server: shard {opts.shard_id} fenced: {fenced[0]}", file=sys.stderr)
    elif failed:
        print(f"tether server: shard {opts.shard_id} failed: {failed[0]!r}", file=sys.stderr)
        store.set_member_state(opts.run_id, "server", opts.shard_id, epoch, "failed")
    else:
        store.set_member_state(opts.run_id, "server", opts.shard_id, epoch, "exited")
        if finished.is_set():
            print(f"tether server: run {opts.run_id} has finished", file=sys.stderr)
    store.close()
    return 1 if fenced or failed else 0

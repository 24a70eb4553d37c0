"""The `tether worker` process: one independent JAX program on one device (DESIGN.md §1, §3).

Iteration c: pull every shard's slice (the shard serves it when the consistency rule admits
clock c), compute the gradient on the mini-batch that (seed, worker id, c) selects, push each
slice of the gradient back with `(worker_id, clock=c, seq=c)`. The worker holds nothing that
cannot be rebuilt from the shards: its clock is read back from them at start (DESIGN §5).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
from tether.worker.client import Pulled, RetryPolicy, ShardClient, with_retry
from tether.worker.data import batch_indices, load_dataset, partition
from tether.worker.models import build_model, parse_model

from tether.alloc import tune_allocator
from tether.config import RunConfig
from tether.store import Member, Store, open_store
from tether.wire import FLOAT


class WorkerFailed(RuntimeError):
    """The run cannot go on from this worker; the message names the cause."""


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    store_uri: str
    run_id: str
    worker_id: int
    heartbeat_s: float = 0.5


def wait_for_shards(store: Store, config: RunConfig, timeout_s: float) -> list[Member]:
    """The shards' members, once all of them have registered an address (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while True:
        shards = [m for m in store.members(config.run_id, "server") if m.state == "running"]
        if len(shards) == config.shards:
            return sorted(shards, key=lambda m: m.member_id)
        if time.monotonic() >= deadline:
            have = sorted(m.member_id for m in shards)
            raise WorkerFailed(
                f"only shards {have} of {config.shards} registered within {timeout_s:.0f}s"
            )
        time.sleep(0.1)


class Worker:
    def __init__(self, opts: WorkerOptions, store: Store, config: RunConfig) -> None:
        if not 0 <= opts.worker_id < config.workers:
            raise ValueError(
                f"--worker-id {opts.worker_id} is outside 0..{config.workers - 1} for this run"
            )
        self.opts, self.store, self.config = opts, store, config
        self.wid = opts.worker_id
        self.dataset = load_dataset(config.dataset)
        self.model = build_model(
            parse_model(config.model),
            self.dataset.in_dim,
            self.dataset.num_classes,
            device=config.device,
        )
        if self.model.num_params != config.num_params:
            raise ValueError(
                f"model {config.model} has {self.model.num_params} parameters but the run "
                f"expects {config.num_params}"
            )
        self.part = partition(len(self.dataset.y_train), config.workers, self.wid)
        self.delay_s = config.stragglers.get(self.wid, 0) / 1000
        self.rng = random.Random(config.seed * 1_000_003 + self.wid)  # retry jitter only
        self.stop = threading.Event()
        self.clients: list[ShardClient] = []
        self.policy = RetryPolicy()
        self.epoch = 0  # this worker's membership epoch, set when it registers
        self.clock = 0  # iterations completed, read back from the shards in connect()
        self.ranges: list[tuple[int, int]] = []

    def connect(self) -> None:
        shards = wait_for_shards(self.store, self.config, self.config.wait_timeout_s)
        self.clients = [
            ShardClient(m.address, self.config.run_id, chunk_bytes=self.config.chunk_bytes)
            for m in shards
        ]
        infos = [with_retry(c.info, RetryPolicy(), self.rng) for c in self.clients]
        self.ranges = [(i.offset, i.length) for i in infos]
        clocks = {i.workers[self.wid].clock for i in infos}
        if len(clocks) != 1:
            raise WorkerFailed(f"worker {self.wid}: shards disagree on its clock: {sorted(clocks)}")
        self.clock = clocks.pop()

    def _pull_all(self, clock: int) -> list[Pulled]:
        """Pull every shard's slice into its view of `self.flat`, in parallel."""

        def pull(i: int) -> Pulled:
            return with_retry(
                lambda: self.clients[i].pull_into(
                    self.views[i],
                    worker_id=self.wid,
                    clock=clock,
                    wait_timeout_s=self.config.wait_timeout_s,
                ),
                self.policy,
                self.rng,
            )

        return list(self.pool.map(pull, range(len(self.clients))))

    def _push_all(self, grad: np.ndarray, clock: int, pulled: list[Pulled], loss: float) -> None:
        """Push each slice of the gradient to its shard, in parallel; retries reuse the seq."""

        def push(i: int) -> None:
            o, n = self.ranges[i]
            with_retry(
                lambda: self.clients[i].push(
                    grad[o : o + n],
                    worker_id=self.wid,
                    clock=clock,
                    seq=clock,
                    read_version=pulled[i].version,
                    epoch=pulled[i].epoch,
                    loss=loss,
                ),
                self.policy,
                self.rng,
            )

        list(self.pool.map(push, range(len(self.clients))))

    def run(self) -> None:
        config = self.config
        self.flat = np.empty(config.num_params, dtype=FLOAT)
        self.views = [self.flat[o : o + n] for o, n in self.ranges]
        self.pool = ThreadPoolExecutor(max_workers=len(self.clients), thread_name_prefix="io")
        x, y = self.dataset.x_train, self.dataset.y_train
        samples, wait_s, last_beat, t0 = 0, 0.0, 0.0, time.monotonic()
        try:
            while self.clock < config.steps and not self.stop.is_set():
                clock = self.clock
                t_pull = time.monotonic()
                pulled = self._pull_all(clock)
                wait_s += time.monotonic() - t_pull
                idx = batch_indices(self.part, config.batch_size, config.seed, self.wid, clock)
                loss, grad = self.model.loss_and_grad(self.flat, x[idx], y[idx])
                if self.delay_s:
                    time.sleep(self.delay_s)  # --straggler: a deliberately slow worker
                self._push_all(grad, clock, pulled, loss)
                self.clock = clock + 1
                samples += len(idx)
                now = time.monotonic()
                if now - last_beat >= self.opts.heartbeat_s or self.clock == config.steps:
                    last_beat = now
                    self.beat(loss, samples / max(now - t0, 1e-9), wait_s)
        finally:
            self.pool.shutdown(wait=True)
            for c in self.clients:
                c.close()

    def beat(self, loss: float, samples_per_s: float, wait_s: float) -> None:
        self.store.heartbeat(
            self.config.run_id,
            "worker",
            self.wid,
            self.epoch,
            {
                "clock": self.clock,
                "loss": loss,
                "samples_per_s": samples_per_s,
                "wait_s": wait_s,
            },
        )


def run_worker(opts: WorkerOptions) -> int:
    tune_allocator()
    store = open_store(opts.store_uri)
    config = RunConfig.from_dict(store.get_run(opts.run_id).config)
    if config.device == "gpu":
        # GPU scatter-adds may use atomics whose order varies; BSP promises bit-for-bit results.
        # Read by XLA when the backend starts, which is after import and before the first use.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()
    worker = Worker(opts, store, config)  # ValueError: bad id/device -> exit 2 at the edge
    worker.epoch = store.register(
        opts.run_id,
        "worker",
        opts.worker_id,
        address="",
        pid=os.getpid(),
        host=socket.gethostname(),
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop.set())
    print(
        f"tether worker: worker {opts.worker_id} of run {opts.run_id} (seed {config.seed}, "
        f"device {config.device}, {len(worker.part)} samples)",
        file=sys.stderr,
        flush=True,
    )
    try:
        worker.connect()
        worker.run()
    except grpc.RpcError as e:
        store.set_member_state(opts.run_id, "worker", opts.worker_id, worker.epoch, "failed")
        print(
            f"tether worker: worker {opts.worker_id} failed at clock {worker.clock}: "
            f"{e.code().name}: {e.details()}",
            file=sys.stderr,
        )
        return 1
    except WorkerFailed as e:
        store.set_member_state(opts.run_id, "worker", opts.worker_id, worker.epoch, "failed")
        print(f"tether worker: {e}", file=sys.stderr)
        return 1
    state = "exited" if worker.clock >= config.steps else "stopped"
    store.set_member_state(opts.run_id, "worker", opts.worker_id, worker.epoch, state)
    store.close()
    return 0

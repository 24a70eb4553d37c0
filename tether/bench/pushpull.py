"""`tether bench pushpull`: shard push/pull throughput against raw gRPC bytes (DESIGN §9).

The shards are real `tether server` processes of a throw-away run whose model is a bare float32
vector. In the same run, on the same servers and channels, it measures:

- push: a float32 vector on the client until every shard acknowledged it applied (optimizer step
  included);
- pull: the request until the whole vector is a numpy array on the client;
- raw push / raw pull: the same number of bytes in the same chunk size through a gRPC stream that
  does no parameter-server work (the RawBytes service), the baseline the ratios are taken against.

Reported figures are medians over the timed rounds, in gigabits per second.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from tether.bench.timing import interleaved_medians
from tether.config import RunConfig
from tether.devtools.certs import create_certs
from tether.driver.api import new_run
from tether.driver.launcher import Launcher, LaunchOptions
from tether.malloc import tune_allocator
from tether.proto import ps_pb2, ps_pb2_grpc
from tether.store import default_store_uri
from tether.transport import Security
from tether.wire import FLOAT
from tether.worker.client import ShardClient


@dataclass(frozen=True, slots=True)
class BenchOptions:
    size_mb: float = 16.0
    shards: int = 1
    repeats: int = 20
    optimizer: str = "sgd"
    warmup: int = 2
    tls: bool = False  # also time the same shards' path over mutual TLS, interleaved

    def __post_init__(self) -> None:
        if not 0 < self.size_mb <= 1024:
            raise ValueError(f"--size-mb must be in (0, 1024], got {self.size_mb}")
        if self.shards < 1 or self.repeats < 1:
            raise ValueError("--shards and --repeats must be >= 1")


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / 1e9 / seconds


def bench_pushpull(opts: BenchOptions, err: TextIO = sys.stderr) -> dict[str, Any]:
    tune_allocator()  # the same tuning the shard and worker processes run with
    n = int(opts.size_mb * (1 << 20)) // FLOAT.itemsize
    with (
        tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp,
        contextlib.ExitStack() as on_exit,
    ):
        root = Path(tmp)

        def shards(name: str, **tls: str) -> tuple[RunConfig, list[str], Security]:
            # A run with no workers: this process is worker 0, so the shards are started alone
            # rather than through `run`.
            config = new_run(
                shards=opts.shards, workers=1, mode="asp", model=f"vector:{n}",
                optimizer=opts.optimizer, lr=1e-3, steps=1, replication="off", **tls,
            )  # fmt: skip
            run_dir = root / name
            launcher = Launcher(
                LaunchOptions(config=config, run_dir=run_dir, store_uri=default_store_uri(run_dir)),
                err=err,
            )
            on_exit.callback(_stop, launcher)
            members = launcher.start_shards()
            assert launcher.security is not None  # made with the run
            return config, [m.address for m in members], launcher.security

        plain = shards("plain")
        if not opts.tls:
            return _measure(opts, [plain], n, err)
        files = create_certs(root / "certs")
        secured = shards(
            "tls", tls_cert=str(files.cert), tls_key=str(files.key), tls_ca=str(files.ca)
        )
        return _measure(opts, [plain, secured], n, err)


def _stop(launcher: Launcher) -> None:
    launcher.stop_children()
    if launcher.store is not None:
        launcher.store.close()


Served = tuple[RunConfig, list[str], Security]


def _measure(opts: BenchOptions, runs: list[Served], n: int, err: TextIO) -> dict[str, Any]:
    """Time the operations of each run, interleaved round by round: the first run's are named
    ``push``, ``pull``, ``raw_push``, ``raw_pull``; a second one's (TLS) the same with ``tls_``."""
    ops: dict[str, Callable[[], None]] = {}
    closers: list[Callable[[], None]] = []
    for prefix, (config, addresses, security) in zip(("", "tls_"), runs, strict=False):
        named, close = _operations(config, addresses, n, security)
        ops |= {prefix + k: v for k, v in named.items()}
        closers.append(close)
    config, addresses, _ = runs[0]
    nbytes = n * FLOAT.itemsize
    chunk = config.chunk_bytes
    print(
        f"tether bench: {nbytes / 2**20:.1f} MiB over {len(addresses)} shard(s)"
        + (", plaintext against mutual TLS" if len(runs) > 1 else ""),
        file=err,
    )
    try:
        t = interleaved_medians(ops, opts.repeats, opts.warmup)
    finally:
        for close in closers:
            close()
    result: dict[str, Any] = {
        "size_mb": nbytes / 2**20,
        "shards": len(addresses),
        "optimizer": opts.optimizer,
        "repeats": opts.repeats,
        "chunk_bytes": chunk,
        "push_gbps": _gbps(nbytes, t["push"]),
        "pull_gbps": _gbps(nbytes, t["pull"]),
        "raw_push_gbps": _gbps(nbytes, t["raw_push"]),
        "raw_pull_gbps": _gbps(nbytes, t["raw_pull"]),
    }
    result["push_ratio"] = result["push_gbps"] / result["raw_push_gbps"]
    result["pull_ratio"] = result["pull_gbps"] / result["raw_pull_gbps"]
    if len(runs) > 1:
        for op in ("push", "pull"):
            result[f"tls_{op}_gbps"] = _gbps(nbytes, t[f"tls_{op}"])
            # TLS against plaintext on the same path, in the same rounds: the target
            # is >= 0.75 for push and pull.
            result[f"tls_{op}_ratio"] = t[op] / t[f"tls_{op}"]
    return result


def _operations(
    config: RunConfig, addresses: list[str], n: int, security: Security
) -> tuple[dict[str, Callable[[], None]], Callable[[], None]]:
    """Push, pull and the raw-bytes baselines against one run's shards; and how to close."""
    clients = [
        ShardClient(a, config.run_id, security=security, chunk_bytes=config.chunk_bytes)
        for a in addresses
    ]
    raw_stubs = [ps_pb2_grpc.RawBytesStub(c.channel) for c in clients]
    infos = [c.info() for c in clients]
    ranges = [(i.offset, i.length) for i in infos]
    grad = np.random.default_rng(0).standard_normal(n).astype(FLOAT) * np.float32(1e-3)
    out = np.empty(n, dtype=FLOAT)
    pool = ThreadPoolExecutor(max_workers=len(clients))
    clock = [0]
    versions = [0] * len(clients)
    epochs = [i.epoch for i in infos]
    chunk = config.chunk_bytes
    raw_chunks = [
        [bytes(min(chunk, ln * 4 - k)) for k in range(0, ln * 4, chunk)] for _, ln in ranges
    ]

    def each(fn: Callable[[int], Any]) -> None:
        list(pool.map(fn, range(len(clients))))

    def push_one(i: int) -> None:
        o, ln = ranges[i]
        reply = clients[i].push(
            grad[o : o + ln], worker_id=0, clock=clock[0], seq=clock[0],
            read_version=versions[i], epoch=epochs[i],
        )  # fmt: skip
        assert reply.applied, "an ASP push is applied on arrival"
        versions[i] = reply.version

    def pull_one(i: int) -> None:
        o, ln = ranges[i]
        got = clients[i].pull_into(out[o : o + ln], worker_id=0, clock=clock[0])
        versions[i] = got.version

    def push() -> None:
        each(push_one)
        clock[0] += 1

    def pull() -> None:
        each(pull_one)

    def raw_push_one(i: int) -> None:
        ack = raw_stubs[i].Sink(ps_pb2.RawChunk(data=d) for d in raw_chunks[i])
        assert ack.nbytes == ranges[i][1] * 4

    def raw_pull_one(i: int) -> None:
        req = ps_pb2.RawRequest(nbytes=ranges[i][1] * 4, chunk_bytes=chunk)
        got = sum(len(m.data) for m in raw_stubs[i].Source(req))
        assert got == ranges[i][1] * 4

    def close() -> None:
        pool.shutdown()
        for c in clients:
            c.close()

    ops = {
        "push": push,
        "raw_push": lambda: each(raw_push_one),
        "pull": pull,
        "raw_pull": lambda: each(raw_pull_one),
    }
    return ops, close

"""`tether bench pushpull`: shard push/pull throughput against raw gRPC bytes (DESIGN §9).

The shards are real `tether server` processes of a throw-away run whose model is a bare float32
vector. In the same run, on the same servers and channels, it measures:

- push: a float32 vector on the client until every shard acknowledged it applied (optimizer step
  included);
- pull: the request until the whole vector is a numpy array on the client;
- raw push / raw pull: the same number of bytes in the same chunk size through a gRPC stream that
  does no parameter-server work (the RawBytes service), the baseline the ratios are taken against.

Reported figures are medians over the timed rounds, in gigabits per second.

With `metrics` (`--metrics`) the shards serve Prometheus metrics (`--metrics-port 0`, DESIGN
§13), and the rounds also time a push and a pull while a scraper scrapes every shard's /metrics
every `scrape_interval_s` (`push_scraped`, `pull_scraped`; the scraper only runs during those),
interleaved with the unscraped ones, and a scrape alone. `metrics_push_ratio` and
`metrics_pull_ratio` are scraped throughput over unscraped, from the mean round (a scrape lands
in few rounds: a median would not see it); `scrape_ms_median` and `scrape_ms_p99` are what one
scrape of one shard took. What the shards count for the metrics is counted in every round: it is
not optional (DESIGN §13).

With `tls` (`--tls`) a second set of shards serves mutual TLS (throw-away certificates from
`tether certs create`'s code), and the same push and pull are timed through them in the same
rounds (`tls_push`, `tls_pull`): `tls_push_ratio` and `tls_pull_ratio` are TLS throughput over
plaintext, from the medians.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from tether.bench.timing import interleaved_times
from tether.config import RunConfig
from tether.devtools.certs import create_certs
from tether.driver.api import new_run
from tether.driver.launcher import Launcher, LaunchOptions
from tether.malloc import tune_allocator
from tether.member.view import MemberView
from tether.proto import ps_pb2, ps_pb2_grpc
from tether.retry import poll_until
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
    metrics: bool = False  # serve and scrape the shards' metrics in half of the rounds
    scrape_interval_s: float = 1.0  # how often those rounds' scraper scrapes every shard
    tls: bool = False  # also time the same path through shards serving mutual TLS

    def __post_init__(self) -> None:
        if not 0 < self.size_mb <= 1024:
            raise ValueError(f"--size-mb must be in (0, 1024], got {self.size_mb}")
        if self.shards < 1 or self.repeats < 1:
            raise ValueError("--shards and --repeats must be >= 1")


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / 1e9 / seconds


Served = tuple[RunConfig, list[str], Security]


def bench_pushpull(opts: BenchOptions, err: TextIO = sys.stderr) -> dict[str, Any]:
    tune_allocator()  # the same tuning the shard and worker processes run with
    n = int(opts.size_mb * (1 << 20)) // FLOAT.itemsize
    with (
        tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp,
        contextlib.ExitStack() as on_exit,
    ):
        root = Path(tmp)

        def shards(name: str, metrics: bool, **tls: str) -> tuple[Served, Launcher]:
            # A run with no workers: this process is worker 0, so the shards are started alone
            # rather than through `run`.
            config = new_run(
                shards=opts.shards, workers=1, mode="asp", model=f"vector:{n}",
                optimizer=opts.optimizer, lr=1e-3, steps=1, replication="off", **tls,
            )  # fmt: skip
            run_dir = root / name
            launcher = Launcher(
                LaunchOptions(
                    config=config, run_dir=run_dir, store_uri=default_store_uri(run_dir),
                    metrics_port=0 if metrics else None,
                ),
                err=err,
            )  # fmt: skip
            on_exit.callback(_stop, launcher)
            members = launcher.start_shards()
            assert launcher.security is not None  # made with the run
            return (config, [m.address for m in members], launcher.security), launcher

        plain, launcher = shards("plain", opts.metrics)
        urls = _metrics_urls(launcher, plain[0]) if opts.metrics else []
        runs = [plain]
        if opts.tls:
            files = create_certs(root / "certs")
            tls = {"tls_cert": str(files.cert), "tls_key": str(files.key), "tls_ca": str(files.ca)}
            runs.append(shards("tls", False, **tls)[0])
        return _measure(opts, runs, n, err, urls)


def _stop(launcher: Launcher) -> None:
    launcher.stop_children()
    launcher.close_metrics()
    if launcher.store is not None:
        launcher.store.close()


def _metrics_urls(launcher: Launcher, config: RunConfig) -> list[str]:
    """Every shard's /metrics, once their first heartbeats published it."""
    store = launcher.store
    assert store is not None

    def urls() -> list[str]:
        views = [MemberView.of(m) for m in store.members(config.run_id, "server")]
        return [v.metrics_url for v in views if v.metrics_url]

    poll_until(lambda: len(urls()) == config.shards, 30.0, "the shards' metrics URLs")
    return urls()


def _scrape(url: str) -> float:
    """Seconds one scrape of `url` took, to the last byte."""
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as reply:
        reply.read()
    return time.perf_counter() - t


class _Scraper:
    """Scrapes every URL each `interval_s`, from its own thread, while a wrapped function runs."""

    def __init__(self, urls: list[str], interval_s: float) -> None:
        self.urls, self.interval_s = urls, interval_s
        self.on, self.closing = threading.Event(), threading.Event()
        self.during_rounds: list[float] = []  # seconds of the scrapes made during rounds
        self.alone: list[float] = []  # and of those made alone
        self.thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        if urls:
            self.thread.start()

    def _run(self) -> None:
        while not self.closing.is_set():
            if self.on.wait(0.05):
                self.during_rounds.extend(_scrape(url) for url in self.urls)
                self.closing.wait(self.interval_s)

    def during(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            self.on.set()
            try:
                fn()
            finally:
                self.on.clear()

        return run

    def close(self) -> None:
        self.closing.set()
        if self.thread.is_alive():
            self.thread.join(10)


def _measure(
    opts: BenchOptions, runs: list[Served], n: int, err: TextIO, metrics_urls: list[str]
) -> dict[str, Any]:
    """Time the operations of each run interleaved round by round: the first run's are named
    ``push``, ``pull``, ``raw_push``, ``raw_pull`` (and, with metrics, ``push_scraped``,
    ``pull_scraped``, ``scrape``); a second one's (TLS) ``tls_push``, ``tls_pull``, ..."""
    fns: dict[str, Callable[[], Any]] = {}
    closers: list[Callable[[], None]] = []
    for prefix, (config, addresses, security) in zip(("", "tls_"), runs, strict=False):
        named, close = _operations(config, addresses, n, security)
        fns |= {prefix + k: v for k, v in named.items()}
        closers.append(close)
    config, addresses, _ = runs[0]
    nbytes = n * FLOAT.itemsize
    scraper = _Scraper(metrics_urls, opts.scrape_interval_s)
    closers.append(scraper.close)
    if metrics_urls:
        fns |= {
            "push_scraped": scraper.during(fns["push"]),
            "pull_scraped": scraper.during(fns["pull"]),
            "scrape": lambda: scraper.alone.extend(_scrape(url) for url in metrics_urls),
        }
    print(
        f"tether bench: {nbytes / 2**20:.1f} MiB over {len(addresses)} shard(s)"
        + (", plaintext against mutual TLS" if len(runs) > 1 else ""),
        file=err,
    )
    try:
        times = interleaved_times(fns, opts.repeats, opts.warmup)
        t = {name: statistics.median(ts) for name, ts in times.items()}
        means = {name: statistics.fmean(ts) for name, ts in times.items()}
    finally:
        for close in closers:
            close()
    result: dict[str, Any] = {
        "size_mb": nbytes / 2**20,
        "shards": len(addresses),
        "optimizer": opts.optimizer,
        "repeats": opts.repeats,
        "chunk_bytes": config.chunk_bytes,
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
            # TLS against plaintext on the same path, in the same rounds (target >= 0.75).
            result[f"tls_{op}_ratio"] = t[op] / t[f"tls_{op}"]
    if metrics_urls:
        ms = sorted(1000 * s for s in scraper.alone[opts.warmup * len(metrics_urls) :])
        result |= {
            "scrape_interval_s": opts.scrape_interval_s,
            "metrics_push_ratio": means["push"] / means["push_scraped"],
            "metrics_pull_ratio": means["pull"] / means["pull_scraped"],
            "scrapes_during": len(scraper.during_rounds),
            "scrapes": len(ms),
            "scrape_ms_median": statistics.median(ms),
            "scrape_ms_p99": ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))],
        }
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

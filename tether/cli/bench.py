"""`tether bench pushpull | step | train`.

`tether bench step` (the worker's gradient step against the task's own) is tether/tasks/bench.py;
`tether bench train` (a real run's steady-state update rate against the single-process gradient
step) is tether/driver/bench_train.py. What follows is `tether bench pushpull`: shard push/pull
throughput against raw gRPC bytes (DESIGN §9).

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

import argparse
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from tether.cli.common import Parser, emit_json
from tether.config import RunConfig, new_run_id
from tether.driver.launcher import Launcher, LaunchOptions
from tether.exitcodes import EXIT_OK
from tether.malloc import tune_allocator
from tether.proto import ps_pb2, ps_pb2_grpc
from tether.store import default_store_uri
from tether.tasks.bench import interleaved_medians
from tether.wire import FLOAT
from tether.worker.client import ShardClient


@dataclass(frozen=True, slots=True)
class BenchOptions:
    size_mb: float = 16.0
    shards: int = 1
    repeats: int = 20
    optimizer: str = "sgd"
    warmup: int = 2

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
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        config = RunConfig(
            run_id=new_run_id(),
            shards=opts.shards,
            workers=1,
            mode="asp",
            model=f"vector:{n}",
            dataset="none",
            optimizer=opts.optimizer,
            lr=1e-3,
            steps=1,
            num_params=n,
        )
        run_dir = Path(tmp)
        launcher = Launcher(
            LaunchOptions(config=config, run_dir=run_dir, store_uri=default_store_uri(run_dir)),
            err=err,
        )
        try:
            shards = launcher.start_shards()
            return _measure(opts, config, [m.address for m in shards], n, err)
        finally:
            launcher.stop_children()
            if launcher.store is not None:
                launcher.store.close()


def _measure(
    opts: BenchOptions, config: RunConfig, addresses: list[str], n: int, err: TextIO
) -> dict[str, Any]:
    clients = [ShardClient(a, config.run_id, chunk_bytes=config.chunk_bytes) for a in addresses]
    raw_stubs = [ps_pb2_grpc.RawBytesStub(c.channel) for c in clients]
    infos = [c.info() for c in clients]
    ranges = [(i.offset, i.length) for i in infos]
    grad = np.random.default_rng(0).standard_normal(n).astype(FLOAT) * np.float32(1e-3)
    out = np.empty(n, dtype=FLOAT)
    pool = ThreadPoolExecutor(max_workers=len(clients))
    clock = [0]
    versions = [0] * len(clients)
    epochs = [i.epoch for i in infos]
    nbytes = n * FLOAT.itemsize
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

    print(f"tether bench: {nbytes / 2**20:.1f} MiB over {len(clients)} shard(s)", file=err)
    try:
        t = interleaved_medians(
            {
                "push": push,
                "raw_push": lambda: each(raw_push_one),
                "pull": pull,
                "raw_pull": lambda: each(raw_pull_one),
            },
            opts.repeats,
            opts.warmup,
        )
    finally:
        pool.shutdown()
        for c in clients:
            c.close()
    result: dict[str, Any] = {
        "size_mb": nbytes / 2**20,
        "shards": len(clients),
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
    return result


def print_bench(r: dict[str, Any]) -> None:
    print(f"push/pull of {r['size_mb']:.1f} MiB over {r['shards']} shard(s), {r['optimizer']}:")
    print(
        f"  push {r['push_gbps']:7.2f} Gbit/s   raw {r['raw_push_gbps']:7.2f}   "
        f"ratio {r['push_ratio']:.2f}"
    )
    print(
        f"  pull {r['pull_gbps']:7.2f} Gbit/s   raw {r['raw_pull_gbps']:7.2f}   "
        f"ratio {r['pull_ratio']:.2f}"
    )


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=Parser)
    pushpull = bench_sub.add_parser(
        "pushpull", help="push/pull throughput of shards against raw gRPC bytes"
    )
    pushpull.add_argument("--size-mb", type=float, default=16.0, help="vector size in MiB (16)")
    pushpull.add_argument("--shards", type=int, default=1, help="shards to spread it over (1)")
    pushpull.add_argument("--repeats", type=int, default=20, help="timed rounds (20)")
    pushpull.add_argument(
        "--optimizer",
        choices=("sgd", "momentum", "adam"),
        default="sgd",
        help="optimizer applied on push (sgd)",
    )
    pushpull.add_argument("--json", action="store_true", help="print results as JSON")

    step = bench_sub.add_parser(
        "step",
        help="the worker's gradient step against the task's own jitted tree gradient",
        description="Time TaskRuntime.step (pulled flat buffer -> gradient ready to push) against "
        "jax.jit(jax.value_and_grad(task.loss)) on device-resident parameters, interleaved, "
        "same parameters and batch. Target: ratio <= 1.1.",
    )
    _task_arguments(step)
    step.add_argument("--repeats", type=int, default=30, help="timed rounds (30)")
    step.add_argument("--warmup", type=int, default=3, help="untimed rounds first (3)")
    step.add_argument("--json", action="store_true", help="print results as JSON")

    train = bench_sub.add_parser(
        "train",
        help="a real run's steady-state update rate against the single-process gradient step",
        description="Measure the task's own gradient steps per second in this process, then "
        "run shards and workers on it and report the shards' updates per second after "
        "start-up (the first --skip clocks of every worker are left out), and their ratio.",
    )
    _task_arguments(train)
    train.add_argument("--shards", type=int, default=1, help="shards (1)")
    train.add_argument("--workers", type=int, default=2, help="workers (2)")
    train.add_argument("--mode", choices=("bsp", "ssp", "asp"), default="asp", help="(asp)")
    train.add_argument("--staleness", type=int, default=0, help="SSP bound (0)")
    train.add_argument("--steps", type=int, default=300, help="clocks per worker (300)")
    train.add_argument("--skip", type=int, default=30, help="start-up clocks left out (30)")
    train.add_argument("--optimizer", default="adam", help="server-side optimizer (adam)")
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate (1e-3)")
    train.add_argument(
        "--overlap", action="store_true", help="push clock c while c+1 is pulled and computed"
    )
    train.add_argument(
        "--no-shared-memory",
        dest="shared_memory",
        action="store_false",
        help="stream over gRPC between the processes of this machine too",
    )
    train.add_argument("--json", action="store_true", help="print results as JSON")


def _task_arguments(parser: Any) -> None:
    parser.add_argument("--task", default=None, help="path/to/file.py:NAME or package.module:NAME")
    parser.add_argument("--model", default="mlp:512x512", help="built-in model (mlp:512x512)")
    parser.add_argument(
        "--dataset", default="synthetic:784", help="built-in data set (synthetic:784)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="per worker (128)")
    parser.add_argument("--seed", type=int, default=0, help="seed (0)")
    parser.add_argument("--device", choices=("cpu", "gpu", "tpu"), default="cpu", help="(cpu)")


def _config(args: argparse.Namespace, **extra: Any) -> RunConfig:
    from tether.tasks.build import resolve_config

    return resolve_config(
        RunConfig(
            run_id=new_run_id(),
            task=args.task or "",
            model=args.model,
            dataset=args.dataset,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
            **extra,
        )
    )


def run_step(args: argparse.Namespace) -> dict[str, Any]:
    from tether.tasks.bench import bench_step
    from tether.tasks.build import context_of, runtime_of

    config = _config(args)
    print(
        f"tether bench: step of {config.task or config.model}, seed {config.seed}", file=sys.stderr
    )
    result = bench_step(runtime_of(config), context_of(config, "worker"), args.repeats, args.warmup)
    return {"task": config.task or config.model, "seed": config.seed, **result}


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    from tether.driver.bench_train import bench_train

    config = _config(
        args,
        shards=args.shards,
        workers=args.workers,
        mode=args.mode,
        staleness=args.staleness,
        steps=args.steps,
        optimizer=args.optimizer,
        lr=args.lr,
        replication="off",
        overlap=args.overlap,
        shared_memory=args.shared_memory,
    )
    return bench_train(config, skip=args.skip, err=sys.stderr)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_shown(v)}" for k, v in value.items())
    return str(value)


def run(args: argparse.Namespace) -> int:
    if args.bench != "pushpull":
        result = run_step(args) if args.bench == "step" else run_train(args)
        if args.json:
            emit_json(result)
        else:
            for key, value in result.items():
                print(f"  {key:22} {_shown(value)}")
        return EXIT_OK
    result = bench_pushpull(
        BenchOptions(
            size_mb=args.size_mb,
            shards=args.shards,
            repeats=args.repeats,
            optimizer=args.optimizer,
        ),
        err=sys.stderr,
    )
    if args.json:
        emit_json(result)
    else:
        print_bench(result)
    return EXIT_OK

"""`tether bench pushpull | step | train` (DESIGN §9): flags in, figures out.

The benchmarks themselves are the `tether.bench` package: `pushpull.py` (shard push/pull
throughput against raw gRPC bytes), `step.py` (the worker's gradient step against the task's own)
and `train.py` (a real run's steady-state update rate against the single-process step). Their
runs are made by `new_run`, like every other run.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from tether.cli.common import Parser, emit_json
from tether.exitcodes import EXIT_OK

if TYPE_CHECKING:
    from tether.config import RunConfig


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
    for op in ("push", "pull") if "tls_push_gbps" in r else ():
        print(
            f"  {op} over mutual TLS {r[f'tls_{op}_gbps']:7.2f} Gbit/s   "
            f"{r[f'tls_{op}_ratio']:.2f}x plaintext"
        )
    if "scrape_ms_median" in r:
        print(
            f"  scraped/unscraped throughput: push {r['metrics_push_ratio']:.3f}, pull "
            f"{r['metrics_pull_ratio']:.3f}; a scrape {r['scrape_ms_median']:.2f} ms median, "
            f"{r['scrape_ms_p99']:.2f} ms p99"
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
    pushpull.add_argument(
        "--tls",
        action="store_true",
        help="also start shards with mutual TLS (throw-away certificates) and time the same "
        "push/pull path through them in the same rounds: tls_*_ratio is TLS against plaintext",
    )
    pushpull.add_argument(
        "--metrics",
        action="store_true",
        help="shards serve Prometheus metrics; also time push and pull while they are scraped, "
        "and the scrapes themselves",
    )
    pushpull.add_argument(
        "--scrape-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="with --metrics: seconds between scrapes during the scraped rounds (1.0)",
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
    from tether.driver.api import new_run

    return new_run(
        args.task or "",
        model=args.model,
        dataset=args.dataset,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        **extra,
    )


def run_step(args: argparse.Namespace) -> dict[str, Any]:
    from tether.bench.step import bench_step
    from tether.tasks.build import context_of, runtime_of

    config = _config(args)
    print(
        f"tether bench: step of {config.task or config.model}, seed {config.seed}", file=sys.stderr
    )
    result = bench_step(runtime_of(config), context_of(config, "worker"), args.repeats, args.warmup)
    return {"task": config.task or config.model, "seed": config.seed, **result}


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    from tether.bench.train import bench_train

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
    from tether.bench.pushpull import BenchOptions, bench_pushpull

    result = bench_pushpull(
        BenchOptions(
            size_mb=args.size_mb,
            shards=args.shards,
            repeats=args.repeats,
            optimizer=args.optimizer,
            tls=args.tls,
            metrics=args.metrics,
            scrape_interval_s=args.scrape_interval,
        ),
        err=sys.stderr,
    )
    if args.json:
        emit_json(result)
    else:
        print_bench(result)
    return EXIT_OK

"""`tether launch`: one run (DESIGN §9): flags to `new_run`, then `run` (tether/driver/api.py)."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.cli.common import UsageError, add_metrics_port, add_tls_flags, emit_json, tls_paths
from tether.exitcodes import EXIT_FAILED, EXIT_OK

if TYPE_CHECKING:
    from tether.config import RunConfig
    from tether.driver.spawner import Spawner

ENGINES = ("local", "ray", "slurm")


def add_parser(sub: Any) -> None:
    launch = sub.add_parser(
        "launch",
        help="train one model across shard and worker processes (here, on Ray or on Slurm)",
        description="Start shards and workers (child processes of this one, Ray actors or Slurm "
        "job steps: --engine), watch them, restart the dead, print progress and a summary. "
        "With no options: a small MLP on the bundled digits data set, 2 shards, 2 workers, BSP, "
        "on this machine.",
    )
    launch.add_argument(
        "--store", default=None, help="store URI (default sqlite:///<run-dir>/tether.db)"
    )
    launch.add_argument("--run-dir", type=Path, default=None, help="run folder (runs/<run-id>)")
    launch.add_argument(
        "--export",
        type=Path,
        default=None,
        help="write the final parameters to this .npz (flat vector `params`)",
    )
    launch.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="what starts the members: local (child processes of this one), ray (actors on a "
        "Ray cluster), slurm (job steps of the Slurm allocation this runs in) (local)",
    )
    launch.add_argument(
        "--address",
        default=None,
        help="ray: the cluster to join (ray://HOST:10001 or HOST:6379; default: RAY_ADDRESS, "
        "else the cluster of this machine, else a new local one)",
    )
    add_run_flags(launch)
    add_metrics_port(launch)
    launch.add_argument("--json", action="store_true", help="print the summary as JSON")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags that make a run's config: `tether launch` and `tether run create` share them."""
    p.add_argument("--shards", type=int, default=2, help="parameter-server shards (2)")
    p.add_argument("--workers", type=int, default=2, help="JAX worker processes (2)")
    p.add_argument(
        "--mode",
        choices=("bsp", "ssp", "asp"),
        default="bsp",
        help="consistency: bsp (strong), ssp (bounded staleness), asp (eventual)",
    )
    p.add_argument(
        "--staleness",
        type=int,
        default=None,
        help="SSP bound s: a worker may be at most s clocks ahead (ssp only)",
    )
    p.add_argument(
        "--task",
        default=None,
        help="your task: path/to/file.py:NAME or package.module:NAME, a tether.Task "
        "(instance, class or factory); replaces --model and --dataset",
    )
    p.add_argument("--model", default="mlp:64", help="logreg | mlp | mlp:H1xH2... (mlp:64)")
    p.add_argument(
        "--dataset",
        default="digits",
        help="digits (bundled) | synthetic[:FEATURES[:SAMPLES]] (digits)",
    )
    p.add_argument("--steps", type=int, default=200, help="iterations per worker (200)")
    p.add_argument("--batch-size", type=int, default=32, help="mini-batch per worker (32)")
    p.add_argument(
        "--optimizer",
        default="adam",
        metavar="NAME",
        help="server-side optimizer: an optax alias by name (sgd, adam, adamw, rmsprop, adagrad, "
        "lion, adabelief, nadam, radam, ...) or momentum (sgd with momentum 0.9). Each shard "
        "applies it elementwise to its own slice of the parameters, which keeps the result bit "
        "for bit the same for any number of shards; so transformations that reduce over the "
        "whole vector (global-norm clipping, lamb, lars, novograd, ...) are refused (adam)",
    )
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="K=V",
        help="keyword argument of the optimizer, a Python literal or a bare string, e.g. "
        "--opt weight_decay=0.01 --opt nesterov=True (repeatable)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate, the schedule's initial or peak value (0.1 for sgd and momentum, "
        "0.01 for the others)",
    )
    p.add_argument(
        "--schedule",
        default="constant",
        metavar="SPEC",
        help="learning-rate schedule: constant | linear[:end=X] | cosine[:alpha=A] | "
        "warmup_cosine:warmup=N[,end=X] | exponential:rate=R[,transition=N]; decay=N sets the "
        "horizon in optimizer updates, by default the run's (steps for bsp, steps x workers "
        "otherwise) (constant)",
    )
    p.add_argument(
        "--reject-grad-norm",
        type=float,
        default=None,
        metavar="K",
        help="each shard refuses (INVALID_ARGUMENT, which ends that worker) a push whose "
        "gradient norm on its slice exceeds K times the median of its last 32 accepted pushes, "
        "once it accepted 8: a defence against a buggy worker (off)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random source (0)")
    p.add_argument(
        "--straggler",
        action="append",
        default=[],
        metavar="ID:MS",
        help="delay worker ID by MS milliseconds per step (repeatable)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "gpu", "tpu"),
        default="cpu",
        help="JAX device of the workers (cpu)",
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=60.0,
        help="deadline in seconds of any wait for slower workers (60)",
    )
    p.add_argument(
        "--replication",
        choices=("sync", "async", "off"),
        default=None,
        help="shard state to the store: sync (acknowledge only durable updates; default for "
        "bsp), async (in the background; default for ssp/asp), off (no recovery)",
    )
    p.add_argument(
        "--replicate-every",
        type=int,
        default=50,
        metavar="K",
        help="async: replicate at least every K applied updates (50)",
    )
    p.add_argument(
        "--replicate-interval-ms",
        type=float,
        default=100.0,
        metavar="T",
        help="async: replicate at most T ms after a change (100); an acknowledgement waits "
        "only when the log is K updates behind",
    )
    p.add_argument(
        "--compaction-budget-ms",
        type=float,
        default=250.0,
        metavar="MS",
        help="write a new base state once replaying the log after the last one would take MS "
        "(250): the replay part of a shard's recovery time",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        metavar="N",
        help="restarts per member before the run fails (3)",
    )
    p.add_argument(
        "--lease",
        type=float,
        default=5.0,
        metavar="S",
        help="heartbeat silence after which a serving member is probed (5; it adapts upwards to "
        "the intervals observed)",
    )
    p.add_argument(
        "--probe-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="a suspect member is killed only after its liveness probes failed this long (10)",
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="deadline from starting a member to its serving (120)",
    )
    p.add_argument(
        "--overlap",
        action="store_true",
        help="ssp/asp: push clock c while c+1 is pulled and computed (more updates per second, "
        "about two versions more staleness per gradient; bsp never overlaps)",
    )
    p.add_argument(
        "--no-shared-memory",
        dest="shared_memory",
        action="store_false",
        help="stream parameters and gradients through gRPC even between processes of one "
        "machine (by default they go through a /dev/shm segment there)",
    )
    add_tls_flags(p, "kept in the run's config for every member, as paths on each host")


def config_from_args(args: argparse.Namespace, run_id: str | None = None) -> RunConfig:
    """The run's config from the flags of `add_run_flags`, built and checked by `new_run` (a new
    run id unless one is given)."""
    from tether.config import parse_opt_arg, parse_straggler
    from tether.consistency import check_staleness
    from tether.driver.api import new_run

    opt_args: dict[str, Any] = {}
    for key, value in map(parse_opt_arg, args.opt):
        if key in opt_args:
            raise UsageError(f"--opt {key} is given twice.")
        opt_args[key] = value
    if args.staleness is None:
        check_staleness(args.mode, None)  # the command line insists on SSP's bound
    return new_run(
        args.task or "",
        run_id=run_id,
        shards=args.shards,
        workers=args.workers,
        mode=args.mode,
        staleness=args.staleness or 0,
        model=args.model,
        dataset=args.dataset,
        steps=args.steps,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,  # None: the optimizer's default
        opt_args=opt_args,
        schedule=args.schedule,
        reject_grad_norm=args.reject_grad_norm,  # None: off
        seed=args.seed,
        device=args.device,
        stragglers=dict(parse_straggler(s) for s in args.straggler),
        wait_timeout_s=args.wait_timeout,
        replication=args.replication,  # None: the consistency's default
        replicate_every=args.replicate_every,
        replicate_interval_ms=args.replicate_interval_ms,
        compaction_budget_ms=args.compaction_budget_ms,
        max_restarts=args.max_restarts,
        lease_s=args.lease,
        probe_timeout_s=args.probe_timeout,
        startup_timeout_s=args.startup_timeout,
        overlap=args.overlap,
        shared_memory=args.shared_memory,
        **tls_paths(args),
    )


def run(args: argparse.Namespace) -> int:
    from tether.driver import api
    from tether.driver.launcher import RunFailed
    from tether.store import StoreError, default_store_uri

    config = config_from_args(args)
    run_dir = (args.run_dir or Path("runs") / config.run_id).resolve()
    store_uri = args.store or default_store_uri(run_dir)
    spawner = make_spawner(args.engine, args.address, run_dir, config)
    if args.engine != "local" and store_uri.startswith("sqlite:"):
        print(
            f"tether launch: note: --engine {args.engine} with the SQLite store {store_uri}: "
            "every node must see that file (one machine, or a shared filesystem); on a "
            "cluster give --store mongodb://...",
            file=sys.stderr,
        )
    try:
        hooks = api.RunHooks(metrics_port=args.metrics_port)
        summary = api.run(
            config, spawner, hooks, run_dir=run_dir, store=store_uri, export=args.export
        ).to_json()
    except RunFailed as e:
        print(f"tether launch: run {config.run_id} failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, UsageError, ValueError, StoreError):
        raise
    except Exception as e:  # an internal error: one line here, the traceback in the run dir
        log = run_dir / "logs" / "launcher.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc())
        print(f"tether launch: run {config.run_id} failed: {e!r} (traceback in {log})",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    if args.json:
        emit_json(summary)
    else:
        print_summary(summary)
    return EXIT_OK


def make_spawner(engine: str, address: str | None, run_dir: Path, config: RunConfig) -> Spawner:
    """The spawner of `--engine`; a usage error when that engine cannot run here."""
    from tether.driver.spawner import LocalSpawner

    if address is not None and engine != "ray":
        raise UsageError(f"--address is for --engine ray, not {engine}")
    if engine == "local":
        return LocalSpawner(run_dir)
    if engine == "ray":
        from tether.driver.ray_engine import RaySpawner, ray_available

        if (why := ray_available()) is not None:
            raise UsageError(why)
        return RaySpawner(address, gpu_workers=config.device == "gpu")
    from tether.driver.slurm_engine import SlurmSpawner, slurm_refusal

    if (why := slurm_refusal()) is not None:
        raise UsageError(why)
    return SlurmSpawner(run_dir, gpu_workers=config.device == "gpu")


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_summary(s: dict[str, Any]) -> None:
    mode = s["mode"] + (f"({s['staleness']})" if s["mode"] == "ssp" else "")
    print(
        f"run {s['run_id']} finished: {mode}, {s['shards']} shards, {s['workers']} workers, "
        f"seed {s['seed']}\n"
        f"  final loss      {_figure(s['final_loss'])}\n"
        f"  test accuracy   {_figure(s['test_accuracy'])}\n"
        f"  updates applied {s['updates_applied']}\n"
        f"  max clock gap   {s['max_clock_gap']}\n"
        f"  wall time       {s['wall_s']:.1f}s ({s['samples_per_s']:.0f} samples/s)\n"
        f"  params sha256   {s['params_sha256']}\n"
        f"  restarts        {s['restarts']['server']} shard, {s['restarts']['worker']} worker\n"
        f"  run dir         {s['run_dir']}"
    )
    from tether.roles import member_name

    for r in s.get("recoveries", []):
        print(f"    {member_name(r['role'], r['id'])} (epoch {r['epoch']}): {r['detail']}")

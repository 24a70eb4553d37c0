"""`tether experiment consistency|list|show|report` (DESIGN §8, §9).

Experiments and their runs live in one store, by default `runs/experiments/tether.db`, so
`list`, `show` and `report` find every experiment run from this folder. With `--json` the last
line of stdout is one JSON object. Exit codes: 0 done, 1 a run of the sweep failed (the report
is still written from the others), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from tether.exitcodes import EXIT_FAILED, EXIT_OK

DEFAULT_DIR = Path("runs/experiments")


def default_store() -> str:
    from tether.store import default_store_uri

    return default_store_uri(DEFAULT_DIR.resolve())


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    exp = subparsers.add_parser(
        "experiment",
        help="consistency experiments: sweeps, stored results, reports",
        description="Compare the consistency modes on real runs; every run's config, metrics "
        "and results are kept in the store.",
    )
    sub = exp.add_subparsers(dest="experiment_command", required=True, parser_class=type(exp))
    c = sub.add_parser(
        "consistency",
        help="sweep modes, staleness, worker counts and stragglers over seeds",
        description="Run every mode under every straggler setting and worker count, for each "
        "seed, then write report.md with PNG plots: loss vs wall-clock and vs updates, time to "
        "the target loss over seeds, throughput, clock-gap and staleness histograms, per-worker "
        "wait time.",
    )
    c.add_argument("--modes", default="bsp,ssp:1,ssp:4,asp", help="(bsp,ssp:1,ssp:4,asp)")
    c.add_argument("--workers", default="3", help="worker counts, comma-separated (3)")
    c.add_argument(
        "--straggler",
        action="append",
        default=None,
        metavar="ID:MS|none",
        help="straggler settings to compare (repeatable); default: none and 0:30 (worker 0 "
        "+30 ms per step)",
    )
    c.add_argument("--seeds", type=int, default=3, help="seeds per point (3)")
    c.add_argument("--steps", type=int, default=150, help="iterations per worker (150)")
    c.add_argument("--shards", type=int, default=2, help="shards (2)")
    c.add_argument("--model", default="mlp:64", help="model (mlp:64)")
    c.add_argument("--dataset", default="digits", help="data set (digits)")
    c.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default="sgd")
    c.add_argument("--lr", type=float, default=0.1, help="learning rate (0.1)")
    c.add_argument("--target-loss", type=float, default=None, help="(default: reached by all)")
    c.add_argument(
        "--eval-interval", type=float, default=0.2, help="seconds between evaluations (0.2)"
    )
    c.add_argument(
        "--quick",
        action="store_true",
        help="80 steps, 3 seeds, 3 workers: about 3 minutes on 2 cores",
    )
    c.add_argument("--out", type=Path, default=None, help="report folder (runs/experiments/ID)")
    c.add_argument("--store", default=None, help="store URI (runs/experiments/tether.db)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")

    ls = sub.add_parser("list", help="experiments in the store")
    ls.add_argument("--store", default=None, help="store URI (runs/experiments/tether.db)")
    ls.add_argument("--json", action="store_true")

    show = sub.add_parser("show", help="one experiment or run, from the store")
    show.add_argument("id", help="an experiment id (exp-...) or a run id")
    show.add_argument("--store", default=None, help="store URI (runs/experiments/tether.db)")
    show.add_argument("--json", action="store_true")

    report = sub.add_parser(
        "report",
        help="render a report again from stored runs alone",
        description="Read the runs (or every run of the experiments named) back from the store "
        "and render report.md and its figures into --out.",
    )
    report.add_argument("ids", nargs="+", metavar="ID", help="run ids or experiment ids")
    report.add_argument("--out", type=Path, required=True, help="report folder")
    report.add_argument("--store", default=None, help="store URI (runs/experiments/tether.db)")
    report.add_argument("--target-loss", type=float, default=None)
    report.add_argument("--json", action="store_true")
    return exp  # type: ignore[no-any-return]


def run(args: argparse.Namespace) -> int:
    store = args.store or default_store()
    cmd = args.experiment_command
    if cmd == "consistency":
        return _consistency(args, store)
    if cmd == "list":
        return _list(args, store)
    if cmd == "show":
        return _show(args, store)
    return _report(args, store)


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, sort_keys=True, default=str), flush=True)


def _consistency(args: argparse.Namespace, store: str) -> int:
    from tether.consistency.experiments.sweep import (
        ExperimentSpec,
        parse_modes,
        parse_stragglers,
        run_experiment,
    )

    try:
        workers = tuple(int(w) for w in args.workers.split(","))
    except ValueError:
        raise ValueError(f"--workers expects counts like 3 or 2,4; got {args.workers!r}") from None
    spec = ExperimentSpec(
        modes=parse_modes(args.modes),
        workers=workers,
        stragglers=parse_stragglers(args.straggler or ["none", "0:30"]),
        seeds=args.seeds,
        steps=args.steps,
        shards=args.shards,
        model=args.model,
        dataset=args.dataset,
        optimizer=args.optimizer,
        lr=args.lr,
        eval_interval_s=args.eval_interval,
        target_loss=args.target_loss,
    )
    if args.quick:
        spec = replace(spec, steps=80, seeds=3, workers=(3,), quick=True)
    from tether.config import new_run_id

    exp_id = "exp-" + new_run_id()
    out = (args.out or DEFAULT_DIR / exp_id).resolve()
    result = run_experiment(spec, store, out, sys.stderr, exp_id=exp_id)
    print(f"experiment {result['experiment_id']}: report {result['report']}", file=sys.stderr)
    if args.json:
        _emit(result)
    return EXIT_FAILED if result["failed"] else EXIT_OK


def _experiments(store: Any) -> list[Any]:
    return [r for r in store.list_runs() if r.meta.get("kind") == "experiment"]


def _list(args: argparse.Namespace, uri: str) -> int:
    from tether.store import open_store

    with open_store(uri) as store:
        exps = _experiments(store)
    rows = [
        {
            "id": r.run_id,
            "created_at": r.created_at,
            "status": r.meta.get("status"),
            "runs": len(r.meta.get("runs") or []),
            "modes": r.config.get("modes"),
            "stragglers": r.config.get("stragglers"),
            "seeds": r.config.get("seeds"),
            "git_commit": r.meta.get("git_commit"),
        }
        for r in exps
    ]
    if args.json:
        _emit({"store": uri, "experiments": rows})
        return EXIT_OK
    if not rows:
        print(f"no experiments in {uri}", file=sys.stderr)
    for row in rows:
        print(
            f"{row['id']}  {row['status']:<11} {row['runs']:>3} runs  modes "
            f"{','.join(row['modes'] or [])}  stragglers {row['stragglers']}  seeds {row['seeds']}"
        )
    return EXIT_OK


def _show(args: argparse.Namespace, uri: str) -> int:
    from tether.store import open_store

    with open_store(uri) as store:
        record = store.get_run(args.id)
        artifacts = [a.name for a in store.artifacts(args.id)]
        sources: dict[str, int] = {}
        for row in store.metrics(args.id):
            sources[row.source] = sources.get(row.source, 0) + 1
        runs = []
        if record.meta.get("kind") == "experiment":
            for rid in record.meta.get("runs") or []:
                rr = store.get_run(rid)
                s = rr.summary or {}
                runs.append(
                    {
                        "run_id": rid,
                        "point": rr.meta.get("point"),
                        "status": rr.meta.get("status"),
                        "final_loss": s.get("final_loss"),
                        "test_accuracy": s.get("test_accuracy"),
                        "wall_s": s.get("wall_s"),
                    }
                )
    obj = {
        "id": record.run_id,
        "kind": record.meta.get("kind", "run"),
        "config": record.config,
        "meta": record.meta,
        "finished": record.finished,
        "summary": record.summary,
        "metrics": sources,
        "artifacts": artifacts,
        "runs": runs,
    }
    if args.json:
        _emit(obj)
        return EXIT_OK
    print(f"{obj['kind']} {record.run_id} ({'finished' if record.finished else 'not finished'})")
    for key in ("git_commit", "git_dirty", "python", "status", "experiment", "point"):
        if key in record.meta:
            print(f"  {key}: {record.meta[key]}")
    print(f"  config: {json.dumps(record.config, sort_keys=True)}")
    if sources:
        print(f"  metrics: {', '.join(f'{k} ({n} rows)' for k, n in sorted(sources.items()))}")
    if artifacts:
        print(f"  artifacts: {', '.join(artifacts)}")
    for r in runs:
        p = r["point"] or {}
        loss = "—" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        print(
            f"  {r['run_id']}  {p.get('mode', '?'):<6} workers {p.get('workers')} straggler "
            f"{p.get('straggler')} seed {p.get('seed')}  {r['status']}  final loss {loss}"
        )
    return EXIT_OK


def _report(args: argparse.Namespace, uri: str) -> int:
    from tether.consistency.experiments.analysis import load_run
    from tether.consistency.experiments.report import render
    from tether.store import open_store

    with open_store(uri) as store:
        run_ids: list[str] = []
        titles = []
        for i in args.ids:
            record = store.get_run(i)
            if record.meta.get("kind") == "experiment":
                titles.append(i)
                run_ids += [
                    r for r in record.meta.get("runs") or []
                    if store.get_run(r).finished
                ]  # fmt: skip
            else:
                run_ids.append(i)
        runs = [load_run(store, r) for r in run_ids]
    title = f"Consistency experiment {', '.join(titles)}" if titles else "Consistency report"
    out = args.out.resolve()
    findings = render(runs, out, args.target_loss, title=title)
    print(f"tether experiment report: {len(runs)} runs -> {out / 'report.md'}", file=sys.stderr)
    if args.json:
        _emit({"out": str(out), "report": str(out / "report.md"), "runs": run_ids,
               "findings": findings})  # fmt: skip
    return EXIT_OK

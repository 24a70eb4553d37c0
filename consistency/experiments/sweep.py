"""`tether experiment consistency`: sweep the consistency dial over seeds (DESIGN §8).

Every point of the sweep — a mode (bsp, ssp:s, asp), a worker count, a straggler setting and a
seed — is a real multi-process run through the launcher, with the shards' parameters evaluated at
a fixed interval. All runs go into one store with their resolved config, per-step metrics and
summary; the experiment itself is a record there too (kind "experiment"), holding the sweep, the
run ids, the git commit and package versions, and the rendered report as artifacts. A report can
be rendered again from the store alone (`tether experiment report`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tether.config import RunConfig, new_run_id, parse_straggler
from tether.consistency.rules import parse_consistency
from tether.store import Store, StoreError, open_store

PACKAGES = ("tether-ps", "jax", "jaxlib", "numpy", "optax", "grpcio", "protobuf", "pymongo")


@dataclass(frozen=True, slots=True)
class ExperimentSpec:
    modes: tuple[tuple[str, int], ...] = (("bsp", 0), ("ssp", 1), ("ssp", 4), ("asp", 0))
    workers: tuple[int, ...] = (3,)
    # None: no straggler; (worker id, ms added to each of its steps)
    stragglers: tuple[tuple[int, int] | None, ...] = (None, (0, 30))
    seeds: int = 3
    steps: int = 150
    shards: int = 2
    batch_size: int = 32
    model: str = "mlp:64"
    dataset: str = "digits"
    optimizer: str = "sgd"
    lr: float = 0.1
    replication: str = "async"
    eval_interval_s: float = 0.2
    target_loss: float | None = None
    quick: bool = False

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
        if not self.modes:
            raise ValueError("--modes names no mode")
        for w in self.workers:
            for s in self.stragglers:
                if s is not None and s[0] >= w:
                    raise ValueError(
                        f"--straggler {s[0]}:{s[1]} names no worker of a {w}-worker run"
                    )
        if self.target_loss is not None and not self.target_loss > 0:
            raise ValueError(f"--target-loss must be > 0, got {self.target_loss}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modes"] = [label(m, s) for m, s in self.modes]
        d["stragglers"] = [None if s is None else f"{s[0]}:{s[1]}" for s in self.stragglers]
        return d


def label(mode: str, staleness: int) -> str:
    return f"ssp:{staleness}" if mode == "ssp" else mode


def parse_modes(text: str) -> tuple[tuple[str, int], ...]:
    """`bsp,ssp:1,ssp:4,asp` -> ((bsp, 0), (ssp, 1), (ssp, 4), (asp, 0))."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        mode, _, s = item.partition(":")
        if mode == "ssp" and not s.isdigit():
            raise ValueError(f"--modes: ssp needs a staleness, e.g. ssp:2; got {item!r}")
        if mode != "ssp" and s:
            raise ValueError(f"--modes: only ssp takes a staleness; got {item!r}")
        parse_consistency(mode, int(s or 0))  # names the valid modes on a typo
        out.append((mode, int(s or 0)))
    if len(set(out)) != len(out):
        raise ValueError(f"--modes repeats a mode: {text!r}")
    return tuple(out)


def parse_stragglers(texts: list[str]) -> tuple[tuple[int, int] | None, ...]:
    """`none` and `ID:MS` settings; the experiment runs every mode under each."""
    out: list[tuple[int, int] | None] = []
    for t in texts:
        out.append(None if t == "none" else parse_straggler(t))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Point:
    mode: str
    staleness: int
    workers: int
    straggler: tuple[int, int] | None
    seed: int

    def describe(self) -> str:
        slow = "no straggler" if self.straggler is None else (
            f"worker {self.straggler[0]} +{self.straggler[1]} ms/step"
        )  # fmt: skip
        mode = label(self.mode, self.staleness)
        return f"{mode}, {self.workers} workers, {slow}, seed {self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": label(self.mode, self.staleness),
            "workers": self.workers,
            "straggler": None if self.straggler is None else list(self.straggler),
            "seed": self.seed,
        }


def plan(spec: ExperimentSpec) -> list[Point]:
    """Every run of the sweep, seeds outermost so that slow drifts of the machine's load spread
    over all modes instead of biasing one."""
    return [
        Point(mode, s, w, straggler, seed)
        for seed in range(spec.seeds)
        for w in spec.workers
        for straggler in spec.stragglers
        for mode, s in spec.modes
    ]


def run_settings(spec: ExperimentSpec, point: Point) -> dict[str, Any]:
    """One point's run as `new_run`'s settings."""
    return dict(
        shards=spec.shards,
        workers=point.workers,
        mode=point.mode,
        staleness=point.staleness,
        model=spec.model,
        dataset=spec.dataset,
        steps=spec.steps,
        batch_size=spec.batch_size,
        optimizer=spec.optimizer,
        lr=spec.lr,
        seed=point.seed,
        stragglers={} if point.straggler is None else dict([point.straggler]),
        replication=spec.replication,
    )


def run_config(spec: ExperimentSpec, point: Point) -> RunConfig:
    """One point's run with the product's defaults, before its task is resolved."""
    return RunConfig.of(new_run_id(), **run_settings(spec, point))


def provenance() -> dict[str, Any]:
    """The code and packages that produced a result: git commit (if a checkout) and versions."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    source = Path(__file__).resolve().parents[2]  # the checkout, if this is one
    commit: str | None = None
    dirty: bool | None = None
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10
        )
        commit = (head.stdout.strip() or None) if head.returncode == 0 else None
        if commit:
            status = subprocess.run(
                ["git", "status", "--porcelain"], cwd=source, capture_output=True, text=True,
                timeout=10,
            ).stdout  # fmt: skip
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }


def run_experiment(
    spec: ExperimentSpec,
    store_uri: str,
    out_dir: Path,
    err: TextIO = sys.stderr,
    exp_id: str | None = None,
) -> dict[str, Any]:
    """Run the sweep; returns {experiment_id, runs, failed, findings, report}."""
    from tether.consistency.experiments.analysis import load_run
    from tether.consistency.experiments.report import render
    from tether.driver import api
    from tether.driver.launcher import RunFailed

    exp_id = exp_id or "exp-" + new_run_id()
    points = plan(spec)
    prov = provenance()
    out_dir.mkdir(parents=True, exist_ok=True)
    with open_store(store_uri) as store:
        store.create_run(exp_id, spec.to_dict())
        store.set_run_meta(exp_id, {"kind": "experiment", "status": "running", "runs": [], **prov})
    print(
        f"experiment {exp_id}: {len(points)} runs ({len(spec.modes)} modes × "
        f"{len(spec.stragglers)} straggler settings × {len(spec.workers)} worker counts × "
        f"{spec.seeds} seeds); store {store_uri}; out {out_dir}",
        file=err,
        flush=True,
    )
    run_ids: list[str] = []
    failed: list[dict[str, Any]] = []
    t_start = time.monotonic()
    for i, point in enumerate(points):
        config = api.new_run(**run_settings(spec, point))
        run_dir = out_dir / "runs" / config.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "run", "experiment": exp_id, "point": point.to_dict(), **prov}
        outcome: dict[str, Any]
        with open(run_dir / "launcher.log", "w") as log:
            hooks = api.RunHooks(eval_interval_s=spec.eval_interval_s)
            try:
                done = api.run(config, None, hooks, run_dir=run_dir, store=store_uri, err=log)
                summary = done.to_json()
                outcome = {"status": "finished", "wall_s": summary["wall_s"],
                           "final_loss": summary["final_loss"]}  # fmt: skip
            except RunFailed as e:
                outcome = {"status": "failed", "error": str(e)}
                failed.append({"run_id": config.run_id, "point": point.to_dict(), "error": str(e)})
        with open_store(store_uri) as store:
            try:
                store.set_run_meta(config.run_id, meta | {"status": outcome["status"]})
            except StoreError:
                pass  # the run never reached the store (it failed before creating itself)
            run_ids.append(config.run_id)
            store.set_run_meta(exp_id, {"runs": run_ids})
        _progress(err, i, len(points), point, outcome, time.monotonic() - t_start)
    with open_store(store_uri) as store:
        runs = []
        for rid in run_ids:
            try:
                runs.append(load_run(store, rid))
            except (ValueError, StoreError):
                continue  # a failed run has no results; it is listed under "failed"
        findings = render(runs, out_dir, spec.target_loss, title=f"Consistency experiment {exp_id}")
        store_report(store, exp_id, out_dir)
        store.set_run_meta(exp_id, {"status": "failed runs" if failed else "done"})
        store.finish_run(exp_id, {"findings": findings, "failed": failed, "runs": run_ids})
    return {
        "experiment_id": exp_id,
        "store": store_uri,
        "out": str(out_dir),
        "report": str(out_dir / "report.md"),
        "runs": run_ids,
        "failed": failed,
        "findings": findings,
        "wall_s": time.monotonic() - t_start,
    }


def store_report(store: Store, exp_id: str, out_dir: Path) -> None:
    """Keep the rendered report with the experiment (artifacts), next to its runs."""
    for path in sorted(out_dir.iterdir()):
        if path.suffix in (".md", ".png", ".json") and path.is_file():
            kind = {".md": "text/markdown", ".png": "image/png", ".json": "application/json"}
            store.put_artifact(exp_id, path.name, path.read_bytes(), kind[path.suffix])


def _progress(
    err: TextIO, i: int, n: int, point: Point, outcome: dict[str, Any], elapsed: float
) -> None:
    if outcome["status"] == "finished":
        what = f"{outcome['wall_s']:.1f}s, final loss {outcome['final_loss']:.4f}"
    else:
        what = f"FAILED: {outcome['error'].splitlines()[0]}"
    eta = elapsed / (i + 1) * (n - i - 1)
    print(
        f"experiment: run {i + 1}/{n} {point.describe()}: {what} "
        f"(elapsed {elapsed:.0f}s, about {eta:.0f}s left)",
        file=err,
        flush=True,
    )

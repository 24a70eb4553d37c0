"""What a consistency experiment measured, computed from stored runs alone (DESIGN §8).

Pure functions over :class:`RunData` — a run's config, sweep point, summary and metric rows as
the store holds them — so a report rendered at the end of an experiment and one re-rendered
later from the store are the same computation over the same documents.

Times are seconds since the run's first iteration began (the worker processes' start-up is not
the consistency model's doing). "Updates" are optimizer steps the shards applied (a BSP step
averages one gradient of every worker; an SSP/ASP step applies one gradient).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from tether.store import MetricRow, Store
from tether.store.metrics import first_iteration_start

EVAL = "eval"


@dataclass(frozen=True, slots=True)
class RunData:
    run_id: str
    config: dict[str, Any]
    meta: dict[str, Any]
    summary: dict[str, Any]
    metrics: tuple[MetricRow, ...]

    @property
    def point(self) -> dict[str, Any]:
        return dict(self.meta.get("point") or {})

    @property
    def label(self) -> str:
        """The consistency setting: bsp, ssp:s or asp."""
        c = self.config
        return f"ssp:{c['staleness']}" if c["mode"] == "ssp" else str(c["mode"])

    @property
    def condition(self) -> str:
        """ "straggler" when a worker was slowed down, else "no straggler"."""
        return "straggler" if self.config.get("stragglers") else "no straggler"

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    def rows(self, source: str) -> list[MetricRow]:
        return sorted((r for r in self.metrics if r.source == source), key=lambda r: r.step)


def load_run(store: Store, run_id: str) -> RunData:
    record = store.get_run(run_id)
    if not record.finished or record.summary is None:
        raise ValueError(f"run {run_id} has not finished: it has no results to report")
    return RunData(
        run_id=run_id,
        config=record.config,
        meta=record.meta,
        summary=record.summary,
        metrics=tuple(store.metrics(run_id)),
    )


def run_start(run: RunData) -> float:
    """Unix time the run's first iteration began."""
    start = first_iteration_start(run.metrics)
    if start is None:
        raise ValueError(f"run {run.run_id} has no worker metrics")
    return start


def loss_curve(run: RunData, x: str = "time") -> tuple[list[float], list[float]]:
    """The evaluated training loss against time (s) or applied updates (x="updates")."""
    t0 = run_start(run)
    rows = run.rows(EVAL)
    xs = [max(0.0, r.t - t0) if x == "time" else r.values["updates"] for r in rows]
    return xs, [r.values["loss"] for r in rows]


def time_to_target(run: RunData, target: float) -> float | None:
    """Seconds until the evaluated loss first reached `target`; None if it never did."""
    for t, loss in zip(*loss_curve(run, "time"), strict=True):
        if loss <= target:
            return t
    return None


def loss_at_updates(run: RunData, updates: float) -> float | None:
    """The evaluated loss at the first evaluation with at least `updates` applied."""
    for u, loss in zip(*loss_curve(run, "updates"), strict=True):
        if u >= updates:
            return loss
    return None


def worker_wait(run: RunData) -> dict[int, float]:
    """Seconds each worker spent waiting for its pulls to be served (all its iterations)."""
    out: dict[int, float] = {}
    for r in run.metrics:
        if r.source.startswith("worker:"):
            w = int(r.source.split(":")[1])
            out[w] = out.get(w, 0.0) + r.values.get("pull_s", 0.0)
    return dict(sorted(out.items()))


def straggler_slowdown(run: RunData) -> float | None:
    """How many times slower the straggler computed than the others (compute, not waiting)."""
    slow = {int(k) for k in (run.config.get("stragglers") or {})}
    if not slow:
        return None
    own: dict[int, list[float]] = {}
    for r in run.metrics:
        if r.source.startswith("worker:"):
            w = int(r.source.split(":")[1])
            own.setdefault(w, []).append(r.values["step_s"] - r.values.get("pull_s", 0.0))
    slow_t = [statistics.median(v) for w, v in own.items() if w in slow]
    fast_t = [statistics.median(v) for w, v in own.items() if w not in slow]
    if not slow_t or not fast_t or min(fast_t) <= 0:
        return None
    return statistics.mean(slow_t) / statistics.mean(fast_t)


def mean_staleness(run: RunData) -> float:
    hist = run.summary.get("version_staleness_hist") or []
    n = sum(hist)
    return sum(i * c for i, c in enumerate(hist)) / n if n else 0.0


@dataclass(frozen=True, slots=True)
class Spread:
    mean: float
    low: float
    high: float
    n: int  # values that exist (e.g. runs that reached the target)
    of: int  # runs

    def describe(self, unit: str = "", digits: int = 2) -> str:
        if not self.n:
            return "—"
        text = f"{self.mean:.{digits}f}{unit}"
        if self.n > 1:
            text += f" ({self.low:.{digits}f}–{self.high:.{digits}f})"
        return text + (f" [{self.n}/{self.of}]" if self.n < self.of else "")


def spread(values: list[float | None]) -> Spread:
    have = [v for v in values if v is not None]
    if not have:
        return Spread(float("nan"), float("nan"), float("nan"), 0, len(values))
    return Spread(statistics.mean(have), min(have), max(have), len(have), len(values))


def group(runs: list[RunData]) -> dict[tuple[str, str], list[RunData]]:
    """(condition, setting) -> runs over seeds, in a stable order.

    The setting is the mode (bsp, ssp:s, asp), and also the worker count (`asp w6`) when the
    runs have more than one.
    """
    multi = len({r.config["workers"] for r in runs}) > 1

    def setting(r: RunData) -> str:
        return f"{r.label} w{r.config['workers']}" if multi else r.label

    out: dict[tuple[str, str], list[RunData]] = {}
    for r in sorted(runs, key=lambda r: (r.condition, mode_order(setting(r)), r.seed)):
        out.setdefault((r.condition, setting(r)), []).append(r)
    return out


def mode_order(setting: str) -> tuple[int, int, int]:
    """bsp, then ssp by staleness, then asp; each by worker count."""
    label, _, workers = setting.partition(" w")
    w = int(workers or 0)
    if label == "bsp":
        return (0, 0, w)
    if label.startswith("ssp:"):
        return (1, int(label[4:]), w)
    return (2, 0, w)


def default_target(runs: list[RunData]) -> float:
    """A target loss every mode can reach: a little above the worst final evaluated loss."""
    finals = [loss_curve(r)[1][-1] for r in runs if r.rows(EVAL)]
    return round(max(finals) * 1.1, 3) if finals else 0.0


def staleness_effect(runs: list[RunData], updates: float) -> dict[str, Any]:
    """Loss after `updates` updates against measured mean staleness, over the runs without a
    straggler that apply gradients one by one (SSP, ASP): the cost of staleness per update.

    `slope` is the least-squares change in that loss per unit of mean staleness (positive: more
    staleness, less progress per update); None with fewer than two distinct staleness values.
    """
    points = []
    for r in runs:
        if r.label == "bsp" or r.condition != "no straggler":
            continue
        loss = loss_at_updates(r, updates)
        if loss is not None:
            points.append((mean_staleness(r), loss))
    xs = [x for x, _ in points]
    slope = None
    if len(set(xs)) > 1:
        mx, my = statistics.mean(xs), statistics.mean(y for _, y in points)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return {"updates": updates, "points": points, "slope": slope}

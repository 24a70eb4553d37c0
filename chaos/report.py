"""The report of a chaos run: Markdown with the invariants and faults, and a PNG of the run.

The figure shows each worker's mini-batch loss and clock over time, the fault-free baseline's
loss in grey, and a marker at every fault, so a stall, a replay after a lost window or a
recovery is visible at a glance (DESIGN §7).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tether.chaos.invariants import Check
from tether.chaos.scenario import Scenario
from tether.store import MetricRow
from tether.store.metrics import first_iteration_start

FIGURE = "timeline.png"


def series(
    metrics: list[MetricRow], t0: float, value: Callable[[MetricRow], float]
) -> dict[str, tuple[list[float], list[float]]]:
    """worker source -> (seconds since t0, value(row)) in time order."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for r in sorted(metrics, key=lambda r: r.t):
        if r.source.startswith("worker:"):
            xs, ys = out.setdefault(r.source, ([], []))
            xs.append(r.t - t0)
            ys.append(value(r))
    return out


def _loss(r: MetricRow) -> float:
    return r.values["loss"]


def _clock(r: MetricRow) -> float:
    return float(r.step + 1)  # iterations done once this row's iteration ended


def plot_timeline(
    path: Path,
    metrics: list[MetricRow],
    baseline: list[MetricRow],
    t0: float,
    faults: list[dict[str, Any]],
    title: str,
) -> None:
    from tether.plotting import pyplot

    plt = pyplot("a chaos report's timeline.png")
    fig, (ax_loss, ax_clock) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    if (b0 := first_iteration_start(baseline)) is not None:
        for i, (xs, ys) in enumerate(series(baseline, b0, _loss).values()):
            ax_loss.plot(xs, ys, color="0.7", lw=1, ls="--", label="fault-free" if i == 0 else None)
    for source, (xs, ys) in sorted(series(metrics, t0, _loss).items()):
        ax_loss.plot(xs, ys, lw=1, label=source)
    for source, (xs, ys) in sorted(series(metrics, t0, _clock).items()):
        ax_clock.plot(xs, ys, lw=1.2, label=source)
    for f in faults:
        if f["at_s"] is None:
            continue
        for ax in (ax_loss, ax_clock):
            ax.axvline(f["at_s"], color="crimson", lw=0.8, alpha=0.7)
        ax_clock.annotate(
            f"{f['index'] + 1}: {f['action']} {f['target']}",
            xy=(f["at_s"], 1),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color="crimson",
        )
    ax_loss.set_ylabel("mini-batch loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=7, loc="upper right")
    ax_loss.set_title(title)
    ax_clock.set_ylabel("iterations done (clock)")
    ax_clock.set_xlabel("seconds since the first iteration began")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out_dir: Path,
    scenario: Scenario,
    checks: list[Check],
    faults: list[dict[str, Any]],
    metrics: list[MetricRow],
    baseline: list[MetricRow],
    t0: float,
    summary: dict[str, Any] | None,
    failure: str | None,
    proxy: str | None,
) -> Path:
    ok = all(c.ok for c in checks)
    plot_timeline(out_dir / FIGURE, metrics, baseline, t0, faults, f"chaos: {scenario.name}")
    lines = [
        f"# Chaos scenario `{scenario.name}`: {'passed' if ok else 'FAILED'}",
        "",
        scenario.description,
        "",
        f"- seed {scenario.seed}; replay with `tether chaos run {scenario.path} "
        f"--seed {scenario.seed}`",
        f"- links: {proxy or 'direct (no proxy)'}",
    ]
    if summary is not None:
        lines += [
            f"- run `{summary['run_id']}`: {summary['mode']}, {summary['shards']} shards, "
            f"{summary['workers']} workers, {summary['steps']} steps, replication "
            f"{summary['replication']}",
            f"- test accuracy {summary['test_accuracy']:.4f}, wall {summary['wall_s']:.1f}s, "
            f"restarts {summary['restarts']}, max clock gap {summary['max_clock_gap']}",
        ]
    else:
        lines.append(f"- the run failed: {failure}")
    lines += ["", "## Invariants", "", "| invariant | ok | detail |", "| --- | --- | --- |"]
    lines += [f"| {c.name} | {'yes' if c.ok else '**no**'} | {_cell(c.detail)} |" for c in checks]
    lines += [
        "",
        "## Faults",
        "",
        "| # | fault | fired at | step | pid | recovery |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f in faults:
        at = "—" if f["at_s"] is None else f"{f['at_s']:.2f}s"
        rec = "—" if f["recovery_s"] is None else f"{f['recovery_s']:.3f}s"
        what = f["fault"] + (f" (error: {f['error']})" if f["error"] else "")
        lines.append(
            f"| {f['index'] + 1} | {_cell(what)} | {at} | {_dash(f['step'])} | "
            f"{_dash(f['pid'])} | {rec} |"
        )
    lines += [
        "",
        "## Timeline",
        "",
        f"![loss and clock over time, faults marked]({FIGURE})",
        "",
        "Top: each worker's mini-batch loss (log scale), the fault-free run dashed in grey. "
        "Bottom: each worker's clock; a flat stretch is a worker waiting (a barrier, a dead "
        "shard, a broken link), a drop is a worker redoing iterations after a restart. Red "
        "lines mark the faults.",
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _dash(v: Any) -> str:
    return "—" if v is None else str(v)

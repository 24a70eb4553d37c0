"""The consistency report: Markdown and PNG figures from stored runs alone (DESIGN §8).

`render(runs, out_dir)` is the whole computation: the experiment calls it when its runs are done
and `tether experiment report` calls it again on runs read back from the store, so the two give
the same figures from the same documents. `figures.json` next to the figures holds the data each
one shows (read back from the drawn artists).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tether.consistency.experiments.analysis import (
    RunData,
    default_target,
    group,
    loss_at_updates,
    mean_staleness,
    spread,
    staleness_effect,
    straggler_slowdown,
    time_to_target,
    worker_wait,
)
from tether.consistency.experiments.plots import (
    plot_histograms,
    plot_loss,
    plot_progress_vs_staleness,
    plot_throughput,
    plot_time_to_target,
    plot_worker_wait,
)

FIGURES = {
    "loss_vs_time.png": "Training loss against wall-clock time",
    "loss_vs_updates.png": "Training loss against applied updates",
    "time_to_target.png": "Time to the target loss",
    "throughput.png": "Throughput",
    "clock_gap.png": "Clock gap at served pulls",
    "staleness.png": "Version staleness of applied gradients",
    "worker_wait.png": "Time each worker waited",
    "progress_vs_staleness.png": "Progress per update against staleness",
}


def render(
    runs: list[RunData], out_dir: Path, target: float | None = None, title: str = ""
) -> dict[str, Any]:
    """Write report.md, the figures and figures.json into `out_dir`; return the findings."""
    if not runs:
        raise ValueError("no runs to report on")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = default_target(runs) if target is None else target
    figures = {
        "loss_vs_time.png": plot_loss(runs, "time", out_dir / "loss_vs_time.png", target),
        "loss_vs_updates.png": plot_loss(runs, "updates", out_dir / "loss_vs_updates.png", target),
        "time_to_target.png": plot_time_to_target(runs, target, out_dir / "time_to_target.png"),
        "throughput.png": plot_throughput(runs, out_dir / "throughput.png"),
        "clock_gap.png": plot_histograms(
            runs, "clock_gap_hist", "clock gap c − min clock", out_dir / "clock_gap.png"
        ),
        "staleness.png": plot_histograms(
            runs,
            "version_staleness_hist",
            "versions applied since the gradient's read",
            out_dir / "staleness.png",
        ),  # fmt: skip
        "worker_wait.png": plot_worker_wait(runs, out_dir / "worker_wait.png"),
        "progress_vs_staleness.png": plot_progress_vs_staleness(
            runs, _updates_mark(runs), out_dir / "progress_vs_staleness.png"
        ),
    }
    (out_dir / "figures.json").write_text(json.dumps(figures, sort_keys=True, indent=1) + "\n")
    findings = summarize(runs, target)
    (out_dir / "report.md").write_text(markdown(runs, findings, target, title))
    return findings


def summarize(runs: list[RunData], target: float) -> dict[str, Any]:
    """Per (condition, mode): time to target, throughput, loss per update, over the seeds."""
    rows = []
    updates_mark = _updates_mark(runs)
    for (cond, label), members in group(runs).items():
        ttt = spread([time_to_target(r, target) for r in members])
        rows.append(
            {
                "condition": cond,
                "mode": label,
                "seeds": [r.seed for r in members],
                "time_to_target_s": [time_to_target(r, target) for r in members],
                "time_to_target_mean_s": ttt.mean if ttt.n else None,
                "reached": ttt.n,
                "samples_per_s": [float(r.summary["samples_per_s"]) for r in members],
                "loss_at_updates": [loss_at_updates(r, updates_mark) for r in members],
                "final_loss": [float(r.summary["final_loss"]) for r in members],
                "test_accuracy": [float(r.summary["test_accuracy"]) for r in members],
                "max_clock_gap": max(int(r.summary["max_clock_gap"]) for r in members),
                "mean_staleness": [mean_staleness(r) for r in members],
                "straggler_slowdown": [straggler_slowdown(r) for r in members],
                "worker_wait_s": [worker_wait(r) for r in members],
            }
        )
    return {
        "target_loss": target,
        "updates_mark": updates_mark,
        "groups": rows,
        "staleness_effect": staleness_effect(runs, updates_mark),
    }


def _updates_mark(runs: list[RunData]) -> float:
    """An update count every SSP/ASP run reached: where loss per update is compared."""
    reached = [
        max(r.rows("eval"), key=lambda m: m.step).values["updates"]
        for r in runs
        if r.rows("eval") and r.label != "bsp"
    ]
    return float(int(min(reached) * 0.5)) if reached else 0.0


def _fmt(values: list[float | None], unit: str = "", digits: int = 2) -> str:
    return spread(values).describe(unit, digits)


def markdown(runs: list[RunData], findings: dict[str, Any], target: float, title: str) -> str:
    first = runs[0].config
    seeds = sorted({r.seed for r in runs})
    lines = [
        f"# {title or 'Consistency experiment'}",
        "",
        f"{len(runs)} runs: {first['model']} on {first['dataset']}, {first['workers']} workers, "
        f"{first['shards']} shards, {first['steps']} steps of batch {first['batch_size']}, "
        f"{first['optimizer']} lr={first['lr']}; seeds {', '.join(map(str, seeds))}. "
        f"Each run is a real multi-process run; its config, metrics and results are in the "
        f"store. Values are the mean over seeds with the range in brackets.",
        "",
        f"Target loss: **{target}** (training loss of the shards' parameters, evaluated "
        f"during the run). Loss per update is compared at {findings['updates_mark']:.0f} "
        f"updates.",
        "",
        "| condition | mode | time to target | samples/s | loss at "
        f"{findings['updates_mark']:.0f} updates | mean staleness | max clock gap | final loss |"
        " test accuracy | straggler slowdown |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g in findings["groups"]:
        lines.append(
            f"| {g['condition']} | {g['mode']} | {_fmt(g['time_to_target_s'], ' s')} | "
            f"{_fmt(g['samples_per_s'], '', 0)} | {_fmt(g['loss_at_updates'], '', 3)} | "
            f"{_fmt(g['mean_staleness'])} | {g['max_clock_gap']} | "
            f"{_fmt(g['final_loss'], '', 3)} | {_fmt(g['test_accuracy'], '', 3)} | "
            f"{_fmt(g['straggler_slowdown'], '×', 1)} |"
        )
    lines += ["", *_observations(findings), ""]
    for name, caption in FIGURES.items():
        lines += [f"## {caption}", "", f"![{caption}]({name})", "", _CAPTIONS[name], ""]
    lines += [
        "## Runs",
        "",
        "| run | condition | mode | seed | wall s | final loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (cond, label), members in group(runs).items():
        for r in members:
            lines.append(
                f"| `{r.run_id}` | {cond} | {label} | {r.seed} | {r.summary['wall_s']:.1f} | "
                f"{r.summary['final_loss']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def _observations(findings: dict[str, Any]) -> list[str]:
    """Plain statements of what the numbers show: who reached the target first, per condition."""
    out = ["## What it shows", ""]
    by_cond: dict[str, list[dict[str, Any]]] = {}
    for g in findings["groups"]:
        by_cond.setdefault(g["condition"], []).append(g)
    for cond, groups in by_cond.items():
        timed = [g for g in groups if g["time_to_target_mean_s"] is not None]
        if not timed:
            out.append(f"- {cond}: no mode reached the target loss.")
            continue
        ranked = sorted(timed, key=lambda g: g["time_to_target_mean_s"])
        order = ", ".join(f"{g['mode']} {g['time_to_target_mean_s']:.2f} s" for g in ranked)
        out.append(f"- {cond}, time to target (mean over seeds), fastest first: {order}.")
        missed = [g["mode"] for g in groups if g["reached"] < len(g["seeds"])]
        if missed:
            out.append(f"  Not every seed reached the target with: {', '.join(missed)}.")
    effect = findings["staleness_effect"]
    if effect["slope"] is not None:
        xs = [x for x, _ in effect["points"]]
        out.append(
            f"- no straggler, per update: the loss after {effect['updates']:.0f} updates changes "
            f"by {effect['slope']:+.3f} per unit of mean staleness ({len(xs)} SSP/ASP runs, mean "
            f"staleness {min(xs):.2f}–{max(xs):.2f}); positive means staleness costs progress."
        )
    return out


_CAPTIONS = {
    "loss_vs_time.png": "One line per run (colour: mode). With a straggler, BSP waits for it at "
    "every clock; SSP lets the others run up to s clocks ahead; ASP never waits.",
    "loss_vs_updates.png": "The same runs against optimizer updates applied by the shards. A BSP "
    "update averages one gradient per worker; an SSP/ASP update applies one gradient, computed "
    "on parameters that may be some updates old (staleness).",
    "time_to_target.png": "Bars: mean over seeds; whiskers: range; dots: seeds. A missing bar or "
    "an n/N label means some runs never reached the target.",
    "throughput.png": "Samples per second over all workers during training.",
    "clock_gap.png": "How far ahead of the slowest worker a pull was when served "
    "(c − min clock): 0 for BSP, at most s for SSP(s), unbounded for ASP.",
    "staleness.png": "For each applied gradient, how many updates the shard applied between the "
    "worker's read and this gradient's application.",
    "worker_wait.png": "Seconds each worker spent in pulls (waiting for the consistency rule and "
    "the transfer), mean over seeds.",
    "progress_vs_staleness.png": "One dot per SSP/ASP run without a straggler: the loss after a "
    "fixed number of updates against the run's measured mean staleness. With workers of equal "
    "speed the bound s rarely binds, so staleness comes mostly from the number of workers "
    "(sweep --workers to spread it).",
}

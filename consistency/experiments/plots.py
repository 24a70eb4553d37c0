"""The figures of a consistency report (DESIGN §8), each a PNG that carries the data it shows.

Every plotted line and bar gets an id (``condition|mode|seed`` for lines, ``condition|mode`` or
``condition|mode|worker`` for bars); after drawing, the values are read back *from the drawn
artists* and written into the PNG's ``tether-data`` text chunk, and returned. So a test can read
an image and check that what was drawn is what the store holds, and a re-rendered report can be
compared with the first figure by figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tether.consistency.experiments.analysis import (
    RunData,
    group,
    loss_at_updates,
    loss_curve,
    mean_staleness,
    mode_order,
    spread,
    time_to_target,
    worker_wait,
)

DATA_KEY = "tether-data"
CONDITIONS = ("no straggler", "straggler")


def _plt() -> Any:
    from tether.plotting import pyplot

    return pyplot("an experiment report's figures")


def _colors(labels: list[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(sorted(set(labels), key=mode_order))}


def _conditions(runs: list[RunData]) -> list[str]:
    present = {r.condition for r in runs}
    return [c for c in CONDITIONS if c in present]


def _panels(runs: list[RunData], width: float, height: float) -> tuple[Any, list[Any], Any]:
    """A figure with one panel per straggler condition present: (fig, [(ax, cond)], colors)."""
    conditions = _conditions(runs)
    fig, axes = _plt().subplots(
        1, len(conditions), figsize=(width * len(conditions), height), squeeze=False
    )
    colors = _colors([setting for _, setting in group(runs)])
    return fig, list(zip(axes[0], conditions, strict=True)), colors


def drawn_data(fig: Any) -> dict[str, Any]:
    """The values of every artist with an id, read back from the figure."""
    data: dict[str, Any] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid():
                data[line.get_gid()] = {
                    "x": [float(v) for v in line.get_xdata()],
                    "y": [float(v) for v in line.get_ydata()],
                }
        for patch in ax.patches:
            if patch.get_gid():
                data[patch.get_gid()] = {"height": float(patch.get_height())}
    return data


def save(fig: Any, path: Path) -> dict[str, Any]:
    data = drawn_data(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={DATA_KEY: json.dumps(data, sort_keys=True)})
    _plt().close(fig)
    return data


def read_png_data(path: Path) -> dict[str, Any]:
    """The data a figure of this module carries (for tests and comparisons)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.text  # type: ignore[attr-defined]
    return dict(json.loads(text[DATA_KEY]))


def plot_loss(
    runs: list[RunData], x: str, path: Path, target: float | None = None
) -> dict[str, Any]:
    """Evaluated training loss per mode against wall-clock (x="time") or updates."""
    fig, panels, colors = _panels(runs, 6, 4.2)
    for ax, cond in panels:
        for (c, label), members in group(runs).items():
            if c != cond:
                continue
            for i, run in enumerate(members):
                xs, ys = loss_curve(run, x)
                (line,) = ax.plot(
                    xs, ys, color=colors[label], lw=1.2, alpha=0.85,
                    label=label if i == 0 else None,
                )  # fmt: skip
                line.set_gid(f"{cond}|{label}|{run.seed}")
        if target is not None:
            ax.axhline(target, color="0.4", lw=0.8, ls=":", label=f"target {target}")
        ax.set_yscale("log")
        ax.set_title(cond)
        ax.set_xlabel("seconds since the first iteration" if x == "time" else "updates applied")
        ax.set_ylabel("training loss (evaluated)")
        ax.legend(fontsize=8)
    return save(fig, path)


def _bars(runs: list[RunData], path: Path, value: Any, ylabel: str, title: str) -> dict[str, Any]:
    """One bar per mode and condition: the mean over seeds, the range as an error bar, and a
    dot per seed."""
    fig, panels, colors = _panels(runs, 5.5, 4)
    for ax, cond in panels:
        labels: list[str] = []
        for (c, label), members in group(runs).items():
            if c != cond:
                continue
            values = [value(r) for r in members]
            s = spread(values)
            i = len(labels)
            labels.append(label)
            height = s.mean if s.n else 0.0
            (bar,) = ax.bar(i, height, color=colors[label], alpha=0.8)
            bar.set_gid(f"{cond}|{label}")
            if s.n > 1:
                ax.errorbar(i, s.mean, yerr=[[s.mean - s.low], [s.high - s.mean]], color="k")
            have = [v for v in values if v is not None]
            ax.plot([i] * len(have), have, "k.", ms=5)
            if s.n < s.of:
                ax.annotate(f"{s.n}/{s.of}", (i, height), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(f"{title} — {cond}")
        ax.set_ylabel(ylabel)
    return save(fig, path)


def plot_time_to_target(runs: list[RunData], target: float, path: Path) -> dict[str, Any]:
    return _bars(
        runs, path, lambda r: time_to_target(r, target),
        f"seconds to training loss ≤ {target}", "time to target",
    )  # fmt: skip


def plot_throughput(runs: list[RunData], path: Path) -> dict[str, Any]:
    return _bars(
        runs, path, lambda r: float(r.summary["samples_per_s"]), "samples / s (all workers)",
        "throughput",
    )  # fmt: skip


def plot_histograms(runs: list[RunData], key: str, xlabel: str, path: Path) -> dict[str, Any]:
    """The distribution of a per-event histogram of the summaries, per mode (seeds pooled)."""
    fig, panels, colors = _panels(runs, 6, 4)
    for ax, cond in panels:
        for (c, label), members in group(runs).items():
            if c != cond:
                continue
            pooled: list[int] = []
            for r in members:
                h = r.summary.get(key) or []
                pooled += [0] * (len(h) - len(pooled))
                for i, v in enumerate(h):
                    pooled[i] += int(v)
            total = sum(pooled) or 1
            (line,) = ax.plot(
                range(len(pooled)), [v / total for v in pooled], drawstyle="steps-mid",
                color=colors[label], label=label, marker=".",
            )  # fmt: skip
            line.set_gid(f"{cond}|{label}")
        ax.set_title(cond)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction")
        ax.legend(fontsize=8)
    return save(fig, path)


def plot_worker_wait(runs: list[RunData], path: Path) -> dict[str, Any]:
    """Seconds each worker waited for its pulls, per mode (mean over seeds)."""
    fig, panels, colors = _panels(runs, 6, 4)
    for ax, cond in panels:
        groups = [(label, m) for (c, label), m in group(runs).items() if c == cond]
        width = 0.8 / max(len(groups), 1)
        for g, (label, members) in enumerate(groups):
            waits = [worker_wait(r) for r in members]
            workers = sorted({w for wt in waits for w in wt})
            for w in workers:
                mean = sum(wt.get(w, 0.0) for wt in waits) / len(waits)
                (bar,) = ax.bar(
                    w + (g - (len(groups) - 1) / 2) * width, mean, width, color=colors[label],
                    label=label if w == workers[0] else None,
                )  # fmt: skip
                bar.set_gid(f"{cond}|{label}|{w}")
        ax.set_title(cond)
        ax.set_xlabel("worker")
        ax.set_ylabel("seconds waiting for pulls")
        ax.legend(fontsize=8)
    return save(fig, path)


def plot_progress_vs_staleness(runs: list[RunData], updates: float, path: Path) -> dict[str, Any]:
    """Loss after a fixed number of updates against each run's measured mean staleness (runs
    without a straggler that apply gradients one by one)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    colors = _colors([setting for _, setting in group(runs)])
    for (cond, setting), members in group(runs).items():
        if cond != "no straggler" or setting.startswith("bsp"):
            continue
        for i, run in enumerate(members):
            loss = loss_at_updates(run, updates)
            if loss is None:
                continue
            (dot,) = ax.plot(
                [mean_staleness(run)], [loss], "o", color=colors[setting],
                label=setting if i == 0 else None,
            )  # fmt: skip
            dot.set_gid(f"{cond}|{setting}|{run.seed}")
    ax.set_xlabel("mean version staleness of applied gradients")
    ax.set_ylabel(f"training loss after {updates:.0f} updates")
    ax.set_title("progress per update vs staleness (no straggler)")
    if ax.get_lines():
        ax.legend(fontsize=8)
    return save(fig, path)

"""Train the character Transformer under BSP and SSP(2) and plot the workers' loss per step.

    python examples/plot_transformer.py            # writes docs/img/transformer_loss.png

Each run goes through `tether.launch`, exactly like `tether launch --task
examples/char_transformer.py:task ...`; the per-step losses are read back from the run's store
(every worker logs one metric row per clock, DESIGN §8). About 50 s per run on two CPU cores.
Needs matplotlib: the `examples` extra (`pip install -e '.[examples]'`).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import tether
import tether.store

HERE = Path(__file__).resolve().parent
# A file spec, not the imported object: the members are other processes, started in other
# folders, and load the task by its absolute path (DESIGN §11).
TASK = f"{HERE / 'char_transformer.py'}:task"
SETTINGS: dict[str, Any] = {
    "workers": 2, "shards": 2, "batch_size": 16, "optimizer": "adam", "lr": 3e-3, "seed": 0
}  # fmt: skip
MODES: dict[str, dict[str, Any]] = {
    "BSP": {"mode": "bsp"},
    "SSP (s=2)": {"mode": "ssp", "staleness": 2},
}


def worker_losses(summary: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"worker:0": (steps, losses), ...}: each worker's training loss per clock, from the
    run's store."""
    with tether.store.open_store(summary["store"]) as store:
        rows = store.metrics(summary["run_id"])
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for source in sorted({r.source for r in rows if r.source.startswith("worker:")}):
        mine = sorted((r.step, r.values["loss"]) for r in rows if r.source == source)
        out[source] = (np.array([s for s, _ in mine]), np.array([v for _, v in mine]))
    return out


def smooth(values: np.ndarray, width: int) -> np.ndarray:
    """Centred mean over `width` steps (narrower at the ends), so the curve does not lag."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    i = np.arange(len(values))
    lo, hi = np.maximum(i - width // 2, 0), np.minimum(i + width // 2 + 1, len(values))
    return (sums[hi] - sums[lo]) / (hi - lo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="steps per worker (400)")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "img" / "transformer_loss.png"))
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}.")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    with tempfile.TemporaryDirectory() as tmp:
        for (label, mode), color in zip(MODES.items(), ("tab:blue", "tab:orange"), strict=True):
            summary = tether.launch(
                TASK, run_dir=Path(tmp) / mode["mode"], steps=args.steps, **SETTINGS, **mode
            )
            losses = worker_losses(summary)
            # The workers' mean loss at each clock; every worker logs every clock once.
            steps = next(iter(losses.values()))[0]
            mean = np.mean([v for _, v in losses.values()], axis=0)
            held_out = summary["final_loss"]
            print(
                f"{label}: training loss {mean[0]:.2f} at step 0, {mean[-10:].mean():.2f} over "
                f"the last 10 steps; held-out {held_out:.3f} nats/char after {args.steps} steps"
            )
            ax.plot(steps, mean, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(mean, 20), color=color, label=f"{label}: held-out {held_out:.2f}")
    ax.axhline(math.log(256), color="gray", linestyle=":", label="ln 256 (uniform bytes)")
    ax.set(xlabel="worker clock (step)", ylabel="training loss (nats/char)", ylim=(0, 6))
    ax.set_title("Character Transformer on stdlib source, 2 workers x batch 16")
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""`tether bench train`: a real run's steady-state update rate against the model's own step.

In one invocation, on the same machine and task:

1. baseline: the task's own jitted gradient step, in this process, on device-resident
   parameters (`tether.tasks.bench.model_step`): the rate a single-process loop could reach;
2. the run: shards and workers as child processes (`Launcher`), replication off, and the rate at
   which the shards applied updates once every worker is past its first `skip` clocks (start-up
   and compilation excluded), read from the workers' per-step metric rows in the store.

The baseline is measured before the run starts and again after it ends, so the two never
compete for the CPUs; `single_process_steps_per_s` is the mean of the two rates, so that a shared
machine's speed drifting during the run moves the baseline too (both are reported).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from tether.config import RunConfig
from tether.driver.launcher import Launcher, LaunchOptions
from tether.store import MetricRow, default_store_uri, open_store
from tether.tasks.bench import interleaved_medians, model_step
from tether.tasks.build import context_of, runtime_of


def steady_rate(rows: list[MetricRow], skip: int) -> tuple[float, int, float]:
    """(updates per second, updates counted, window seconds) of the workers' step rows, over
    the window from the moment the last worker finished clock `skip` to the moment the first
    worker finished its last clock (every worker is running in that window)."""
    by_worker: dict[str, dict[int, float]] = {}
    for r in rows:
        if r.source.startswith("worker:"):
            by_worker.setdefault(r.source, {})[r.step] = r.t
    if not by_worker:
        raise ValueError("the run logged no worker steps")
    start = max(steps[skip] for steps in by_worker.values() if skip in steps)
    end = min(steps[max(steps)] for steps in by_worker.values())
    count = sum(1 for steps in by_worker.values() for t in steps.values() if start < t <= end)
    if end <= start or count == 0:
        raise ValueError(f"no steady window after clock {skip}: raise --steps or lower --skip")
    return count / (end - start), count, end - start


def bench_train(config: RunConfig, skip: int = 30, err: TextIO = sys.stderr) -> dict[str, Any]:
    if not 0 <= skip < config.steps - 1:
        raise ValueError(f"--skip must be in [0, --steps - 1), got {skip}")
    runtime = runtime_of(config)
    ctx = context_of(config, "worker")
    flat = runtime.init_flat(config.seed)
    batch = runtime.task.batch(ctx, 0)
    step = model_step(runtime, runtime.layout.views(flat), batch)
    before = interleaved_medians({"model": step}, 200, 5)["model"]
    print(f"tether bench: model step {before * 1e3:.2f} ms ({1 / before:.0f}/s); starting the run",
          file=err)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        run_dir = Path(tmp)
        store_uri = default_store_uri(run_dir)
        summary = Launcher(
            LaunchOptions(config=config, run_dir=run_dir, store_uri=store_uri), err=err
        ).run()
        with open_store(store_uri) as store:
            rate, count, window = steady_rate(store.metrics(config.run_id), skip)
    after = interleaved_medians({"model": step}, 200, 5)["model"]
    single = (1 / before + 1 / after) / 2
    return {
        "task": config.task or config.model,
        "num_params": config.num_params,
        "batch_size": config.batch_size,
        "mode": config.mode,
        "shards": config.shards,
        "workers": config.workers,
        "optimizer": config.optimizer,
        "overlap": config.overlap,
        "shared_memory": config.shared_memory,
        "segment_pulls": summary.segment_pulls,
        "seed": config.seed,
        "model_step_ms": 2e3 / (1 / before + 1 / after),
        "single_process_steps_per_s": single,
        "single_process_before": 1 / before,
        "single_process_after": 1 / after,
        "updates_per_s": rate,
        "ratio": rate / single,
        "window_updates": count,
        "window_s": window,
        "max_clock_gap": summary.max_clock_gap,
    }

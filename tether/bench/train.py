"""`tether bench train`: a real run's steady-state update rate against the model's own step.

In one invocation, on the same machine and task:

1. baseline: the task's own jitted gradient step, in this process, on device-resident
   parameters (`tether.bench.timing.model_step`): the rate a single-process loop could reach;
2. the run: shards and workers as child processes (`tether.driver.api.run`), replication off,
   and the rate at which the shards applied updates once every worker is past its first `skip`
   clocks (start-up and compilation excluded), read from the workers' per-step metric rows in
   the store.

The baseline is measured before the run starts and again after it ends, so the two never
compete for the CPUs; `single_process_steps_per_s` is the mean of the two rates, so that a shared
machine's speed drifting during the run moves the baseline too (both are reported).

What bounds the rate is read off the same run (`CpuSampler`, Linux): the CPU time the workers and
the shards used in the steady window, per update, and from it the rate the run would reach if
its processes kept every CPU this process may use busy (`ceiling_updates_per_s`): the ratio can
only approach `ceiling_ratio` by using less CPU per update, not by waiting less.
"""

from __future__ import annotations

import bisect
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from tether.bench.timing import interleaved_medians, model_step
from tether.config import RunConfig
from tether.driver import api
from tether.driver.launcher import Launcher
from tether.store import MetricRow, default_store_uri, open_store
from tether.tasks.build import context_of, runtime_of


def steady_rate(rows: list[MetricRow], skip: int) -> tuple[float, int, tuple[float, float]]:
    """(updates per second, updates counted, (start, end) unix times) of the workers' step
    rows, over the window from the moment the last worker finished clock `skip` to the moment
    the first worker finished its last clock (every worker is running in that window)."""
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
    return count / (end - start), count, (start, end)


class CpuSampler:
    """CPU seconds (user + system) of the processes `members()` names as (role, pid), sampled
    from /proc every `interval_s` while the run goes; `used` gives what each role spent in a
    window."""

    def __init__(
        self, members: Callable[[], list[tuple[str, int]]], interval_s: float = 0.1
    ) -> None:
        self.members, self.interval_s = members, interval_s
        self.tick_s = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self.samples: list[tuple[float, dict[tuple[str, int], float]]] = []  # (unix time, cpu)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.thread.join()

    def _cpu_s(self, pid: int) -> float | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            return None  # exited, or no /proc (not Linux)
        return (int(fields[11]) + int(fields[12])) * self.tick_s  # utime, stime

    def _sample(self) -> None:
        while not self.done.wait(self.interval_s):
            now = time.time()
            cpu: dict[tuple[str, int], float] = {}
            for role, pid in self.members():
                if (used := self._cpu_s(pid)) is not None:
                    cpu[(role, pid)] = used
            if cpu:
                self.samples.append((now, cpu))

    def used(self, start: float, end: float) -> dict[str, float] | None:
        """CPU seconds per role ("worker", "server") spent in [start, end] by the processes
        alive throughout it, scaled from the nearest samples outside it; None without them."""
        times = [t for t, _ in self.samples]
        i, j = bisect.bisect_right(times, start) - 1, bisect.bisect_left(times, end)
        if i < 0 or j >= len(times) or times[j] <= times[i]:
            return None
        (t0, a), (t1, b) = self.samples[i], self.samples[j]
        scale = (end - start) / (t1 - t0)
        out: dict[str, float] = {}
        for key in a.keys() & b.keys():
            out[key[0]] = out.get(key[0], 0.0) + (b[key] - a[key]) * scale
        return out


def cpu_figures(
    used: dict[str, float] | None, updates: int, window_s: float, single: float
) -> dict[str, Any]:
    """The steady window's CPU per update and the rate at which the member processes would keep
    every CPU this process may use busy (`ceiling_updates_per_s`); nulls without a sample."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not used or updates == 0:
        return {"cpus": cpus, "cpu_ms_per_update": None, "cpu_busy": None,
                "ceiling_updates_per_s": None, "ceiling_ratio": None}  # fmt: skip
    per_update = {role: 1e3 * used.get(role, 0.0) / updates for role in ("worker", "server")}
    total_ms = sum(per_update.values())
    ceiling = cpus * 1e3 / total_ms if total_ms > 0 else None
    return {
        "cpus": cpus,
        "cpu_ms_per_update": {"workers": per_update["worker"], "shards": per_update["server"]},
        "cpu_busy": sum(used.values()) / window_s / cpus,
        "ceiling_updates_per_s": ceiling,
        "ceiling_ratio": ceiling / single if ceiling is not None else None,
    }


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
        launchers: list[Launcher] = []
        hooks = api.RunHooks(on_start=launchers.append)

        def members() -> list[tuple[str, int]]:
            return [(c.role, c.pid) for launcher in launchers for c in list(launcher.children)]

        with CpuSampler(members) as cpu:
            summary = api.run(config, None, hooks, run_dir=run_dir, store=store_uri, err=err)
        with open_store(store_uri) as store:
            rate, count, (start, end) = steady_rate(store.metrics(config.run_id), skip)
    after = interleaved_medians({"model": step}, 200, 5)["model"]
    single = (1 / before + 1 / after) / 2
    window = end - start
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
        **cpu_figures(cpu.used(start, end), count, window, single),
    }

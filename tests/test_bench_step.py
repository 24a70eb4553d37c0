"""`tether bench step` and `tether bench train` (DESIGN §11): what they compute, on tiny inputs.
The figures themselves are for the benchmarks' own runs, not asserted here (timings on a shared
machine are not test outcomes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tether import shm
from tether.bench.train import CpuSampler, cpu_figures, steady_rate
from tether.cli.main import main
from tether.store import MetricRow


def rows(source: str, times: list[float]) -> list[MetricRow]:
    return [MetricRow(source=source, step=i, t=t, values={}) for i, t in enumerate(times)]


def test_the_steady_rate_counts_only_the_window_where_every_worker_runs() -> None:
    # worker 0 steps every 1 s from t=0; worker 1 starts late (t=10) and steps every 0.5 s.
    w0 = rows("worker:0", [float(i) for i in range(30)])  # last step at t=29
    w1 = rows("worker:1", [10 + 0.5 * i for i in range(30)])  # clock 2 at t=11, last at 24.5
    shard = rows("shard:0", [0.0, 100.0])  # not a worker: ignored
    rate, count, window = steady_rate(w0 + w1 + shard, skip=2)
    # window (11, 24.5]: worker 0 steps 12..24 (13 of them), worker 1 steps 3..29 (27)
    assert window == pytest.approx((11, 24.5))
    assert count == 13 + 27
    assert rate == pytest.approx(40 / 13.5)
    with pytest.raises(ValueError, match="no steady window"):
        steady_rate(w0 + w1, skip=29)
    with pytest.raises(ValueError, match="no worker steps"):
        steady_rate(shard, skip=0)


def test_bench_step_reports_both_steps_and_their_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "step", "--model", "logreg", "--dataset", "digits", "--batch-size", "8"]
    assert main([*args, "--repeats", "3", "--warmup", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["num_params"] == 64 * 10 + 10 and out["batch_size"] == 8
    assert out["model_step_ms"] > 0 and out["worker_step_ms"] > 0
    assert out["ratio"] == pytest.approx(out["worker_step_ms"] / out["model_step_ms"])
    assert main([*args, "--repeats", "0"]) == 2  # bad input: one sentence, exit 2
    assert "--repeats and --warmup must be >= 1" in capsys.readouterr().err


def test_the_cpu_of_a_window_is_scaled_from_the_samples_around_it() -> None:
    sampler = CpuSampler(list)  # never started: the samples are given by hand
    sampler.samples = [
        (0.0, {("worker", 1): 0.0, ("server", 2): 0.0}),
        (2.0, {("worker", 1): 1.0, ("server", 2): 0.5, ("worker", 3): 0.0}),
        (6.0, {("worker", 1): 3.0, ("server", 2): 1.5, ("worker", 3): 4.0}),
    ]
    # [2.5, 5.5] lies between the samples at 2 and 6: a 3 s window of a 4 s interval. Process 3
    # was not alive at t=0 but is in both samples around the window, so it counts.
    used = sampler.used(2.5, 5.5)
    assert used == pytest.approx({"worker": (2.0 + 4.0) * 0.75, "server": 1.0 * 0.75})
    assert sampler.used(1.0, 6.5) is None  # no sample after the window's end
    figures = cpu_figures({"worker": 3.0, "server": 1.0}, updates=1000, window_s=4.0, single=500)
    cpus = figures["cpus"]
    assert figures["cpu_ms_per_update"] == {"workers": 3.0, "shards": 1.0}
    assert figures["ceiling_updates_per_s"] == pytest.approx(cpus * 1000 / 4.0)
    assert figures["ceiling_ratio"] == pytest.approx(cpus * 250 / 500)
    assert figures["cpu_busy"] == pytest.approx(4.0 / 4.0 / cpus)
    assert cpu_figures(None, 1000, 4.0, 500)["ceiling_updates_per_s"] is None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_train_runs_shards_and_workers_and_reports_the_ratio(tether_cli) -> None:
    # BSP keeps the workers in step, so a steady window exists however far apart they start
    # (under ASP a fast worker can finish 60 clocks before the other has begun).
    proc = tether_cli("bench", "train", "--model", "logreg", "--dataset", "digits",
                      "--mode", "bsp", "--batch-size", "8", "--steps", "400", "--skip", "5",
                      "--json")  # fmt: skip
    out = proc.json()
    assert out["single_process_steps_per_s"] == pytest.approx(
        (out["single_process_before"] + out["single_process_after"]) / 2
    )
    assert out["ratio"] == pytest.approx(out["updates_per_s"] / out["single_process_steps_per_s"])
    assert out["window_updates"] > 0 and out["updates_per_s"] > 0
    if Path("/proc/self/stat").exists():
        # The members' CPU in the window, read from /proc: they cannot have used more than the
        # machine's CPUs, so the rate reached is at most the ceiling it implies.
        per_update = out["cpu_ms_per_update"]
        assert per_update["workers"] > 0 and per_update["shards"] > 0
        assert 0 < out["cpu_busy"] <= 1.05
        assert out["updates_per_s"] <= out["ceiling_updates_per_s"] * 1.05
    # Every pull of the run took the same-host path (2 workers x 400 clocks), where it exists.
    assert out["segment_pulls"] == (800 if shm.SHM_DIR.is_dir() else 0)

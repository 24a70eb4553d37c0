"""`tether bench step` and `tether bench train` (DESIGN §11): what they compute, on tiny inputs.
The figures themselves are for the benchmarks' own runs, not asserted here (timings on a shared
machine are not test outcomes)."""

from __future__ import annotations

import json

import pytest

from tether import shm
from tether.cli.main import main
from tether.driver.bench_train import steady_rate
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
    assert window == pytest.approx(13.5)
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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_train_runs_shards_and_workers_and_reports_the_ratio(tether_cli) -> None:
    # BSP keeps the workers in step, so a steady window exists however far apart they start
    # (under ASP a fast worker can finish 60 clocks before the other has begun).
    proc = tether_cli("bench", "train", "--model", "logreg", "--dataset", "digits",
                      "--mode", "bsp", "--batch-size", "8", "--steps", "60", "--skip", "5",
                      "--json")  # fmt: skip
    out = proc.json()
    assert out["single_process_steps_per_s"] == pytest.approx(
        (out["single_process_before"] + out["single_process_after"]) / 2
    )
    assert out["ratio"] == pytest.approx(out["updates_per_s"] / out["single_process_steps_per_s"])
    assert out["window_updates"] > 0 and out["updates_per_s"] > 0
    # Every pull of the run took the same-host path (2 workers x 60 clocks), where it exists.
    assert out["segment_pulls"] == (120 if shm.SHM_DIR.is_dir() else 0)

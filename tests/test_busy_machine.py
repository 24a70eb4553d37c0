"""Slow is not dead: real launches on a machine whose CPUs other programs keep busy, and models
large enough that building, applying and replicating their state takes seconds (DESIGN §5
Liveness). The assertion is the outcome -- the run finishes and nothing was restarted -- never a
timing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BURN = "while True:\n    pass\n"


@pytest.fixture
def cpu_hogs() -> Iterator[Callable[[int], list[int]]]:
    """Start busy-looping processes (each in its own session); teardown kills them by PID."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(n: int) -> list[int]:
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", BURN], stdin=subprocess.DEVNULL, start_new_session=True
                )
            )
        return [p.pid for p in procs]

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=30)


def no_restarts(summary: dict) -> None:
    assert summary["restarts"] == {"server": 0, "worker": 0}, summary["recoveries"]
    assert summary["recoveries"] == [] and summary["recovery_s"] == []
    assert not [e for e in summary["events"] if e["kind"] == "liveness_kill"]


def test_default_launch_with_the_cpus_twice_oversubscribed_restarts_nothing(
    tether_cli, tmp_path, cpu_hogs
):
    hogs = cpu_hogs(2 * (os.cpu_count() or 1))
    summary = tether_cli("launch", "--json", "--run-dir", str(tmp_path / "run")).json(500)
    assert all(os.path.exists(f"/proc/{pid}") for pid in hogs)  # the load lasted the whole run
    no_restarts(summary)
    assert summary["test_accuracy"] >= 0.9
    assert summary["updates_applied"] == summary["steps"]


def test_ssp_with_three_workers_on_a_busy_machine_restarts_nothing(tether_cli, tmp_path, cpu_hogs):
    cpu_hogs(2 * (os.cpu_count() or 1))
    summary = tether_cli(
        "launch", "--json", "--mode", "ssp", "--staleness", "2", "--workers", "3",
        "--run-dir", str(tmp_path / "run"),
    ).json(500)  # fmt: skip
    no_restarts(summary)
    assert summary["test_accuracy"] >= 0.9 and summary["max_clock_gap"] <= 2


@pytest.mark.parametrize("replication", ["sync", "async", "off"])
def test_a_multi_million_parameter_model_restarts_nothing(tether_cli, tmp_path, replication):
    """2.1M parameters: building the initial state, each apply and each replicated write take
    long enough that a heartbeat waiting on them would miss its lease."""
    summary = tether_cli(
        "launch", "--json", "--dataset", "synthetic:1024", "--model", "mlp:1024x1024",
        "--steps", "15", "--replication", replication, "--run-dir", str(tmp_path / "run"),
    ).json(500)  # fmt: skip
    assert summary["num_params"] > 2_000_000
    no_restarts(summary)
    assert summary["updates_applied"] == 15 and summary["ledger"]["ok"]

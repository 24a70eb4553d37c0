"""Killed members recover from the replicated state, with no checkpoint files (DESIGN §5).

Multi-process runs through `tether launch` on the SQLite store; faults are real signals to real
processes, timed by the run's progress as read from the store, never by sleeps.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from helpers import wait_until
from tether.cli.status import run_status

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


COMMON = ["--json", "--steps", "300", "--seed", "3"]


@pytest.mark.parametrize(
    "mode_args, bound",
    [
        (["--mode", "bsp"], 0),
        (["--mode", "ssp", "--staleness", "2", "--workers", "3"], 2),
        (["--mode", "asp"], None),
    ],
    ids=["bsp-sync", "ssp2-async", "asp-async"],
)
def test_a_killed_shard_is_replaced_and_the_run_finishes(
    tether_cli, tmp_path, watch, mode_args, bound
):
    run_dir = tmp_path / "run"
    launch = tether_cli("launch", *COMMON, *mode_args, "--run-dir", str(run_dir))
    w = watch(run_dir)
    killed = w.kill_at(100, "server", 0)
    summary = launch.json()
    assert summary["restarts"] == {"server": 1, "worker": 0}
    assert len(summary["recovery_s"]) == 1 and summary["recovery_s"][0] > 0
    assert summary["test_accuracy"] >= 0.90
    if bound is not None:
        assert summary["max_clock_gap"] <= bound  # the bound held through the recovery
    shard0 = w.member("server", 0)
    assert shard0.epoch == 2 and shard0.pid != killed
    if summary["replication"] == "sync":
        # Nothing acknowledged was lost, nothing applied twice: exactly one update per clock.
        assert summary["lost_updates"] == 0
        assert summary["updates_applied"] == summary["steps"]
    else:
        # Async: the window lost is measured; every lost update was redone by its worker.
        assert summary["lost_updates"] >= 0
        assert summary["updates_applied"] >= summary["workers"] * summary["steps"]


def test_bsp_sync_with_kills_ends_bit_identical_to_the_fault_free_run(tether_cli, tmp_path, watch):
    # Worker 0 is a 25 ms straggler so the 40 clocks after the last kill outlast a worker's
    # 0.5 s progress beat: at 5 ms the run could reach clock 200 and exit between two beats,
    # before any beat showed clock 160, and the last kill found worker 0 already gone.
    args = ["--json", "--steps", "200", "--seed", "11", "--straggler", "0:25"]
    clean = tether_cli("launch", *args, "--run-dir", str(tmp_path / "clean")).json()
    run_dir = tmp_path / "faulty"
    launch = tether_cli("launch", *args, "--run-dir", str(run_dir))
    w = watch(run_dir)
    w.kill_at(40, "server", 0)
    w.kill_at(90, "worker", 1)
    w.kill_at(140, "server", 1)
    w.kill_at(160, "worker", 0)
    faulty = launch.json()
    assert faulty["restarts"] == {"server": 2, "worker": 2}
    assert faulty["lost_updates"] == 0 and faulty["updates_applied"] == 200
    # The audit: every shard accepted each worker's push of each clock exactly once.
    assert faulty["pushes_accepted"] == 2 * 2 * 200 == clean["pushes_accepted"]
    assert faulty["params_sha256"] == clean["params_sha256"]


def test_a_killed_worker_resumes_from_its_clock(tether_cli, tmp_path, watch):
    run_dir = tmp_path / "run"
    launch = tether_cli(
        "launch", *COMMON, "--mode", "ssp", "--staleness", "1", "--run-dir", str(run_dir)
    )
    w = watch(run_dir)
    w.kill_at(60, "worker", 0)
    summary = launch.json()
    assert summary["restarts"] == {"server": 0, "worker": 1}
    assert summary["max_clock_gap"] <= 1 and summary["test_accuracy"] >= 0.90
    # Worker 0 continued from its clock: no iteration was pushed twice or skipped.
    assert summary["updates_applied"] == summary["workers"] * summary["steps"]


def test_the_run_fails_naming_the_member_after_max_restarts(tether_cli, tmp_path, watch):
    run_dir = tmp_path / "run"
    launch = tether_cli(
        "launch", "--steps", "100000", "--max-restarts", "0", "--run-dir", str(run_dir)
    )
    watch(run_dir).kill_at(5, "server", 1)
    rc, _, err = launch.finish(120)
    assert rc == 1
    assert "shard 1 exited with code -9 (SIGKILL) after 0 restarts (--max-restarts 0)" in err


def test_status_shows_epochs_and_restarts_while_the_run_goes_on(tether_cli, tmp_path, watch):
    run_dir = tmp_path / "run"
    launch = tether_cli("launch", "--steps", "100000", "--mode", "asp", "--run-dir", str(run_dir))
    w = watch(run_dir)
    w.kill_at(20, "server", 1)
    wait_until(
        lambda: (
            (m := w.member("server", 1)) is not None and m.epoch == 2 and "serving_since" in m.info
        ),
        60,
        "the replacement of shard 1 to serve",
    )

    def restart_causes():
        return run_status(run_dir=run_dir, store_uri=None, run_id=None)["recoveries"]

    wait_until(lambda: restart_causes(), 30, "the launcher to report the restart")
    status = tether_cli("status", "--json", "--run-dir", str(run_dir)).json()
    assert not status["finished"]
    (restart,) = status["recoveries"]
    assert (restart["role"], restart["id"], restart["epoch"]) == ("server", 1, 1)
    assert restart["cause"] == "exited" and "(SIGKILL)" in restart["detail"]
    text = tether_cli("status", "--run-dir", str(run_dir)).finish()[1]
    assert "restart: shard 1 (epoch 1) exited with code -9 (SIGKILL)" in text
    shards = {m["id"]: m for m in status["members"] if m["role"] == "server"}
    assert (shards[1]["epoch"], shards[1]["restarts"], shards[1]["alive"]) == (2, 1, True)
    assert (shards[0]["epoch"], shards[0]["restarts"]) == (1, 0)
    assert launch.proc.poll() is None  # still training


def test_a_paused_shard_fails_its_probe_is_replaced_and_the_run_finishes(
    tether_cli, tmp_path, watch
):
    """SIGSTOP: heartbeats stop, the health probe gets no answer, and only once the probes have
    failed for --probe-timeout is the shard killed and replaced, with that cause recorded."""
    run_dir = tmp_path / "run"
    launch = tether_cli(
        "launch", *COMMON, "--mode", "bsp", "--run-dir", str(run_dir),
        "--lease", "2", "--probe-timeout", "3",
    )  # fmt: skip
    w = watch(run_dir)
    paused = w.kill_at(60, "server", 1, signal.SIGSTOP)  # hung, not dead: no exit to see
    paused_at = time.time()
    rc, out, err = launch.finish()
    assert rc == 0, err[-3000:]
    assert "shard 1" in err and "failing the liveness probe" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["restarts"] == {"server": 1, "worker": 0}
    assert summary["updates_applied"] == summary["steps"] and summary["lost_updates"] == 0
    assert w.member("server", 1).epoch == 2 and w.member("server", 1).pid != paused
    (recovery,) = summary["recoveries"]
    assert (recovery["role"], recovery["id"], recovery["cause"]) == ("server", 1, "probe_failed")
    (kill,) = [e for e in summary["events"] if e["kind"] == "liveness_kill"]
    assert kill["pid"] == paused
    # Never before the lease and the probe deadline had both run out (a late heartbeat alone
    # kills nothing); the upper bound is the adaptive lease's cap plus the probe deadline.
    assert 3 <= kill["t"] - paused_at <= 30 + 3 + 60
    assert summary["liveness"]["probes_failed"] >= 2

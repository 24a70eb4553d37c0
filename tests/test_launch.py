"""Multi-process runs through `tether launch` (STYLE §8 tier 3).

Every run is real: separate shard and worker processes, gRPC on loopback, the SQLite store.
Each test checks invariants and outcomes, not schedules.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from helpers import wait_until
from tether import shm
from tether.config import OptimizerConfig
from tether.data import batch_indices, load_dataset, partition
from tether.server.optim import Optimizer
from tether.tasks.builtin import build_model
from tether.tasks.models import parse_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SUMMARY_FIELDS = {
    "run_id", "run_dir", "mode", "staleness", "shards", "workers", "steps", "optimizer", "seed",
    "final_loss", "test_accuracy", "updates_applied", "max_clock_gap", "wall_s", "samples_per_s",
    "params_sha256", "restarts", "recovery_s",
}  # fmt: skip


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_default_launch_trains_digits_and_reports_the_contract(tether_cli, tmp_path):
    summary = tether_cli("launch", "--json", "--run-dir", str(tmp_path / "run")).json()
    assert SUMMARY_FIELDS <= summary.keys()
    assert summary["mode"] == "bsp" and summary["shards"] == 2 and summary["workers"] == 2
    assert summary["test_accuracy"] >= 0.90
    assert summary["max_clock_gap"] == 0
    assert summary["updates_applied"] == summary["steps"]  # BSP: one update per clock
    assert summary["restarts"] == {"server": 0, "worker": 0} and summary["recovery_s"] == []
    assert summary["wall_s"] < 60
    status = tether_cli("status", "--json", "--run-dir", summary["run_dir"]).json()
    assert status["finished"] and status["run_id"] == summary["run_id"]
    roles = sorted((m["role"], m["id"]) for m in status["members"])
    assert roles == [("launcher", 0), ("server", 0), ("server", 1), ("worker", 0), ("worker", 1)]
    assert all(m["epoch"] == 1 and not m["alive"] for m in status["members"])
    # Shards were stopped gracefully (SIGTERM), workers finished all their steps.
    assert all(m["state"] == "exited" for m in status["members"]), status["members"]
    assert all(m["clock"] == 200 for m in status["members"] if m["role"] == "worker")
    assert all(not pid_alive(m["pid"]) for m in status["members"] if m["role"] != "launcher")
    assert status["summary"]["params_sha256"] == summary["params_sha256"]


@pytest.mark.parametrize(
    "args, bound",
    [
        (["--mode", "ssp", "--staleness", "2", "--workers", "3"], 2),
        (["--mode", "ssp", "--staleness", "2", "--straggler", "1:50", "--steps", "150"], 2),
        (["--mode", "asp", "--workers", "3"], None),
    ],
    ids=["ssp2-3workers", "ssp2-straggler", "asp-3workers"],
)
def test_ssp_and_asp_train_digits_and_keep_their_bound(tether_cli, tmp_path, args, bound):
    summary = tether_cli("launch", "--json", "--run-dir", str(tmp_path / "r"), *args).json()
    assert summary["test_accuracy"] >= 0.90
    # Apply on arrival: every accepted push is one optimizer update.
    assert summary["updates_applied"] == summary["workers"] * summary["steps"]
    gaps = summary["clock_gap_hist"]
    assert sum(gaps) == summary["shards"] * summary["workers"] * summary["steps"]
    assert summary["max_clock_gap"] == len(gaps) - 1
    if bound is not None:
        assert summary["max_clock_gap"] <= bound


def single_process_training(seed: int, steps: int, workers: int, batch: int, lr: float):
    """The reference: one process, batch W*b made of the workers' batches, same optimizer."""
    data = load_dataset("digits")
    model = build_model(parse_model("mlp:64"), data.in_dim, data.num_classes)
    params = model.init_flat(seed)
    opt = Optimizer(OptimizerConfig("sgd", lr=lr), params.size)
    parts = [partition(len(data.y_train), workers, w) for w in range(workers)]
    for clock in range(steps):
        idx = np.concatenate(
            [batch_indices(parts[w], batch, seed, w, clock) for w in range(workers)]
        )
        _, g = model.loss_and_grad(params, data.x_train[idx], data.y_train[idx])
        opt.apply(params, g)
    return params


def test_bsp_is_independent_of_shard_count_and_equals_single_process_training(tether_cli, tmp_path):
    common = ["--json", "--steps", "40", "--optimizer", "sgd", "--lr", "0.1", "--seed", "7"]
    procs = {}
    # The same-host path (DESIGN §2) and the byte stream carry the same bits.
    for shards, transport in ((1, []), (2, []), (3, []), ("2-grpc", ["--no-shared-memory"])):
        export = tmp_path / f"params-{shards}.npz"
        procs[shards] = (
            tether_cli("launch", *common, "--shards", str(shards)[0], "--export", str(export),
                       "--run-dir", str(tmp_path / f"r{shards}"), *transport),
            export,
        )  # fmt: skip
    summaries = {s: p.json() for s, (p, _) in procs.items()}
    shas = {s["params_sha256"] for s in summaries.values()}
    assert len(shas) == 1, summaries
    assert summaries["2-grpc"]["segment_pulls"] == summaries["2-grpc"]["segment_pushes"] == 0
    if shm.SHM_DIR.is_dir():
        assert all(summaries[s]["segment_pushes"] == 2 * 40 * s for s in (1, 2, 3))
    exported = np.load(procs[2][1])["params"]
    assert hashlib.sha256(exported.astype("<f4").tobytes()).hexdigest() == shas.pop()
    reference = single_process_training(seed=7, steps=40, workers=2, batch=32, lr=0.1)
    np.testing.assert_allclose(exported, reference, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(exported, build_model(parse_model("mlp:64"), 64, 10).init_flat(7))


def test_a_failed_worker_fails_the_run_with_a_message_naming_it(tether_cli, tmp_path):
    run_dir = tmp_path / "run"
    launch = tether_cli(
        "launch", "--steps", "100000", "--mode", "asp", "--max-restarts", "0",
        "--run-dir", str(run_dir),
    )  # fmt: skip

    def worker_pids() -> dict[int, int]:
        if not (run_dir / "tether.db").exists():
            return {}
        p = tether_cli("status", "--json", "--run-dir", str(run_dir))
        rc, out, _ = p.finish(60)
        if rc != 0:
            return {}
        status = json.loads(out.strip().splitlines()[-1])
        return {
            m["id"]: m["pid"]
            for m in status["members"]
            if m["role"] == "worker" and (m["clock"] or 0) > 0
        }

    wait_until(lambda: 1 in worker_pids(), timeout_s=120, what="worker 1 to make progress")
    os.kill(worker_pids()[1], signal.SIGKILL)
    rc, _, err = launch.finish(120)
    assert rc == 1
    assert "worker 1 exited with code -9 (SIGKILL) after 0 restarts (--max-restarts 0)" in err
    status = tether_cli("status", "--json", "--run-dir", str(run_dir)).json()
    assert not status["finished"]
    for m in status["members"]:
        if m["role"] != "launcher":
            assert not pid_alive(m["pid"]), f"{m['role']} {m['id']} was left running"


BAD_FLAGS = [
    (["--mode", "eventual"], "invalid choice"),
    (["--shards", "0"], "--shards must be >= 1"),
    (["--straggler", "one"], "--straggler expects ID:MS"),
    (["--straggler", "5:10"], "names worker 5"),
    (["--mode", "ssp"], "needs --staleness"),
    (["--mode", "bsp", "--staleness", "2"], "ssp only"),
    (["--model", "resnet"], "resnet"),
    (["--dataset", "imagenet"], "imagenet"),
    (["--lr", "-1"], "lr"),
    (["--device", "tpu"], "tpu"),
    (["--steps", "many"], "invalid int"),
]


@pytest.mark.parametrize("flags, words", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_get_one_sentence_and_exit_2(tether_cli, tmp_path, flags, words):
    rc, out, err = tether_cli("launch", "--run-dir", str(tmp_path / "r"), *flags).finish(60)
    assert rc == 2
    assert words in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing was started or written


def test_status_of_a_missing_run_is_a_usage_error(tether_cli, tmp_path):
    rc, _, err = tether_cli("status", "--run-dir", str(tmp_path / "nothing")).finish(30)
    assert rc == 2 and "no Tether run" in err


def test_every_command_has_help(tether_cli):
    for cmd in ([], ["launch"], ["server"], ["worker"], ["status"], ["bench", "pushpull"]):
        rc, out, _ = tether_cli(*cmd, "--help").finish(30)
        assert rc == 0 and "usage: tether" in out


def test_bench_pushpull_reports_throughput_against_raw_grpc(tether_cli):
    r = tether_cli("bench", "pushpull", "--size-mb", "4", "--repeats", "3", "--json").json()
    for key in ("push_gbps", "pull_gbps", "raw_push_gbps", "raw_pull_gbps"):
        assert r[key] > 0
    assert r["push_ratio"] == pytest.approx(r["push_gbps"] / r["raw_push_gbps"])
    assert r["size_mb"] == 4.0 and r["shards"] == 1


def test_exported_parameters_match_the_reported_hash(tether_cli, tmp_path):
    export = tmp_path / "out" / "p.npz"
    summary = tether_cli(
        "launch", "--json", "--steps", "5", "--model", "logreg", "--export", str(export),
        "--run-dir", str(tmp_path / "r"),
    ).json()  # fmt: skip
    params = np.load(export)["params"]
    assert params.dtype == np.float32 and params.size == 64 * 10 + 10
    assert hashlib.sha256(params.tobytes()).hexdigest() == summary["params_sha256"]
    assert Path(summary["run_dir"], "summary.json").exists()


def test_a_model_of_a_million_parameters_streams_in_chunks(tether_cli, tmp_path):
    summary = tether_cli(
        "launch", "--json", "--dataset", "synthetic:256", "--model", "mlp:2048x512",
        "--steps", "3", "--mode", "asp", "--run-dir", str(tmp_path / "r"),
    ).json()  # fmt: skip
    assert summary["num_params"] == 256 * 2048 + 2048 + 2048 * 512 + 512 + 512 * 10 + 10
    assert summary["num_params"] * 4 / 2 > 2 * 2**20  # each shard's slice spans several chunks
    assert summary["updates_applied"] == 2 * 3
    assert np.isfinite(summary["final_loss"])

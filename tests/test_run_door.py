"""One door into a run (tether/driver/api.py, tether/config/): the config nested by concern with
the product's defaults, its flat stored form unchanged, and the same checks on every way in."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import tether
import tether.driver.progress
from tether.chaos.runner import run_scenario
from tether.chaos.scenario import load_scenario
from tether.cli.main import main
from tether.config import SETTINGS, LivenessPolicy, RunConfig, TaskConfig, Transport
from tether.consistency import Consistency, Mode
from tether.driver.api import new_run
from tether.driver.progress import ProgressView
from tether.member.view import Here, MemberView, RunView, observe
from tether.store import Member

# A run's config as `tether launch --steps 30` stored it before the config was nested (9dab2e8).
STORED = {
    "run_id": "20261208-003823-24c1b8", "shards": 2, "workers": 2, "mode": "bsp",
    "staleness": 0, "model": "mlp:64", "dataset": "digits", "task": "", "overlap": False,
    "shared_memory": True, "steps": 30, "batch_size": 32, "optimizer": "adam", "lr": 0.01,
    "opt_args": {}, "schedule": "constant", "seed": 0, "device": "cpu", "stragglers": {},
    "wait_timeout_s": 60.0, "chunk_bytes": 2097152, "replication": "sync",
    "replicate_every": 50, "replicate_interval_ms": 100.0, "compaction_budget_ms": 250.0,
    "max_restarts": 3, "lease_s": 5.0, "probe_timeout_s": 10.0, "startup_timeout_s": 120.0,
    "num_params": 4810, "in_dim": 64, "num_classes": 10,
}  # fmt: skip

OWN_OPTIMIZER_TASK = """
import jax.numpy as jnp
import numpy as np
import optax


class Line:
    def init(self, key):
        return {"w": jnp.zeros((4,), jnp.float32)}

    def loss(self, params, batch):
        x, y = batch
        return jnp.mean((x @ params["w"] - y) ** 2)

    def batch(self, ctx, clock):
        rng = np.random.default_rng([ctx.seed, ctx.worker_id, clock])
        x = rng.standard_normal((8, 4)).astype(np.float32)
        return x, x.sum(axis=1)

    def optimizer(self):
        return optax.sgd(0.05)


task = Line()
"""


def test_the_types_carry_the_product_s_defaults() -> None:
    bsp = RunConfig(run_id="r")
    assert bsp.replication_policy.mode == "sync"  # BSP's bit-identity through faults needs it
    assert bsp.optimizer_config.name == "adam" and bsp.optimizer_config.lr == 0.01
    assert bsp.optimizer_config.horizon == bsp.steps  # one update per clock under BSP
    asp = RunConfig(run_id="r", consistency=Consistency(Mode.ASP), workers=3)
    assert asp.replication_policy.mode == "async"
    assert asp.optimizer_config.horizon == 3 * asp.steps  # one update per push
    assert RunConfig.of("r", mode="ssp", staleness=2).replication == "async"
    assert (
        RunConfig.of("r", optimizer="sgd").lr == 0.1 == RunConfig.of("r", optimizer="momentum").lr
    )
    assert RunConfig.of("r", replication="off").replication_policy.mode == "off"
    # The flat settings build the same value as the nested one.
    nested = RunConfig(
        run_id="r", workers=3, consistency=Consistency(Mode.SSP, 1),
        task_config=TaskConfig(model="logreg"), transport=Transport(overlap=True),
    )  # fmt: skip
    flat = RunConfig.of("r", workers=3, mode="ssp", staleness=1, model="logreg", overlap=True)
    assert nested == flat


def test_a_config_stored_before_loads_and_is_stored_again_unchanged() -> None:
    config = RunConfig.from_dict(json.loads(json.dumps(STORED)))
    assert config.to_dict() == STORED and list(config.to_dict()) == list(STORED)
    added_later = {"reject_grad_norm", "tls_cert", "tls_key", "tls_ca", "tls_server_name"}
    assert tuple(STORED) == tuple(k for k in SETTINGS if k not in added_later)
    assert config.consistency == Consistency(Mode.BSP, 0)
    assert config.replication_policy.interval_s == 0.1
    assert config.task_config.num_params == 4810 and config.num_params == 4810
    odd = RunConfig.of("r", replicate_interval_ms=33.3, compaction_budget_ms=0.7)
    assert (odd.to_dict()["replicate_interval_ms"], odd.compaction_budget_ms) == (33.3, 0.7)
    with pytest.raises(ValueError, match="unknown fields: colour"):
        RunConfig.from_dict({**STORED, "colour": "red"})


def test_new_run_resolves_the_task_and_refuses_a_bad_setting_before_anything_starts() -> None:
    config = new_run(model="logreg", steps=5)
    assert config.num_params == 64 * 10 + 10 and config.in_dim == 64
    assert config.replication == "sync" and config.lr == 0.01
    with pytest.raises(ValueError, match="unknown settings shardz"):
        new_run(shardz=2)
    with pytest.raises(ValueError, match="optimizer lamb is not elementwise"):
        new_run(model="logreg", optimizer="lamb")


def test_a_harness_gets_the_same_optimizer_check_as_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A chaos scenario and `tether bench train` refuse a reducing optimizer before any member
    starts, with the sentence `tether launch` gives, instead of failing in every shard."""
    scenario = tmp_path / "lamb.toml"
    scenario.write_text('[run]\nmodel = "logreg"\nsteps = 5\noptimizer = "lamb"\n')
    with pytest.raises(ValueError) as refused:
        run_scenario(load_scenario(scenario), tmp_path / "out", io.StringIO())
    assert not (tmp_path / "out" / "run").exists()
    bench = ["bench", "train", "--model", "logreg", "--dataset", "digits", "--optimizer", "lamb"]
    assert main([*bench, "--steps", "5", "--skip", "1"]) == 2
    launch = ["launch", "--model", "logreg", "--optimizer", "lamb"]
    assert main([*launch, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count(str(refused.value)) == 2  # bench train and launch say the same


def as_seen(members: list[Member]) -> RunView:
    """The run as read when the records were written (every heartbeat is fresh)."""
    views = [MemberView.of(m) for m in members]
    return observe(None, "r", views, LivenessPolicy(), now=0.0, here=Here("h", lambda pid: True))


def test_starting_workers_is_said_once(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(tether.driver.progress.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    worker = Member("r", "worker", 0, 1, "", 1, "h", 0.0, 0.0, "running",
                    {"clock": 3, "loss": 0.5, "samples_per_s": 100.0})  # fmt: skip
    with ProgressView(RunConfig(run_id="r", steps=10), out) as view:
        for t in (0.0, 2.0, 4.0, 6.0):  # the workers take a while to start
            now[0] = 100.0 + t
            view.update(as_seen([]))
        now[0] = 108.0
        view.update(as_seen([worker]))
    assert out.getvalue().splitlines() == [
        "tether: starting workers",
        "tether: w0 3/10 loss 0.500 100/s",
    ]


@pytest.mark.slow
def test_a_task_s_own_optimizer_is_what_the_run_reports(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "own_opt.py"
    path.write_text(OWN_OPTIMIZER_TASK)
    spec = f"{path}:task"
    summary = tether.launch(spec, shards=1, workers=1, steps=3, run_dir=tmp_path / "r")
    named = f"task optimizer (from {spec}.optimizer())"
    assert summary["optimizer"] == named
    assert summary["lr"] is None and summary["schedule"] is None and summary["opt_args"] == {}
    start = capfd.readouterr().err.splitlines()[0]
    assert named in start and "adam" not in start and "lr=" not in start

"""A user's task file, outside the package, trained by real shard and worker processes
(DESIGN §11): every consistency mode trains it, BSP is bit-identical across shard counts and
through killed members, and `tether.launch` from Python runs the same run as the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_task_api import USER_TASK

import tether
from helpers import REPO
from tether.config import RunConfig
from tether.tasks.api import TaskContext
from tether.tasks.build import resolve_config, runtime_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LINREG = f"{REPO}/examples/linear_regression.py:task"


@pytest.fixture
def task_spec(tmp_path: Path) -> str:
    path = tmp_path / "my_task.py"
    path.write_text(USER_TASK)
    return f"{path}:task"


def initial_loss(spec: str, batch_size: int) -> float:
    """The mean loss of worker 0's first batches at the initial parameters, in this process."""
    config = resolve_config(RunConfig.of("r", task=spec, batch_size=batch_size))
    runtime = runtime_of(config)
    flat = runtime.init_flat(config.seed)
    ctx = TaskContext(seed=0, worker_id=0, num_workers=2, batch_size=batch_size, steps=1)
    losses = [runtime.step(flat, runtime.task.batch(ctx, c)).loss for c in range(8)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize(
    "mode_args",
    [["--mode", "ssp", "--staleness", "2"], ["--mode", "asp"]],
    ids=["ssp2", "asp"],
)
def test_a_user_task_trains_under_ssp_and_asp(tether_cli, tmp_path, task_spec, mode_args) -> None:
    args = ["--task", task_spec, "--steps", "150", "--batch-size", "16", "--json"]
    summary = tether_cli("launch", *args, *mode_args, "--run-dir", str(tmp_path / "r")).json()
    assert summary["task"] == task_spec
    assert summary["updates_applied"] == 2 * 150  # every push applied on arrival
    assert summary["lost_updates"] == 0
    assert summary["final_loss"] < 0.5 * initial_loss(task_spec, 16)


def test_bsp_on_a_user_task_is_bit_identical_across_shards_and_kills(
    tether_cli, tmp_path, task_spec, watch
) -> None:
    # adamw with a warm-up cosine schedule on the shards (DESIGN §4): elementwise, so the shard
    # count changes nothing.
    args = ["--task", task_spec, "--steps", "150", "--batch-size", "16", "--json", "--seed", "4",
            "--optimizer", "adamw", "--opt", "weight_decay=0.01", "--lr", "0.01",
            "--schedule", "warmup_cosine:warmup=20"]  # fmt: skip
    runs = {
        s: tether_cli("launch", *args, "--shards", str(s), "--run-dir", str(tmp_path / f"s{s}"))
        for s in (1, 2, 3)
    }
    sha = {s: p.json()["params_sha256"] for s, p in runs.items()}
    assert sha[1] == sha[2] == sha[3], sha
    # A shard and a worker killed mid-run, sync replication: the same bits again (DESIGN §5).
    run_dir = tmp_path / "faulty"
    launch = tether_cli(
        "launch", *args, "--shards", "2", "--straggler", "0:10", "--run-dir", str(run_dir)
    )
    w = watch(run_dir)
    w.kill_at(30, "server", 1)
    w.kill_at(80, "worker", 0)
    faulty = launch.json()
    assert faulty["restarts"] == {"server": 1, "worker": 1}
    assert faulty["lost_updates"] == 0 and faulty["updates_applied"] == 150
    assert faulty["params_sha256"] == sha[1]
    assert runs[1].json()["final_loss"] < 0.5 * initial_loss(task_spec, 16)


def test_a_task_s_own_optimizer_runs_on_the_shards(tmp_path) -> None:
    path = tmp_path / "own_opt.py"
    path.write_text(
        USER_TASK
        + "\nimport optax\n\nclass WithOpt(TwoLayer):\n"
        + "    def optimizer(self):\n"
        + "        return optax.chain(optax.scale_by_rms(), optax.scale(-0.3))\n"
        + "\nwith_opt = WithOpt()\n"
    )
    spec = f"{path}:with_opt"
    settings = dict(shards=1, workers=2, steps=30, batch_size=16, seed=1, optimizer="sgd", lr=0.1)
    own = tether.launch(spec, run_dir=tmp_path / "own", **settings)
    named = tether.launch(f"{path}:task", run_dir=tmp_path / "named", **settings)
    # The task's transformation, not --optimizer sgd, ran: a different result, and 2 shards
    # give the same bits as 1.
    assert own["params_sha256"] != named["params_sha256"]
    two = tether.launch(spec, run_dir=tmp_path / "own2", **{**settings, "shards": 2})
    assert two["params_sha256"] == own["params_sha256"]


def test_tether_launch_from_python_is_the_cli_run(tether_cli, tmp_path) -> None:
    settings = dict(shards=2, workers=2, steps=60, optimizer="sgd", lr=0.1, seed=2)
    summary = tether.launch(LINREG, run_dir=tmp_path / "py", **settings)
    assert summary["evaluation"]["weight_error"] < 0.1  # it learned the true line
    assert summary["final_loss"] == summary["evaluation"]["loss"]
    cli_args = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    cli = tether_cli("launch", "--task", LINREG, *cli_args, "--json", "--run-dir", "cli").json()
    assert cli["params_sha256"] == summary["params_sha256"]


def test_the_readme_s_task_trains_as_written(tether_cli, tmp_path) -> None:
    """The task in README.md's "Your model" section, copied as a new user would."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("```python\n# my_task.py\n") + len("```python\n")
    (tmp_path / "my_task.py").write_text(readme[start : readme.index("```", start)])
    args = ["--task", "my_task.py:task", "--optimizer", "sgd", "--lr", "0.1", "--steps", "60"]
    summary = tether_cli("launch", *args, "--json", "--run-dir", "r").json()
    # w starts at 0, where the README's evaluate gives 1.0; the data's true w is all ones.
    assert summary["final_loss"] == summary["evaluation"]["loss"] < 0.01


def test_overlap_keeps_the_bound_and_loses_nothing_through_a_killed_shard(
    tether_cli, tmp_path, task_spec, watch
) -> None:
    """--overlap: the push of clock c is in flight while c+1 is pulled; a shard killed then is
    replaced, the in-flight push's failure is redone, the bound holds and (sync) nothing
    acknowledged is lost."""
    run_dir = tmp_path / "r"
    args = ["--task", task_spec, "--mode", "ssp", "--staleness", "1", "--overlap", "--json",
            "--steps", "150", "--batch-size", "16", "--replication", "sync",
            "--straggler", "0:5", "--run-dir", str(run_dir)]  # fmt: skip
    launch = tether_cli("launch", *args)
    watch(run_dir).kill_at(40, "server", 1)
    summary = launch.json()
    assert summary["restarts"] == {"server": 1, "worker": 0}
    assert summary["max_clock_gap"] <= 1
    assert summary["lost_updates"] == 0 and summary["ledger"]["ok"]
    assert summary["updates_applied"] == 2 * 150
    assert summary["final_loss"] < 0.5 * initial_loss(task_spec, 16)


def test_an_overlapped_run_serves_each_pull_once(tether_cli, tmp_path, task_spec) -> None:
    """Without faults, an overlapped pull is admitted at once (one clock ahead of the pushes
    received), never refused and redone: exactly one served pull per worker, shard and clock."""
    args = ["--task", task_spec, "--mode", "asp", "--overlap", "--steps", "100", "--json"]
    summary = tether_cli("launch", *args, "--run-dir", str(tmp_path / "r")).json()
    assert sum(summary["clock_gap_hist"]) == 2 * 2 * 100
    assert summary["updates_applied"] == 2 * 100

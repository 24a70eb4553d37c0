"""Consistency experiments end to end: real sweeps, stored documents, reports (DESIGN §8).

Every run of a sweep is a real multi-process run. The stored documents alone must reproduce
the report, and the figures must show what the store holds.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tether.config import RunConfig
from tether.consistency.experiments.plots import read_png_data
from tether.consistency.experiments.report import FIGURES
from tether.store import open_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def independent_loss_curve(store, run_id):
    """Seconds since the first iteration began, and the evaluated loss, from raw metric rows."""
    rows = store.metrics(run_id)
    start = min(r.t - r.values["step_s"] for r in rows if r.source.startswith("worker:"))
    evals = sorted((r for r in rows if r.source == "eval"), key=lambda r: r.step)
    return [max(0.0, r.t - start) for r in evals], [r.values["loss"] for r in evals]


def test_an_experiment_keeps_everything_in_the_store_and_rerenders_from_it(tether_cli, tmp_path):
    uri = f"sqlite:///{tmp_path / 'experiments.db'}"
    out = tmp_path / "out"
    result = tether_cli(
        "experiment", "consistency", "--modes", "bsp,ssp:2", "--seeds", "2", "--steps", "30",
        "--workers", "2", "--straggler", "none", "--straggler", "1:20", "--store", uri,
        "--out", str(out), "--json",
    ).json(timeout_s=400)  # fmt: skip
    exp_id = result["experiment_id"]
    assert len(result["runs"]) == 2 * 2 * 2 and result["failed"] == []
    with open_store(uri) as store:
        exp = store.get_run(exp_id)
        assert exp.finished and exp.meta["kind"] == "experiment" and exp.meta["status"] == "done"
        assert exp.meta["runs"] == result["runs"]
        assert len(exp.meta["git_commit"]) == 40 and exp.meta["packages"]["jax"]
        stored = {a.name for a in store.artifacts(exp_id)}
        assert {"report.md", "figures.json", *FIGURES} <= stored
        assert (
            store.get_artifact(exp_id, "loss_vs_time.png")
            == (out / "loss_vs_time.png").read_bytes()
        )
        drawn = read_png_data(out / "loss_vs_time.png")
        points = set()
        for run_id in result["runs"]:
            record = store.get_run(run_id)
            config = RunConfig.from_dict(record.config)  # the resolved config, as run
            assert record.finished and record.meta["experiment"] == exp_id
            assert record.meta["status"] == "finished" and record.meta["git_commit"]
            point = record.meta["point"]
            points.add((point["mode"], str(point["straggler"]), point["seed"]))
            assert config.seed == point["seed"] and config.steps == 30
            rows = store.metrics(run_id)
            for w in range(2):
                steps = [r.step for r in rows if r.source == f"worker:{w}"]
                assert steps == list(range(30)), (run_id, w, steps)
            # Each step's time holds its pull's and its push's (acknowledged by every shard).
            timed = [r.values for r in rows if r.source.startswith("worker:")]
            assert all(0 < v["push_s"] and v["pull_s"] + v["push_s"] <= v["step_s"] for v in timed)
            # The figure shows this run's stored loss curve, exactly.
            condition = "straggler" if config.stragglers else "no straggler"
            mode = point["mode"]
            xs, ys = independent_loss_curve(store, run_id)
            line = drawn[f"{condition}|{mode}|{config.seed}"]
            assert len(xs) >= 3 and line["x"] == pytest.approx(xs) and line["y"] == ys
        assert len(points) == 8
        figures = json.loads(store.get_artifact(exp_id, "figures.json"))

    # The stored documents alone reproduce the report.
    shutil.rmtree(out)
    again = tmp_path / "again"
    rerendered = tether_cli(
        "experiment", "report", exp_id, "--store", uri, "--out", str(again), "--json"
    ).json()
    assert sorted(rerendered["runs"]) == sorted(result["runs"])
    assert json.loads((again / "figures.json").read_text()) == figures
    for name in FIGURES:
        assert read_png_data(again / name) == figures[name]
    assert rerendered["findings"] == json.loads(json.dumps(result["findings"]))

    listed = tether_cli("experiment", "list", "--store", uri, "--json").json()
    assert [e["id"] for e in listed["experiments"]] == [exp_id]
    assert listed["experiments"][0]["runs"] == 8
    shown = tether_cli("experiment", "show", exp_id, "--store", uri, "--json").json()
    assert shown["kind"] == "experiment" and len(shown["runs"]) == 8
    one = tether_cli("experiment", "show", result["runs"][0], "--store", uri, "--json").json()
    assert one["kind"] == "run" and one["metrics"]["worker:0"] == 30 and one["metrics"]["eval"]


def test_quick_shows_the_straggler_effect(tether_cli, tmp_path):
    """--quick: with one worker several times slower, SSP reaches the target loss before BSP.
    (The straggler condition only: the one the claim is about, in half the time.)"""
    uri = f"sqlite:///{tmp_path / 'experiments.db'}"
    result = tether_cli(
        "experiment", "consistency", "--quick", "--straggler", "0:30", "--store", uri,
        "--out", str(tmp_path / "q"), "--json",
    ).json(timeout_s=560)  # fmt: skip
    groups = {(g["condition"], g["mode"]): g for g in result["findings"]["groups"]}
    assert len(result["runs"]) == 12 and result["failed"] == []
    slow = {mode: groups[("straggler", mode)] for mode in ("bsp", "ssp:1", "ssp:4", "asp")}
    assert all(g["reached"] == 3 for g in slow.values()), slow
    assert all(min(g["straggler_slowdown"]) >= 3 for g in slow.values())
    for mode in ("ssp:1", "ssp:4"):
        assert slow[mode]["time_to_target_mean_s"] < slow["bsp"]["time_to_target_mean_s"], slow
    assert slow["ssp:1"]["max_clock_gap"] <= 1 and slow["ssp:4"]["max_clock_gap"] <= 4
    report = (tmp_path / "q" / "report.md").read_text()
    assert "straggler, time to target (mean over seeds), fastest first:" in report

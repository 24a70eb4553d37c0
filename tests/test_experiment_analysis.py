"""Consistency experiments as data: sweep plans, analysis and rendered figures (DESIGN §8).

Pure tier: runs are built from metric rows as the store returns them, so the figures can be
checked against exactly what they were given.
"""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest

from tether.consistency.experiments.analysis import (
    RunData,
    default_target,
    group,
    loss_at_updates,
    loss_curve,
    mean_staleness,
    run_start,
    spread,
    straggler_slowdown,
    time_to_target,
    worker_wait,
)
from tether.consistency.experiments.plots import read_png_data
from tether.consistency.experiments.report import FIGURES, render
from tether.consistency.experiments.sweep import (
    ExperimentSpec,
    parse_modes,
    parse_stragglers,
    plan,
    run_config,
)
from tether.store import MetricRow


def test_parse_modes_and_stragglers():
    assert parse_modes("bsp,ssp:1,ssp:4,asp") == (("bsp", 0), ("ssp", 1), ("ssp", 4), ("asp", 0))
    for bad, message in [
        ("ssp", "ssp needs a staleness"),
        ("bsp:2", "only ssp takes a staleness"),
        ("bsp,bsp", "repeats a mode"),
        ("fast", "mode"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_modes(bad)
    assert parse_stragglers(["none", "0:20"]) == (None, (0, 20))
    with pytest.raises(ValueError, match="ID:MS"):
        parse_stragglers(["slow"])


def test_the_plan_covers_every_point_with_seeds_outermost():
    spec = ExperimentSpec(modes=parse_modes("bsp,asp"), workers=(2, 3), seeds=2)
    points = plan(spec)
    assert len(points) == 2 * 2 * 2 * 2
    assert [p.seed for p in points] == [0] * 8 + [1] * 8
    assert len({(p.mode, p.workers, p.straggler, p.seed) for p in points}) == 16
    config = run_config(spec, points[3])
    assert config.workers == points[3].workers and config.seed == 0
    assert config.stragglers == ({} if points[3].straggler is None else {0: 30})


def test_a_bad_spec_is_refused():
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        ExperimentSpec(seeds=0)
    with pytest.raises(ValueError, match="names no worker"):
        ExperimentSpec(workers=(2,), stragglers=((5, 10),))
    with pytest.raises(ValueError, match="--target-loss"):
        ExperimentSpec(target_loss=-1.0)


def fake_run(run_id, mode, staleness, seed, straggler, losses, step_s=0.01, slow_s=0.05):
    """A run whose eval losses arrive every 0.1 s, one update each, after 3 worker steps."""
    t0 = 1000.0 + seed
    rows = []
    for w in range(2):
        for step in range(3):
            s = slow_s if (straggler and w == 0) else step_s
            rows.append(
                MetricRow(
                    f"worker:{w}",
                    step,
                    t0 + (step + 1) * s,
                    {
                        "loss": 1.0,
                        "step_s": s,
                        "pull_s": 0.001 * (w + 1),
                        "clock_gap": 0.0,
                    },
                )  # fmt: skip
            )
    for k, loss in enumerate(losses):
        rows.append(
            MetricRow("eval", k, t0 + 0.1 * k, {"loss": loss, "accuracy": 0.5,
                                               "updates": float(k), "gradients": float(k)})
        )  # fmt: skip
    config = {
        "mode": mode, "staleness": staleness, "seed": seed, "model": "mlp:64",
        "dataset": "digits", "workers": 2, "shards": 1, "steps": 3, "batch_size": 8,
        "optimizer": "sgd", "lr": 0.1, "stragglers": {"0": 40} if straggler else {},
    }  # fmt: skip
    summary = {
        "samples_per_s": 100.0 + seed, "final_loss": losses[-1], "test_accuracy": 0.9,
        "max_clock_gap": staleness, "clock_gap_hist": [3, 1], "version_staleness_hist": [2, 2],
        "wall_s": 1.0,
    }  # fmt: skip
    return RunData(run_id, config, {"point": {}}, summary, tuple(rows))


def test_analysis_of_one_run():
    run = fake_run("r", "ssp", 1, 0, True, [2.0, 1.5, 0.9, 0.5])
    assert run.label == "ssp:1" and run.condition == "straggler"
    assert run_start(run) == pytest.approx(1000.0)
    xs, ys = loss_curve(run)
    assert xs == pytest.approx([0.0, 0.1, 0.2, 0.3]) and ys == [2.0, 1.5, 0.9, 0.5]
    assert loss_curve(run, "updates")[0] == [0.0, 1.0, 2.0, 3.0]
    assert time_to_target(run, 1.0) == pytest.approx(0.2)
    assert time_to_target(run, 0.1) is None
    assert loss_at_updates(run, 2) == 0.9
    assert worker_wait(run) == {0: pytest.approx(0.003), 1: pytest.approx(0.006)}
    # Worker 0's compute is 0.05-0.001 s against 0.01-0.002 s for worker 1.
    assert straggler_slowdown(run) == pytest.approx(0.049 / 0.008)
    assert straggler_slowdown(fake_run("q", "bsp", 0, 0, False, [1.0])) is None


def test_spread_and_grouping():
    s = spread([1.0, None, 3.0])
    assert (s.mean, s.low, s.high, s.n, s.of) == (2.0, 1.0, 3.0, 2, 3)
    assert s.describe(" s", 1) == "2.0 s (1.0–3.0) [2/3]"
    assert math.isnan(spread([None]).mean) and spread([None]).describe() == "—"
    runs = [
        fake_run("a", "asp", 0, 1, False, [1.0]),
        fake_run("b", "bsp", 0, 0, False, [1.0]),
        fake_run("c", "ssp", 4, 0, False, [1.0]),
        fake_run("d", "ssp", 1, 0, False, [1.0]),
        fake_run("e", "bsp", 0, 1, True, [1.0]),
    ]
    keys = list(group(runs))
    assert keys == [
        ("no straggler", "bsp"), ("no straggler", "ssp:1"), ("no straggler", "ssp:4"),
        ("no straggler", "asp"), ("straggler", "bsp"),
    ]  # fmt: skip
    assert default_target(runs) == pytest.approx(1.1)


@pytest.fixture
def runs():
    out = []
    for seed in range(2):
        for straggler in (False, True):
            for mode, s, losses in [
                ("bsp", 0, [2.0, 1.8, 1.2, 0.9, 0.8]),
                ("ssp", 2, [2.0, 1.2, 0.7, 0.5, 0.45]),
                ("asp", 0, [2.0, 1.0, 0.8, 0.6, 0.5]),
            ]:
                shift = 0.05 * seed + (0.2 if straggler and mode == "bsp" else 0.0)
                out.append(
                    fake_run(
                        f"{mode}{s}-{seed}-{straggler}",
                        mode,
                        s,
                        seed,
                        straggler,
                        [v + shift for v in losses],
                    )  # fmt: skip
                )
    return out


def test_the_figures_draw_exactly_the_runs_data(runs, tmp_path):
    findings = render(runs, tmp_path, target=1.0, title="t")
    assert findings["target_loss"] == 1.0
    on_disk = json.loads((tmp_path / "figures.json").read_text())
    assert set(on_disk) == set(FIGURES)
    for name in FIGURES:
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image[..., :3].std() > 0.01
        assert read_png_data(tmp_path / name) == on_disk[name]  # the image carries its data
    lines = on_disk["loss_vs_time.png"]
    for run in runs:
        xs, ys = loss_curve(run)
        drawn = lines[f"{run.condition}|{run.label}|{run.seed}"]
        assert drawn["x"] == pytest.approx(xs) and drawn["y"] == pytest.approx(ys)
        assert on_disk["loss_vs_updates.png"][f"{run.condition}|{run.label}|{run.seed}"][
            "x"
        ] == pytest.approx(loss_curve(run, "updates")[0])
    bars = on_disk["time_to_target.png"]
    for (cond, label), members in group(runs).items():
        expected = spread([time_to_target(r, 1.0) for r in members]).mean
        assert bars[f"{cond}|{label}"]["height"] == pytest.approx(expected)
        tput = sum(r.summary["samples_per_s"] for r in members) / len(members)
        assert on_disk["throughput.png"][f"{cond}|{label}"]["height"] == pytest.approx(tput)
        wait0 = sum(worker_wait(r)[0] for r in members) / len(members)
        assert on_disk["worker_wait.png"][f"{cond}|{label}|0"]["height"] == pytest.approx(wait0)
    dots = on_disk["progress_vs_staleness.png"]
    mark = findings["updates_mark"]
    for run in runs:
        key = f"{run.condition}|{run.label}|{run.seed}"
        if run.label == "bsp" or run.condition == "straggler":
            assert key not in dots
        else:  # one dot per run: (measured mean staleness, loss after `mark` updates)
            assert dots[key] == {"x": [mean_staleness(run)], "y": [loss_at_updates(run, mark)]}
    gap = on_disk["clock_gap.png"]["straggler|ssp:2"]
    assert gap["x"] == [0.0, 1.0] and gap["y"] == pytest.approx([0.75, 0.25])
    text = (tmp_path / "report.md").read_text()
    assert all(f"]({name})" in text for name in FIGURES)
    # asp reaches 1.0 at 0.1 s (seed 0) and 0.2 s (seed 1), ssp:2 at 0.2 s; the straggler's
    # bsp runs are shifted up by 0.2, so seed 1's never gets there.
    assert (
        "- straggler, time to target (mean over seeds), fastest first: asp 0.15 s, ssp:2 0.20 s,"
        " bsp 0.40 s.\n  Not every seed reached the target with: bsp." in text
    )


def test_a_report_needs_runs(tmp_path):
    with pytest.raises(ValueError, match="no runs"):
        render([], tmp_path)


def test_staleness_effect_fits_the_loss_per_update_against_staleness():
    from dataclasses import replace

    from tether.consistency.experiments.analysis import staleness_effect

    def with_staleness(run, hist):
        return replace(run, summary=dict(run.summary, version_staleness_hist=hist))

    low = with_staleness(fake_run("a", "asp", 0, 0, False, [2.0, 1.0, 0.5]), [0, 4])  # 1.0
    high = with_staleness(fake_run("b", "asp", 0, 1, False, [2.0, 1.5, 1.1]), [0, 0, 0, 4])  # 3.0
    bsp = fake_run("c", "bsp", 0, 0, False, [2.0, 0.1, 0.1])  # not one gradient per update
    slow = with_staleness(fake_run("d", "ssp", 1, 0, True, [2.0, 2.0, 2.0]), [4])  # a straggler
    effect = staleness_effect([low, high, bsp, slow], updates=2)
    assert effect["points"] == [(1.0, 0.5), (3.0, 1.1)]
    assert effect["slope"] == pytest.approx(0.3)
    assert staleness_effect([low], updates=2)["slope"] is None

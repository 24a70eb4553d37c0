"""The examples in examples/ train through `tether launch --task`, as their docstrings say
(DESIGN §11): short runs of each, checked for what shows the example works."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from helpers import REPO
from tether.config import RunConfig
from tether.tasks.build import context_of, resolve_config, runtime_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLES = REPO / "examples"


def launch(tether_cli, run_dir: Path, example: str, *args: str) -> dict:
    spec = f"{EXAMPLES / example}:task"
    summary = tether_cli("launch", "--task", spec, *args, "--json", "--run-dir", str(run_dir))
    out = summary.json()
    assert out["task"] == spec
    assert out["lost_updates"] == 0
    return out


def load_file(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_linear_regression_learns_the_true_line(tether_cli, tmp_path) -> None:
    summary = launch(
        tether_cli, tmp_path / "r", "linear_regression.py", "--optimizer", "sgd", "--lr", "0.1",
        "--steps", "60",
    )  # fmt: skip
    # The parameters start at 0 and w_true reaches +-1: an error of 0.05 means it learned.
    assert summary["evaluation"]["weight_error"] < 0.05
    assert summary["final_loss"] < 0.011  # the noise floor is 0.01


def test_the_flax_cnn_classifies_digits(tether_cli, tmp_path) -> None:
    pytest.importorskip("flax", reason="the CNN example needs flax: pip install -e '.[examples]'")
    summary = launch(
        tether_cli, tmp_path / "r", "flax_cnn_digits.py", "--optimizer", "adam", "--lr", "3e-3",
        "--steps", "100",
    )  # fmt: skip
    assert summary["num_params"] > 10_000  # the Flax params tree, flattened
    assert summary["test_accuracy"] == summary["evaluation"]["accuracy"] >= 0.9
    assert summary["evaluation"]["train_accuracy"] >= 0.9


@pytest.mark.parametrize(
    "mode_args", [["--mode", "bsp"], ["--mode", "ssp", "--staleness", "2"]], ids=["bsp", "ssp2"]
)
def test_the_char_transformer_learns_python_source(tether_cli, tmp_path, mode_args) -> None:
    spec = f"{EXAMPLES / 'char_transformer.py'}:task"
    config = resolve_config(RunConfig.of("r", task=spec, batch_size=16))
    runtime = runtime_of(config)
    initial = runtime.evaluate(runtime.init_flat(config.seed), context_of(config, "driver"))["loss"]
    assert abs(initial - math.log(256)) < 0.05  # near-uniform over the byte vocabulary
    # What a model that ignores context gets: the held-out text under the training text's byte
    # frequencies. Below it, the model uses its context.
    train, held_out = load_file("char_transformer").corpus()
    freq = np.bincount(train, minlength=256) + 0.5
    unigram = float(-np.mean(np.log(freq[held_out] / freq.sum())))

    steps = 100
    args = ["--optimizer", "adam", "--lr", "3e-3", "--steps", str(steps), "--batch-size", "16"]
    summary = launch(tether_cli, tmp_path / "r", "char_transformer.py", *args, *mode_args)
    final = summary["final_loss"]
    assert final == summary["evaluation"]["loss"]
    assert summary["evaluation"]["bits_per_char"] == pytest.approx(final / math.log(2))
    assert final < 0.6 * initial and final < unigram, (initial, unigram, final)
    assert summary["max_clock_gap"] <= (2 if "ssp" in mode_args else 0)

    # The per-step worker losses the plot script draws, read back from the run's store.
    losses = load_file("plot_transformer").worker_losses(summary)
    assert sorted(losses) == ["worker:0", "worker:1"]
    for clocks, values in losses.values():
        assert clocks.tolist() == list(range(steps))
        assert values[0] == pytest.approx(initial, abs=0.1)
        assert np.mean(values[-10:]) < 0.6 * values[0]

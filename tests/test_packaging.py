"""Packaging: generated code is current, and both install kinds import under `tether.*`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["tether", "tether.proto", "tether.server", "tether.worker", "tether.consistency",
            "tether.chaos", "tether.store"]  # fmt: skip


def test_generated_protobuf_code_is_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stale_generated_code_is_detected(tmp_path):
    # Run the checker on a copy of the repository whose .proto gained a field.
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "proto", copy / "proto")
    shutil.copytree(REPO / "scripts", copy / "scripts")
    proto = copy / "proto" / "ps.proto"
    proto.write_text(
        proto.read_text().replace("bool observer = 5;", "bool observer = 5;\n  int32 x = 99;")
    )
    proc = subprocess.run(
        [sys.executable, str(copy / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "stale generated code: ps_pb2.py" in proc.stdout


def _import_locations(extra_path: list[str]) -> dict[str, str]:
    code = (
        "import importlib, json, sys\n"
        f"print(json.dumps({{n: importlib.import_module(n).__file__ for n in {PACKAGES!r}}}))"
    )
    env_path = ":".join(extra_path)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import json

    return json.loads(proc.stdout)


def test_the_development_install_imports_every_package_from_the_repository():
    locations = _import_locations([])
    assert locations["tether.server"] == str(REPO / "server" / "__init__.py")
    assert locations["tether.proto"] == str(REPO / "proto" / "__init__.py")
    assert locations["tether.store"] == str(REPO / "tether" / "store" / "__init__.py")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_regular_install_imports_every_package_from_site_packages(tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "--quiet", "--target", str(target), str(REPO)],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    locations = _import_locations([str(target)])
    for name in PACKAGES:
        assert locations[name].startswith(str(target)), (name, locations[name])
    # No bare top-level `server`, `worker`, `proto`... packages leak into site-packages.
    top = {p.name for p in target.iterdir() if p.is_dir() and not p.name.endswith(".dist-info")}
    assert top - {"bin"} == {"tether"}
    assert (target / "tether" / "proto" / "ps.proto").exists()
    # `tether chaos run --all` finds the shipped scenarios in an installed copy too.
    assert (target / "tether" / "chaos" / "scenarios" / "shard-kill.toml").exists()


def test_the_command_line_and_a_restored_shard_start_without_jax() -> None:
    """JAX takes about a second to import: `tether --help`, and a shard that restores its state
    with a numpy optimizer rule (the recovery path), must not pay it (DESIGN §5: recovery time)."""
    code = (
        "import sys\n"
        "import tether.cli.main, tether.server.main\n"
        "from tether.config import OptimizerConfig\n"
        "from tether.server.optim import Optimizer\n"
        "Optimizer(OptimizerConfig('adam', lr=0.01), 10)\n"
        "print(sorted(m for m in ('jax', 'optax') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_optional_dependencies_stay_optional() -> None:
    """scikit-learn (only the tests compare the shipped digits with it), toxiproxy-python (only
    the tests drive the proxy with it) and matplotlib (only the reports draw) are not core
    dependencies, and the members, the driver, the harnesses and the digits import none."""
    with (REPO / "pyproject.toml").open("rb") as fh:
        project = tomllib.load(fh)["project"]
    core = " ".join(project["dependencies"])
    assert [n for n in ("scikit-learn", "toxiproxy-python", "matplotlib") if n in core] == []
    assert project["optional-dependencies"]["plot"] == ["matplotlib>=3.8"]
    code = (
        "import sys\n"
        "import tether.cli.main, tether.server.main, tether.worker.loop, tether.driver.launcher\n"
        "import tether.chaos.runner, tether.chaos.soak, tether.consistency.experiments.report\n"
        "from tether.data import load_dataset\n"
        "load_dataset('digits')\n"
        "print(sorted(m for m in ('sklearn', 'toxiproxy', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_figure_without_matplotlib_names_the_extra(monkeypatch, capsys) -> None:
    from tether import plotting
    from tether.cli.main import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    hint = "needs matplotlib, which is not installed: pip install 'tether-ps[plot]'"
    assert plotting.missing("a figure") == f"a figure {hint}"
    with pytest.raises(plotting.PlotUnavailable, match="tether-ps\\[plot\\]"):
        plotting.pyplot()
    # `tether chaos run` says so before any run starts.
    assert main(["chaos", "run", "shard-kill"]) == 2
    assert capsys.readouterr().err.strip() == f"tether chaos run: the report's figures {hint}"

"""`tether launch --engine slurm` inside an allocation of a three-node Slurm on loopback addresses
(DESIGN §12): members run as job steps on the allocation's nodes; when a node is lost, its
members are relaunched as new steps on the nodes left and the run ends with the parameters of
the same run under `--engine local`, bit for bit (BSP, sync replication)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import RunWatch, wait_until
from tether.devtools.slurm_cluster import LoopbackSlurm, available, node_address
from tether.store import open_store

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(available() is not None, reason=str(available())),
]
FLAGS = ["--steps", "150", "--replication", "sync", "--seed", "2"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackSlurm]:
    with LoopbackSlurm(tmp_path_factory.mktemp("slurm"), nodes=3) as cluster:
        yield cluster


@pytest.fixture
def in_allocation(slurm: LoopbackSlurm) -> Iterator:
    """Start `salloc ... tether ARGS` in its own process group; teardown kills and reaps it."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        # --no-kill: a node's failure must not end the allocation (the driver replaces its steps)
        cmd = ["salloc", "--nodes=3", "--exclusive", "--no-kill", "--quiet",
               sys.executable, "-m", "tether", *args]  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**slurm.env, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
        )  # fmt: skip
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)


def _local_sha(tmp_path: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "tether", "launch", *FLAGS, "--run-dir", str(tmp_path / "local"),
         "--json"],
        capture_output=True, text=True, timeout=600, start_new_session=True, check=True,
    ).stdout  # fmt: skip
    return str(json.loads(out.strip().splitlines()[-1])["params_sha256"])


def test_a_lost_node_s_members_are_relaunched_as_steps_on_other_nodes(
    slurm: LoopbackSlurm, in_allocation, tmp_path: Path
):
    run_dir = tmp_path / "run"
    launch = in_allocation(
        "launch", "--engine", "slurm", *FLAGS, "--run-dir", str(run_dir), "--json"
    )
    watch = RunWatch(run_dir)
    try:
        wait_until(lambda: watch.min_clock() >= 30, 300, "both workers at clock 30")
        placed = {(m.role, m.member_id): m.address for m in watch.members() if m.address}
    finally:
        watch.close()
    names = {node_address(i): name for i, name in enumerate(slurm.node_names)}
    assert len({a.rsplit(":", 1)[0] for a in placed.values()}) >= 2  # spread over nodes
    ip = placed[("server", 0)].rsplit(":", 1)[0]
    node = names[ip]
    on_node = sorted(k for k, address in placed.items() if address.startswith(f"{ip}:"))
    lost_at = time.time()
    slurm.kill_node(node)
    out, err = launch.communicate(timeout=600)
    assert launch.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])

    assert summary["params_sha256"] == _local_sha(tmp_path)  # as under --engine local
    assert summary["lost_updates"] == 0 and summary["ledger"]["ok"]
    exits = [e for e in summary["events"] if e["kind"] == "exit" and "cause" in e]
    assert sorted((e["role"], e["id"]) for e in exits) == on_node
    assert {e["cause"] for e in exits} == {"node_lost"}, exits
    recovered = {(r["role"], r["id"]): r for r in summary["recoveries"]}
    assert set(recovered) == set(on_node)
    assert all(f"node {node} is DOWN" in r["detail"] for r in recovered.values())
    for role in ("server", "worker"):
        assert summary["restarts"][role] == sum(1 for r, _ in on_node if r == role)
    relaunched = [e for e in summary["events"] if e["kind"] == "start" and e["t"] > lost_at]
    assert relaunched and all(f"on node {node}" not in e["where"] for e in relaunched)
    with open_store(f"sqlite:///{run_dir / 'tether.db'}") as store:
        final = {(m.role, m.member_id): m.address for m in store.members(summary["run_id"])}
    for key in on_node:
        assert not final[key].startswith(f"{ip}:")  # its new step is on another node
    serving = [round(e["t"] - lost_at, 2) for e in summary["events"] if e["kind"] == "serving"]
    print(f"\nnode {node} lost with {on_node}: serving again {serving}s after the loss")

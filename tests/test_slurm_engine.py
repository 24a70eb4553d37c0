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

from helpers import RunWatch
from tether.devtools.slurm import LoopbackSlurm, available, node_address
from tether.driver.slurm_engine import SlurmSpawner
from tether.driver.spawner import MemberSpec
from tether.store import open_store

needs_slurm = pytest.mark.skipif(available() is not None, reason=str(available()))
FLAGS = ["--steps", "150", "--replication", "sync", "--seed", "2"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackSlurm]:
    # The controller notices a lost node by itself, within seconds (the defaults take minutes).
    cluster = LoopbackSlurm(
        tmp_path_factory.mktemp("slurm"), nodes=3, slurmd_timeout_s=2, message_timeout_s=3
    )
    with cluster:
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
    # salloc runs its command in a process group of its own, which outlives a killed salloc
    slurm.kill_jobs()
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


class _Step:
    """A stand-in for a started step: where it was placed, and whether its srun still runs."""

    def __init__(self, node: str, running: bool = True) -> None:
        self.node = node
        self.proc = self
        self.running = running

    def poll(self) -> int | None:
        return None if self.running else 0


def test_each_step_goes_to_the_live_node_with_the_fewest_running_members(tmp_path: Path):
    spawner = SlurmSpawner(tmp_path, gpu_workers=False, nodes=["n1", "n2", "n3"])
    assert spawner.place() == "n1"  # ties: the allocation's order
    spawner.handles = [_Step("n1"), _Step("n1"), _Step("n2"), _Step("n3", running=False)]
    assert spawner.place() == "n3"  # a step that has ended holds nothing
    spawner.exclude("n3")  # lost
    assert spawner.place() == "n2"
    spec = MemberSpec("server", 0, "sqlite:///x.db", "r1")
    cmd = spawner.srun_command(spec, "n2")
    assert "--nodelist=n2" in cmd and not any(c.startswith("--exclude") for c in cmd)
    spawner.exclude("n1"), spawner.exclude("n2")
    assert spawner.place() is None  # nothing left to choose: Slurm decides, told what is lost
    assert "--exclude=n1,n2,n3" in spawner.srun_command(spec, None)


@pytest.mark.slow
@pytest.mark.timeout(900)
@needs_slurm
def test_a_lost_node_s_members_are_relaunched_as_steps_on_other_nodes(
    slurm: LoopbackSlurm, in_allocation, tmp_path: Path
):
    run_dir = tmp_path / "run"
    launch = in_allocation(
        "launch", "--engine", "slurm", *FLAGS, "--run-dir", str(run_dir), "--json"
    )
    watch = RunWatch(run_dir)
    try:
        placed = watch.addresses_at(30)
    finally:
        watch.close()
    names = {node_address(i): name for i, name in enumerate(slurm.node_names)}
    # four members on three nodes: the driver places each step on the least busy node
    assert len({a.rsplit(":", 1)[0] for a in placed.values()}) == 3
    ip = placed[("server", 0)].rsplit(":", 1)[0]
    node = names[ip]
    on_node = sorted(k for k, address in placed.items() if address.startswith(f"{ip}:"))
    lost_at = time.time()
    slurm.kill_node(node, mark_down=False, wait_down=False)  # as at a power cut
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
    # ... the least busy one: the two nodes left hold two members each (Slurm alone would
    # have piled both new steps onto the first node left)
    hosts = [
        address.rsplit(":", 1)[0] for (role, _), address in final.items() if role != "launcher"
    ]
    assert sorted(hosts.count(h) for h in set(hosts)) == [2, 2]
    serving = [round(e["t"] - lost_at, 2) for e in summary["events"] if e["kind"] == "serving"]
    print(f"\nnode {node} lost with {on_node}: serving again {serving}s after the loss")

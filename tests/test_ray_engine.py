"""`tether launch --engine ray` on a Ray cluster of three nodes on loopback addresses (DESIGN §12):
a run survives the loss of the node holding shard 0 (removed, or its raylet SIGKILLed), restarts
what was on it on the nodes left, names the cause, and ends with the parameters of the same run
under `--engine local`, bit for bit (BSP, sync replication)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from helpers import RunWatch

pytest.importorskip("ray", reason="--engine ray needs the ray extra: pip install -e '.[ray]'")

from tether.devtools.ray_cluster import LoopbackRayCluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
# Worker 0 takes 60 ms more per step: the 120 steps after the loss (at clock 30) last at least
# 7 s however fast the machine, longer than Ray takes to see a node whose raylet was killed
# (its processes live on until then, and a run that ended first would have lost nothing).
FLAGS = ["--steps", "150", "--replication", "sync", "--seed", "1", "--straggler", "0:60"]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LoopbackRayCluster]:
    with LoopbackRayCluster(nodes=3, cpus_per_node=2, tuned=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def local_sha(tmp_path_factory: pytest.TempPathFactory) -> str:
    import json
    import subprocess
    import sys

    run_dir = tmp_path_factory.mktemp("local")
    out = subprocess.run(
        [sys.executable, "-m", "tether", "launch", *FLAGS, "--run-dir", str(run_dir), "--json"],
        capture_output=True, text=True, timeout=600, start_new_session=True, check=True,
    ).stdout  # fmt: skip
    return str(json.loads(out.strip().splitlines()[-1])["params_sha256"])


def _lose_shard_0_node(
    cluster: LoopbackRayCluster, tether_cli, tmp_path, lose: Callable[[str], object]
) -> tuple[dict, str, list[tuple[str, int]], float]:
    run_dir = tmp_path / "run"
    launch = tether_cli(
        "launch", "--engine", "ray", "--address", cluster.address, *FLAGS,
        "--run-dir", str(run_dir), "--json",
    )  # fmt: skip
    watch = RunWatch(run_dir)
    try:
        placed = watch.addresses_at(30)
    finally:
        watch.close()
    ip = placed[("server", 0)].rsplit(":", 1)[0]
    on_node = sorted(k for k, address in placed.items() if address.startswith(f"{ip}:"))
    lost_at = time.time()
    lose(ip)
    return launch.json(600), ip, on_node, lost_at


def _check(summary: dict, ip: str, on_node: list[tuple[str, int]], lost_at: float, sha: str):
    assert summary["params_sha256"] == sha  # the same bits as under --engine local
    assert summary["lost_updates"] == 0 and summary["ledger"]["ok"]
    for role in ("server", "worker"):
        assert summary["restarts"][role] == sum(1 for r, _ in on_node if r == role)
    exits = [e for e in summary["events"] if e["kind"] == "exit" and "cause" in e]
    assert sorted((e["role"], e["id"]) for e in exits) == on_node
    assert {e["cause"] for e in exits} == {"node_lost"}
    recovered = {(r["role"], r["id"]): r for r in summary["recoveries"]}
    assert set(recovered) == set(on_node)
    assert all("lost with its node" in r["detail"] for r in recovered.values())
    assert all(r["recovery_s"] is not None for r in recovered.values())
    starts = [e for e in summary["events"] if e["kind"] == "start" and e["t"] > lost_at]
    assert starts and all(ip not in e["where"] for e in starts)  # placed on the nodes left
    serving = [e["t"] - lost_at for e in summary["events"] if e["kind"] == "serving"]
    print(
        f"\nnode {ip} lost with {on_node}: serving again {[round(s, 2) for s in serving]}s after "
        f"the loss; the driver's recovery_s {summary['recovery_s']}"
    )


def test_a_removed_node_s_members_come_back_on_other_nodes(
    ray_cluster: LoopbackRayCluster, local_sha: str, tether_cli, tmp_path
):
    summary, ip, on_node, lost_at = _lose_shard_0_node(
        ray_cluster, tether_cli, tmp_path, ray_cluster.remove
    )
    _check(summary, ip, on_node, lost_at, local_sha)
    ray_cluster.add()  # three member nodes again for the next test


def test_a_node_whose_raylet_is_killed_is_lost_and_its_members_recover(
    ray_cluster: LoopbackRayCluster, local_sha: str, tether_cli, tmp_path
):
    summary, ip, on_node, lost_at = _lose_shard_0_node(
        ray_cluster, tether_cli, tmp_path, ray_cluster.kill_raylet
    )
    _check(summary, ip, on_node, lost_at, local_sha)

"""Chaos scenarios end to end: real runs, real faults, invariants checked (DESIGN §7, tier 3).

The CI subset (scenarios marked `ci = true`) runs here; `tether chaos run --all` runs the rest.
A deliberately broken build — the shard-kill scenario with replication off — must fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from tether import shm
from tether.chaos.scenario import load_scenario, shipped

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _ran(result: dict) -> dict[str, dict]:
    return {c["name"]: c for c in result["invariants"]}


def test_the_ci_scenarios_pass_their_invariants(tether_cli, tmp_path):
    out = tmp_path / "chaos"
    proc = tether_cli("chaos", "run", "--ci", "--json", "--out", str(out))
    rc, stdout, stderr = proc.finish(timeout_s=560)
    assert rc == 0, stderr[-4000:]

    result = json.loads(stdout.strip().splitlines()[-1])
    expected = {s.name for s in map(load_scenario, shipped()) if s.ci}
    by_name = {r["scenario"]: r for r in result["scenarios"]}
    assert set(by_name) == expected and result["ok"] is True
    for name, r in by_name.items():
        checks = _ran(r)
        assert all(c["ok"] for c in checks.values()), (name, checks)
        assert "finished" in checks and "ledger" in checks and "faults_fired" in checks
        assert r["summary"]["ledger"]["pushes_in_logs"] > 0
        assert all(f["fired"] for f in r["faults"])
        assert f"--seed {r['seed']}" in r["replay"] and f"seed {r['seed']}" in stderr
        # The report: Markdown naming every invariant, and a real image of the run.
        report = Path(r["report"])
        text = report.read_text()
        assert all(f"| {c} |" in text for c in checks)
        image = matplotlib.image.imread(report.parent / "timeline.png")
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.01  # not a blank canvas
    kill = by_name["shard-kill"]
    assert kill["summary"]["restarts"]["server"] == 1
    assert _ran(kill)["bit_identical"]["ok"]
    assert 0 < kill["faults"][0]["recovery_s"] < 3.0
    zombie = by_name["shard-pause-zombie"]
    assert "exited with code 1" in _ran(zombie)["zombie_fenced"]["detail"]
    # The workers left the frozen shard for its replacement before the old one was resumed.
    pause, replace, resume = zombie["faults"]
    assert resume["step"] > replace["step"], zombie["faults"]
    partition = by_name["worker-partition"]
    assert partition["proxy"] is not None
    # Every link crosses the proxy, so no tensor took the same-host path around it (DESIGN §2);
    # without a proxy the same machine's workers and shards use it, across kills and fencing.
    assert partition["summary"]["segment_pulls"] == partition["summary"]["segment_pushes"] == 0
    if shm.SHM_DIR.is_dir():
        assert kill["summary"]["segment_pushes"] > 0 and zombie["summary"]["segment_pulls"] > 0
    heal = partition["faults"][1]
    assert heal["action"] == "enable" and heal["recovery_s"] is not None


def test_shard_kill_fails_when_replication_is_off(tether_cli, tmp_path):
    """The same scenario on a build that does not replicate: the invariants must catch it."""
    proc = tether_cli(
        "chaos", "run", "shard-kill", "--set", "run.replication=off", "--json",
        "--out", str(tmp_path / "chaos"),
    )  # fmt: skip
    rc, stdout, stderr = proc.finish(timeout_s=560)
    assert rc == 1 and stdout.strip(), stderr[-4000:]  # failed invariants, not a crash

    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["ok"] is False
    failed = {c["name"]: c["detail"] for c in result["invariants"] if not c["ok"]}
    # The replacement starts from scratch: the workers find clock 0 there and the other shard
    # refuses to go back (the run fails), or, should it finish, acknowledged updates vanished
    # and the parameters differ from the fault-free run's.
    assert failed.keys() & {"finished", "no_acked_loss", "bit_identical"}, result["invariants"]
    assert all(f"FAIL {name}" in stderr for name in failed)


def test_a_bad_scenario_is_a_usage_error(tether_cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[fault]]\naction = "kill"\ntarget = "shard:7"\nat_step = 3\n')
    rc, _, stderr = tether_cli("chaos", "run", str(bad)).finish(60)
    assert rc == 2 and "shard:7 is outside the run" in stderr and "Traceback" not in stderr


@pytest.mark.timeout(60)
def test_the_proxy_command_serves_the_toxiproxy_api_until_sigterm(tether_cli):
    import signal
    import socket

    from toxiproxy.api import APIConsumer
    from toxiproxy.server import Toxiproxy

    proc = tether_cli("chaos", "proxy", "--listen", "127.0.0.1:0")
    line = proc.proc.stderr.readline()  # "tether chaos proxy: Toxiproxy API on http://H:P"
    host, port = line.strip().rsplit("http://", 1)[1].rsplit(":", 1)
    saved = APIConsumer.host, APIConsumer.port
    try:
        client = Toxiproxy()
        client.update_api_consumer(host, int(port))
        with socket.socket() as upstream:
            upstream.bind(("127.0.0.1", 0))
            proxy = client.create(
                upstream=f"127.0.0.1:{upstream.getsockname()[1]}", name="p", listen="127.0.0.1:0"
            )
            assert set(client.proxies()) == {"p"} and proxy.listen.startswith("127.0.0.1:")
    finally:
        APIConsumer.host, APIConsumer.port = saved
    proc.proc.send_signal(signal.SIGTERM)
    rc, _, _ = proc.finish(30)
    assert rc == 0


def test_the_proxy_command_refuses_a_bad_or_taken_address(tether_cli):
    import socket

    rc, _, err = tether_cli("chaos", "proxy", "--listen", "nope").finish(60)
    assert rc == 2 and "invalid listen address 'nope'" in err and "Traceback" not in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        rc, _, err = tether_cli("chaos", "proxy", "--listen", address).finish(60)
    assert rc == 1 and f"cannot listen on {address}" in err and "Traceback" not in err

"""Chaos scenarios as data, and the invariant checks as pure functions (DESIGN §7)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tether.chaos.invariants import check_run
from tether.chaos.scenario import (
    LinkTarget,
    ProcessTarget,
    ScenarioError,
    load_scenario,
    resolve_path,
    run_config,
    shipped,
)
from tether.config import RunConfig

NAMES = {
    "shard-kill", "worker-kill", "shard-pause-zombie", "worker-partition", "latency-jitter",
    "link-reset", "bandwidth-squeeze", "random-kills", "mongo-primary-kill",
    "mongo-member-partition",
}  # fmt: skip


def test_shipped_scenarios_cover_the_issue_and_all_load():
    assert {p.stem for p in shipped()} == NAMES
    for path in shipped():
        s = load_scenario(path)
        assert s.name == path.stem and s.description and s.faults, path
        run_config(s, "x")  # a valid RunConfig
        assert s.needs_mongod == s.name.startswith("mongo-")
    ci = {s.name for s in map(load_scenario, shipped()) if s.ci}
    assert ci and not any(n.startswith("mongo-") for n in ci)


def test_a_scenario_resolves_by_name_or_path(tmp_path):
    assert resolve_path("shard-kill").name == "shard-kill.toml"
    with pytest.raises(ScenarioError, match="shipped scenarios: .*shard-kill"):
        resolve_path("no-such")
    with pytest.raises(ScenarioError, match="no scenario file"):
        resolve_path(str(tmp_path / "missing.toml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


BASE = """
name = "t"
description = "d"
seed = 5
[run]
steps = 50
[proxies]
workers = true
"""


@pytest.mark.parametrize(
    "extra, message",
    [
        ('[[fault]]\naction = "explode"\ntarget = "shard:0"\nat_step = 1', "action must be one of"),
        ('[[fault]]\naction = "kill"\ntarget = "shard:9"\nat_step = 1', "outside the run"),
        ('[[fault]]\naction = "kill"\ntarget = "shard:0"', "exactly one of at_step"),
        (
            '[[fault]]\naction = "kill"\ntarget = "link:worker:0->shard:0"\nat_s = 1',
            "process target",
        ),
        ('[[fault]]\naction = "disable"\ntarget = "shard:0"\nat_s = 1', "link target"),
        ('[[fault]]\naction = "kill"\ntarget = "store:0"\nat_s = 1', 'store = "mongodb"'),
        (
            '[[fault]]\naction = "add_toxic"\ntarget = "links"\nat_s = 1\n'
            'toxic = { type = "gremlins" }',
            "toxic type must be one of",
        ),
        ('[[fault]]\naction = "remove_toxic"\ntarget = "links"\nat_s = 1', "needs toxic_name"),
        ("[invariants]\nbogus = true", "unknown key 'bogus' in \\[invariants\\]"),
        ("[run]\nsteps = 0", "--steps must be >= 1"),
    ],
)
def test_bad_scenarios_get_one_clear_sentence(tmp_path, extra, message):
    text = BASE.replace("[run]\nsteps = 50\n", "") if extra.startswith("[run]") else BASE
    with pytest.raises(ScenarioError, match=message):
        load_scenario(write(tmp_path, text + extra))


def test_link_faults_need_proxies(tmp_path):
    text = BASE.replace("workers = true", "workers = false")
    text += '[[fault]]\naction = "disable"\ntarget = "links"\nat_s = 1\n'
    with pytest.raises(ScenarioError, match="need \\[proxies\\] workers = true"):
        load_scenario(write(tmp_path, text))


def test_targets_parse_and_select_links(tmp_path):
    text = BASE + (
        '[[fault]]\naction = "disable"\ntarget = "links:worker:1"\nat_s = 1\n'
        '[[fault]]\naction = "enable"\ntarget = "link:worker:0->shard:1"\nafter_s = 1\n'
        '[[fault]]\naction = "add_toxic"\ntarget = "links"\nafter_s = 0\n'
        'toxic = { type = "latency", attributes = { latency = 5 } }\n'
        '[[fault]]\naction = "kill"\ntarget = "worker:1"\nat_step = 3\n'
    )
    s = load_scenario(write(tmp_path, text))
    targets = [f.target for f in s.faults]
    assert targets[0] == LinkTarget(1, None) and targets[0].links(2, 2) == [(1, 0), (1, 1)]
    assert targets[1].links(2, 2) == [(0, 1)]
    assert len(targets[2].links(3, 2)) == 6
    assert targets[3] == ProcessTarget("worker", 1)
    toxic = s.faults[2].toxic
    assert toxic is not None and toxic.name == "latency_downstream" and toxic.toxicity == 1.0


def test_random_faults_are_seeded_and_replayable(tmp_path):
    text = BASE + (
        '[random]\naction = "kill"\ntargets = ["shard:0", "shard:1", "worker:0"]\n'
        "count = 5\nsteps = [10, 40]\n"
    )
    path = write(tmp_path, text)
    a, b = load_scenario(path), load_scenario(path)
    c = load_scenario(path, seed=6)
    assert a.faults == b.faults and len(a.faults) == 5
    assert [f.at_step for f in a.faults] == sorted(f.at_step for f in a.faults)
    assert all(10 <= (f.at_step or 0) < 40 for f in a.faults)
    assert a.faults != c.faults and c.seed == 6 and c.run["seed"] == 6


def test_overrides_change_the_run(tmp_path):
    path = resolve_path("shard-kill")
    s = load_scenario(path, overrides=["run.replication=off", "run.steps=30", "seed=9"])
    config = run_config(s, "x")
    assert (config.replication, config.steps, config.seed) == ("off", 30, 9)
    with pytest.raises(ScenarioError, match="--set expects"):
        load_scenario(path, overrides=["nonsense"])


# -- invariants ------------------------------------------------------------------------------

SUMMARY = {
    "updates_applied": 100, "wall_s": 5.0, "restarts": {"server": 1, "worker": 0},
    "test_accuracy": 0.95, "max_clock_gap": 0, "params_sha256": "a" * 64, "lost_updates": 0,
    "ledger": {"ok": True, "problems": [], "pushes_in_logs": 400, "lost_acked_pushes": 0},
    "events": [],
    "recoveries": [{"role": "server", "id": 0, "t": 1001.2, "cause": "exited", "epoch": 1,
                    "detail": "exited with code -9 (SIGKILL)", "exit_code": -9,
                    "recovery_s": 0.3}],
}  # fmt: skip
FAULT = {"index": 0, "fault": "kill shard:0 at step 5", "action": "kill", "target": "shard:0",
         "fired": True, "t": 1001.0, "at_s": 1.0, "step": 5, "pid": 10, "error": None,
         "recovery_s": 0.3, "heal": False}  # fmt: skip


def checks_of(scenario_text: str, tmp_path: Path, summary=None, baseline=None, faults=None,
              gap=None, failure=None):  # fmt: skip
    s = load_scenario(write(tmp_path, BASE + scenario_text))
    config = RunConfig.of("x", **{k: v for k, v in s.run.items()})
    result = check_run(s.invariants, config, summary, failure, baseline, faults or [FAULT], gap)
    return {c.name: c for c in result}


ALL = (
    "[invariants]\naccuracy_tolerance = 0.02\nno_acked_loss = true\nbit_identical = true\n"
    "max_recovery_s = 1.0\n"
)


def test_invariants_pass_on_a_good_run(tmp_path):
    checks = checks_of(ALL, tmp_path, SUMMARY, dict(SUMMARY, test_accuracy=0.96))
    assert set(checks) == {
        "faults_fired", "finished", "accuracy", "clock_gap", "ledger", "no_acked_loss",
        "bit_identical", "recovery", "no_spurious_restarts",
    }  # fmt: skip
    assert all(c.ok for c in checks.values()), checks


def spurious(tmp_path, recoveries, faults):
    checks = checks_of("", tmp_path, dict(SUMMARY, recoveries=recoveries), faults=faults)
    return checks["no_spurious_restarts"]


def test_no_spurious_restarts_matches_each_restart_to_a_fault_on_its_member(tmp_path):
    kill = SUMMARY["recoveries"][0]
    probe = dict(kill, id=1, t=1003.0, cause="probe_failed", detail="killed after failing ...")
    pause = dict(FAULT, index=1, action="pause", target="shard:1", t=1002.0)
    ok = spurious(tmp_path, [kill, probe], [FAULT, pause])
    assert ok.ok and "2 restarts, each after a fault" in ok.detail
    assert spurious(tmp_path, [], [FAULT]).detail == "no restarts"
    # A restart of a member no fault touched, one before its fault, and a second restart that
    # one fault cannot explain twice: each is named.
    other = spurious(tmp_path, [dict(kill, role="worker")], [FAULT])
    assert not other.ok and "worker:0 was restarted with no fault on it" in other.detail
    early = spurious(tmp_path, [dict(kill, t=1000.5)], [FAULT])
    assert not early.ok
    twice = spurious(tmp_path, [kill, dict(kill, t=1009.0)], [FAULT])
    assert not twice.ok and "exited with code -9 (SIGKILL)" in twice.detail
    link = dict(FAULT, action="disable", target="links:worker:1")
    assert not spurious(tmp_path, [dict(kill, role="worker", id=1)], [link]).ok


@pytest.mark.parametrize(
    "change, broken",
    [
        ({"test_accuracy": 0.90}, "accuracy"),
        ({"max_clock_gap": 1}, "clock_gap"),
        ({"params_sha256": "b" * 64}, "bit_identical"),
        ({"lost_updates": 2}, "no_acked_loss"),
        (
            {
                "ledger": {
                    "ok": False,
                    "problems": ["shard 0, worker 1: 101 pushes"],
                    "pushes_in_logs": 401,
                    "lost_acked_pushes": 0,
                }
            },
            "ledger",
        ),  # fmt: skip
        (
            {"ledger": {"ok": True, "problems": [], "pushes_in_logs": 400, "lost_acked_pushes": 3}},
            "no_acked_loss",
        ),  # fmt: skip
    ],
)
def test_each_invariant_fails_when_its_property_breaks(tmp_path, change, broken):
    checks = checks_of(ALL, tmp_path, dict(SUMMARY, **change), dict(SUMMARY))
    assert [n for n, c in checks.items() if not c.ok] == [broken]


def test_slow_or_missing_recoveries_and_unfired_faults_fail(tmp_path):
    slow = dict(FAULT, recovery_s=2.5)
    missing = dict(FAULT, index=1, recovery_s=None)
    unfired = dict(FAULT, index=2, fired=False, error="never fired: the run ended first")
    checks = checks_of(ALL, tmp_path, SUMMARY, SUMMARY, [slow, missing, unfired])
    assert not checks["recovery"].ok and "2.50s > 1.0s" in checks["recovery"].detail
    assert "no recovery seen" in checks["recovery"].detail
    assert not checks["faults_fired"].ok and "never fired" in checks["faults_fired"].detail


def test_a_failed_run_fails_finished(tmp_path):
    checks = checks_of(ALL, tmp_path, failure="shard 0 exited with code 1 after 3 restarts")
    assert not checks["finished"].ok and "after 3 restarts" in checks["finished"].detail


def test_the_ssp_bound_and_worker_observed_gaps(tmp_path):
    text = "[invariants]\nclock_gap = true\n"
    s_text = text.replace("", "")
    ssp = BASE.replace("steps = 50", 'steps = 50\nmode = "ssp"\nstaleness = 2')
    s = load_scenario(write(tmp_path, ssp + s_text))
    config = RunConfig.of("x", **s.run)
    ok = check_run(s.invariants, config, dict(SUMMARY, max_clock_gap=2), None, None, [], 2)
    bad = check_run(s.invariants, config, dict(SUMMARY, max_clock_gap=2), None, None, [], 3)
    gap = {c.name: c for c in ok}["clock_gap"]
    assert gap.ok and "bound 2" in gap.detail
    assert not {c.name: c for c in bad}["clock_gap"].ok  # a gap only a worker saw still counts


def test_zombie_fenced_reads_the_launcher_events(tmp_path):
    resume = dict(FAULT, index=2, action="resume", target="shard:1", pid=77, recovery_s=None)
    events = [{"kind": "superseded", "pid": 77}]
    fenced = events + [{"kind": "exit", "pid": 77, "superseded": True, "exit_code": 1}]
    text = "[invariants]\nzombie_fenced = true\n"
    good = checks_of(text, tmp_path, dict(SUMMARY, events=fenced), faults=[resume])
    alive = checks_of(text, tmp_path, dict(SUMMARY, events=events), faults=[resume])
    assert good["zombie_fenced"].ok and "exited with code 1" in good["zombie_fenced"].detail
    assert not alive["zombie_fenced"].ok and "kept running" in alive["zombie_fenced"].detail


def test_baselines_are_shared_by_run_options_only():
    from tether.chaos.runner import BaselineCache

    kill = load_scenario(resolve_path("shard-kill"))
    same_run = dataclasses.replace(kill, name="other", faults=())
    other_run = dataclasses.replace(kill, run={**kill.run, "steps": 7})
    cache = BaselineCache()
    assert cache.get(kill) is None
    baseline: tuple[dict, list] = ({"run_id": "r1"}, [])
    cache.put(kill, baseline)
    assert cache.get(same_run) is baseline and cache.get(other_run) is None
    assert BaselineCache().get(kill) is None  # each invocation has its own

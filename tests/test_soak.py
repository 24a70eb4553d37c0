"""`tether chaos soak`: its fault plan and memory verdicts (pure), and a short soak end to end."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from tether.chaos.soak import MIN_FAULT_GAP_S, children, fault_plan, memory_flat, open_fds


def plan(seed: int, duration_s: float = 300.0):
    return fault_plan(random.Random(seed), duration_s, workers=3, shards=2, detect_s=15.0)


def test_the_fault_plan_is_seeded_spaced_and_inside_the_run():
    a, b = plan(5), plan(5)
    assert a == b and a != plan(6)
    timed = [f for f in a if f.at_s is not None]
    assert len(timed) >= 10
    assert all(0 < f.at_s <= 0.7 * 300 for f in timed)
    gaps = [y.at_s - x.at_s for x, y in zip(timed, timed[1:], strict=False)]
    assert min(gaps) >= MIN_FAULT_GAP_S
    # Every link fault is healed by the next fault; at most one pause, which nothing resumes.
    for i, f in enumerate(a):
        if f.action in ("add_toxic", "disable"):
            assert a[i + 1].action in ("remove_toxic", "enable") and a[i + 1].after_s
    assert sum(f.action == "pause" for f in a) <= 1
    assert not any(f.action == "resume" for f in a)
    kinds = {f.action for s in range(20) for f in plan(s)}
    assert kinds >= {"kill", "stop", "pause", "add_toxic", "disable"}


def test_no_pause_when_the_run_is_too_short_to_absorb_its_detection():
    assert all(f.action != "pause" for s in range(30) for f in plan(s, duration_s=40.0))


def series(rss_mib):
    return {"member": "shard:0", "t": [float(i) for i in range(len(rss_mib))],
            "rss": [int(m * 2**20) for m in rss_mib]}  # fmt: skip


def test_memory_flat_judges_growth_after_the_warm_up():
    warm_then_flat = [50] * 5 + [200] * 55  # start-up growth does not count
    ok, verdicts = memory_flat({1: series(warm_then_flat)}, phase_s=60.0)
    assert ok and verdicts[0]["growth_mib"] == 0
    leaking = [200 + 2 * i for i in range(60)]  # +2 MiB a second
    ok, verdicts = memory_flat({1: series(warm_then_flat), 2: series(leaking)}, phase_s=60.0)
    assert not ok and [v["ok"] for v in verdicts] == [True, False]
    short_lived = {3: series([100] * 10)}  # 10 s of a 60 s phase: not judged
    assert memory_flat(short_lived, phase_s=60.0) == (False, [])  # nothing judged is no pass


def test_children_and_descriptors_are_read_from_proc():
    before = open_fds()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert proc.pid in children(os.getpid())
        r, w = os.pipe()
        assert {r, w} <= set(open_fds()) and not {r, w} & set(before)
        os.close(r)
        os.close(w)
    finally:
        proc.kill()
        proc.wait()
    assert proc.pid not in children(os.getpid())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_two_minute_soak_holds_every_invariant(tether_cli, tmp_path):
    result = tether_cli(
        "chaos", "soak", "--minutes", "2", "--seed", "3", "--out", str(tmp_path / "soak"),
        "--json",
    ).json(850)  # fmt: skip
    assert result["ok"], [
        (p["phase"], [i for i in p["invariants"] if not i["ok"]], p["memory"], p["processes_left"])
        for p in result["phases"]
    ] + [result["fds_leaked"]]
    assert [p["phase"] for p in result["phases"]] == ["bsp-sync", "ssp2-async"]
    for p in result["phases"]:
        names = {i["name"] for i in p["invariants"]}
        assert {"faults_fired", "finished", "ledger", "no_spurious_restarts"} <= names
        assert p["faults"] and all(f["fired"] for f in p["faults"])
        assert p["memory"] and p["memory_flat"] and p["processes_left"] == []
        assert all(len(s["rss_mib"]) == len(s["t"]) for s in p["memory_series"].values())
    bsp = {i["name"]: i for i in result["phases"][0]["invariants"]}
    assert bsp["bit_identical"]["ok"]
    assert result["fds_ok"] and os.path.exists(result["plot"])

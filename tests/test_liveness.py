"""The liveness detector tells slow from dead (tether/liveness.py): pure, no sockets, no clock."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.config import LivenessPolicy
from tether.driver.liveness import Detector, Kill, Phase, Probe, exit_cause

POLICY = LivenessPolicy(lease_s=5.0, probe_timeout_s=10.0, startup_timeout_s=60.0)
KEY = ("server", 0, 1234)


def serving_detector(policy: LivenessPolicy = POLICY, at: float = 0.0) -> Detector:
    d = Detector(policy)
    d.spawned(KEY, at)
    d.heartbeat(KEY, 1000.0, serving=True, now=at + 1.0)
    return d


def run_until(d: Detector, start: float, end: float, step: float = 0.1, answer=None):
    """Tick from start to end; answer each probe with `answer(now)` (None: leave it pending)."""
    actions = []
    t = start
    while t <= end:
        for a in d.tick(t):
            actions.append((t, a))
            if isinstance(a, Probe) and answer is not None:
                ok = answer(t)
                if ok is not None:
                    d.probe_result(a.key, a.number, ok, t + 0.05, "" if ok else "DEADLINE_EXCEEDED")
        d.validate()
        t = round(t + step, 6)
    return actions


def test_start_up_is_not_under_the_lease_but_has_its_own_deadline():
    d = Detector(POLICY)
    d.spawned(KEY, 0.0)
    d.heartbeat(KEY, 1000.0, serving=False, now=0.5)  # registered, loading its state
    assert run_until(d, 0.0, 59.9, step=0.5) == []  # no heartbeat for a minute: no action
    (t, kill), *_ = run_until(d, 60.0, 61.0)
    assert isinstance(kill, Kill) and kill.cause.kind == "startup_deadline"
    assert "not serving" in kill.cause.detail and "start-up deadline 60s" in kill.cause.detail


def test_a_late_heartbeat_only_raises_suspicion_and_an_answered_probe_clears_it():
    d = serving_detector()
    assert run_until(d, 1.0, 6.0) == []  # within the lease
    actions = run_until(d, 6.1, 300.0, answer=lambda now: True)  # silent, but answers
    assert actions and all(isinstance(a, Probe) for _, a in actions)
    assert d.phase(KEY) is Phase.SERVING or d.phase(KEY) is Phase.SUSPECT
    # One probe per lease of silence, not one per tick: a slow member is not flooded.
    assert len(actions) <= 300 / POLICY.lease_s + 1


def test_a_frozen_member_is_killed_only_after_its_probes_failed_for_the_probe_timeout():
    d = serving_detector()
    actions = run_until(d, 1.0, 40.0, answer=lambda now: False)
    kills = [(t, a) for t, a in actions if isinstance(a, Kill)]
    probes = [(t, a) for t, a in actions if isinstance(a, Probe)]
    assert len(kills) == 1
    t_kill, kill = kills[0]
    t_suspect = probes[0][0]
    assert t_suspect > 1.0 + POLICY.lease_s
    assert t_kill - t_suspect >= POLICY.probe_timeout_s
    assert t_kill <= 1.0 + POLICY.lease_s + POLICY.probe_timeout_s + 0.5
    assert kill.cause.kind == "probe_failed" and "DEADLINE_EXCEEDED" in kill.cause.detail
    assert all(t < t_kill for t, _ in probes)  # nothing after the kill
    assert d.phase(KEY) is Phase.KILLED


def test_no_kill_while_a_probe_is_unanswered_and_too_few_failures():
    d = serving_detector()
    # Probes that never come back (each attempt has its own deadline in the prober; here the
    # results are simply missing): one failure at most is not enough to kill.
    actions = run_until(d, 1.0, 100.0, answer=None)
    assert [a for _, a in actions if isinstance(a, Kill)] == []
    assert len([a for _, a in actions if isinstance(a, Probe)]) == 1


def test_heartbeats_resuming_clear_the_suspicion():
    d = serving_detector()
    actions = run_until(d, 1.0, 8.0, answer=lambda now: False)
    assert any(isinstance(a, Probe) for _, a in actions) and d.phase(KEY) is Phase.SUSPECT
    d.heartbeat(KEY, 1008.0, serving=True, now=8.05)
    assert d.phase(KEY) is Phase.SERVING
    assert run_until(d, 8.1, 12.0) == []


def test_a_stale_probe_result_is_dropped():
    d = serving_detector()
    ((_, first),) = run_until(d, 6.5, 6.5)
    assert isinstance(first, Probe)
    d.probe_result(KEY, first.number - 1, False, 6.6, "old")  # an older probe's answer
    assert d.members[KEY].failed_probes == 0
    d.probe_result(KEY, first.number, False, 6.7, "now")
    d.probe_result(KEY, first.number, False, 6.8, "again")  # the same answer twice
    assert d.members[KEY].failed_probes == 1


def test_the_lease_adapts_to_the_observed_intervals_within_floor_and_cap():
    policy = LivenessPolicy(lease_s=5.0, lease_cap_s=20.0, adaptive_factor=4.0)
    d = serving_detector(policy)
    t, beat = 1.0, 1000.0
    for _ in range(5):  # a healthy member: every 0.5 s
        t, beat = t + 0.5, beat + 0.5
        d.heartbeat(KEY, beat, True, t)
    assert d.lease(KEY) == 5.0  # never below the floor
    for _ in range(3):  # a loaded machine: every 3 s
        t, beat = t + 3.0, beat + 3.0
        d.heartbeat(KEY, beat, True, t)
    assert d.lease(KEY) == pytest.approx(12.0)
    t, beat = t + 9.0, beat + 9.0
    d.heartbeat(KEY, beat, True, t)
    assert d.lease(KEY) == 20.0  # capped
    assert run_until(d, t, t + 19.9) == []  # 12 s of silence: not even a probe now


def test_a_forgotten_process_gets_no_action_and_reports_what_was_seen():
    d = serving_detector()
    d.heartbeat(KEY, 1001.5, True, 3.0)
    report = d.report(d.forget(KEY))
    assert report["max_heartbeat_gap_s"] == pytest.approx(2.0)
    assert report["startup_s"] == pytest.approx(1.0)
    assert run_until(d, 0.0, 100.0, step=1.0) == []


def test_exit_cause_names_the_signal():
    assert exit_cause(-signal.SIGKILL).detail == "exited with code -9 (SIGKILL)"
    assert exit_cause(3).detail == "exited with code 3" and exit_cause(3).kind == "exited"


@pytest.mark.parametrize(
    "kwargs", [{"lease_s": 0}, {"probe_timeout_s": float("nan")}, {"lease_cap_s": 1.0}]
)
def test_bad_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        LivenessPolicy(**kwargs)


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["beat", "serve", "probe_ok", "probe_fail", "tick", "forget", "spawn"]),
        st.floats(0.0, 4.0),
        st.integers(0, 2),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(EVENTS)
def test_invariants_hold_after_every_event_and_no_kill_comes_early(events):
    """Random interleavings: validate() after each event; a kill is only ever one of the two
    confirmed kinds, and a probe-failure kill comes after the probe timeout of failures."""
    policy = LivenessPolicy(lease_s=1.0, probe_timeout_s=2.0, startup_timeout_s=5.0)
    d = Detector(policy)
    now, beat = 0.0, 0.0
    keys = [("worker", i, 100 + i) for i in range(3)]
    pending: dict[tuple, int] = {}
    for k in keys:
        d.spawned(k, now)
    for kind, dt, i in events:
        now += dt
        key = keys[i]
        if kind == "spawn" and key not in d.members:
            d.spawned(key, now)
        elif kind == "forget":
            d.forget(key)
        elif kind in ("beat", "serve"):
            beat += 1
            d.heartbeat(key, beat, serving=kind == "serve" or d.phase(key) is not Phase.STARTING,
                        now=now)  # fmt: skip
        elif kind.startswith("probe") and key in pending:
            d.probe_result(key, pending.pop(key), kind == "probe_ok", now, "x")
        else:
            for a in d.tick(now):
                if isinstance(a, Probe):
                    pending[a.key] = a.number
                else:
                    w = d.members[a.key]
                    assert a.cause.kind in ("probe_failed", "startup_deadline")
                    if a.cause.kind == "startup_deadline":
                        assert now - w.spawned_at > policy.startup_timeout_s
                    else:
                        assert w.probes_failed >= policy.min_failed_probes
        d.validate()

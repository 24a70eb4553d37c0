"""Member records parsed once, what members publish, and the one aliveness rule (DESIGN §5, §9).

`tether.member.report` builds what members write into their records; `tether.member.view` reads
a record once into a `MemberView` and a run's records into a `RunView`, which the launcher's
progress line and `tether status` both render.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import RUN, wait_until
from tether.cli.members import spawn_token
from tether.cli.status import run_status, status_of
from tether.config import LivenessPolicy, OptimizerConfig, RunConfig
from tether.consistency import Consistency, Mode
from tether.driver.liveness import Detector
from tether.driver.progress import ProgressView
from tether.driver.summary import audit_ledger, last_losses, lost_updates
from tether.member.heartbeat import Heartbeat
from tether.member.report import BeatReport, LauncherReport, Recovered, ShardNumbers, WorkerReport
from tether.member.view import (
    Here,
    MemberView,
    RunView,
    is_alive,
    lease,
    member_views,
    observe,
    run_liveness,
)
from tether.server.host import ShardHost
from tether.server.servicer import ShardServicer
from tether.server.state import ShardSpec, ShardState
from tether.store import Member, RunRecord, default_store_uri, open_store

POLICY = LivenessPolicy()
HOST = "node-a"


def record(
    role: str,
    mid: int,
    info: dict,
    *,
    epoch: int = 1,
    heartbeat: float = 100.0,
    state: str = "running",
    pid: int = 10,
    host: str = HOST,
) -> Member:
    """A member's record as the store returns it (started at 90.0)."""
    return Member(RUN, role, mid, epoch, f"{host}:1", pid, host, 90.0, heartbeat, state, info)


# -- what a worker publishes ---------------------------------------------------------------------


def test_a_worker_s_progress_report_is_the_heartbeat_dict_it_always_wrote():
    report = WorkerReport(
        clock=7, loss=0.25, samples_per_s=310.5, wait_s=1.5, reconnects=1,
        lost_updates={"0:2": 3}, acked_seqs=(6, 6), lost_acked={}, peak_rss_bytes=1 << 20,
    )  # fmt: skip
    # The dict worker/loop.py wrote before the report existed, keys in the same order: the
    # stored record is read by other processes and by older versions.
    before = {
        "clock": 7, "loss": 0.25, "samples_per_s": 310.5, "wait_s": 1.5, "reconnects": 1,
        "lost_updates": {"0:2": 3}, "acked_seqs": [6, 6], "lost_acked": {},
        "peak_rss_bytes": 1 << 20,
    }  # fmt: skip
    info = report.to_info()
    assert info == before and list(info) == list(before)
    assert json.dumps(info) == json.dumps(before)
    assert WorkerReport.from_info(info) == report


def test_a_partial_report_writes_only_its_fields():
    # Resumed (serving again) and the last clock before exiting: the rest of the record stays.
    assert WorkerReport(clock=3, resumed_at=12.5).to_info() == {"clock": 3, "resumed_at": 12.5}
    assert WorkerReport(clock=200).to_info() == {"clock": 200}
    assert WorkerReport().to_info() == {}


@given(
    clock=st.none() | st.integers(0, 10**6),
    loss=st.none() | st.floats(allow_nan=False),
    acked=st.none() | st.lists(st.integers(-1, 10**6), max_size=4).map(tuple),
    lost=st.none() | st.dictionaries(st.from_regex(r"\d:\d", fullmatch=True), st.integers(0, 9)),
    resumed_at=st.none() | st.floats(0, 2e9),
)
def test_a_worker_report_reads_back_as_written(clock, loss, acked, lost, resumed_at):
    report = WorkerReport(clock=clock, loss=loss, acked_seqs=acked, lost_updates=lost,
                          resumed_at=resumed_at)  # fmt: skip
    through_json = json.loads(json.dumps(report.to_info()))
    assert WorkerReport.from_info(through_json) == report


def test_the_launcher_s_report_is_the_heartbeat_dict_it_always_wrote():
    recoveries = ({"role": "server", "id": 1, "cause": "exited", "recovery_s": 0.4},)
    info = LauncherReport("train", {"server": 1, "worker": 0}, recoveries).to_info()
    assert info == {
        "phase": "train",
        "restarts": {"server": 1, "worker": 0},
        "recoveries": [{"role": "server", "id": 1, "cause": "exited", "recovery_s": 0.4}],
    }
    assert LauncherReport.from_info(info) == LauncherReport(
        "train", {"server": 1, "worker": 0}, recoveries
    )


def test_a_beat_adds_the_spawn_token_only_when_a_driver_gave_one():
    assert BeatReport(0, 5).to_info() == {"heartbeats_skipped": 0, "peak_rss_bytes": 5}
    assert BeatReport(2, 5, "41.3").to_info() == {
        "heartbeats_skipped": 2, "peak_rss_bytes": 5, "spawn": "41.3",
    }  # fmt: skip


def test_the_spawn_token_is_read_at_the_edge_and_handed_to_the_heartbeat(tmp_path, monkeypatch):
    assert spawn_token({"TETHER_SPAWN": "7.2"}) == "7.2" and spawn_token({}) == ""
    # The heartbeat itself reads no environment: only what it is handed is reported.
    monkeypatch.setenv("TETHER_SPAWN", "from-the-environment")
    uri = default_store_uri(tmp_path)
    store = open_store(uri)
    store.create_run(RUN, {})
    for mid, spawn in ((0, "9.1"), (1, "")):
        epoch = store.register(RUN, "worker", mid, address="", pid=1, host="h")
        beat = Heartbeat(uri, RUN, "worker", mid, epoch, interval_s=0.05, spawn=spawn).start()
        wait_until(lambda b=beat: b.beats >= 1, 30, "a beat to be written")
        beat.close()
    views = {v.member_id: v for v in member_views(store.members(RUN))}
    assert views[0].spawn == "9.1" and views[1].spawn == ""
    assert "spawn" not in store.member(RUN, "worker", 1).info
    store.close()


def test_reports_merge_in_the_store_as_they_always_did(tmp_path):
    store = open_store(default_store_uri(tmp_path))
    store.create_run(RUN, {})
    epoch = store.register(RUN, "worker", 0, address="", pid=1, host="h")
    store.heartbeat(RUN, "worker", 0, epoch, WorkerReport(clock=4, resumed_at=50.0).to_info())
    progress = WorkerReport(
        clock=5,
        loss=0.5,
        samples_per_s=10.0,
        wait_s=0.0,
        reconnects=0,
        lost_updates={},
        acked_seqs=(4,),
        lost_acked={},
        peak_rss_bytes=9,
    )
    store.heartbeat(RUN, "worker", 0, epoch, progress.to_info())  # fmt: skip
    store.heartbeat(RUN, "worker", 0, epoch, WorkerReport(clock=6).to_info())
    m = store.member(RUN, "worker", 0)
    store.close()
    assert m.info["clock"] == 6 and m.info["resumed_at"] == 50.0 and m.info["acked_seqs"] == [4]
    view = MemberView.of(m)
    assert view.worker == WorkerReport(6, 0.5, 10.0, 0.0, 0, {}, (4,), {}, 9, 50.0)
    assert (view.clock, view.ready_at, view.serving) == (6, 50.0, True)


# -- a record parsed once ------------------------------------------------------------------------


def test_a_shard_record_parses_what_the_shard_writes():
    spec = ShardSpec(RUN, 0, 0, 10, 2, Consistency(Mode.ASP, 0), OptimizerConfig("sgd", lr=0.1),
                     1 << 12)  # fmt: skip
    state = ShardState(spec, np.zeros(10, np.float32))
    servicer = ShardServicer(ShardHost(state), wait_timeout_s=5.0)
    servicer.serving_since = 123.0
    info = {**servicer.heartbeat_info(lock_timeout_s=1.0), **BeatReport(0, 7, "3.1").to_info()}
    view = MemberView.of(record("server", 0, json.loads(json.dumps(info))))
    assert view.shard == ShardNumbers(
        version=0, durable_version=0, replication_lag_max_s=0.0, updates_applied=0,
        clocks=(0, 0), max_clock_gap=0,
        base_version=info["base_version"], log_entries=0,
        restored_version=info["restored_version"], recovered=None, serving_since=123.0,
    )  # fmt: skip
    assert (view.phase, view.version, view.clock, view.ready_at) == ("serving", 0, None, 123.0)
    assert (view.spawn, view.heartbeats_skipped, view.peak_rss_bytes) == ("3.1", 0, 7)
    assert view.worker is None and view.launcher is None


def test_every_role_parses_and_says_when_it_serves():
    recovered = {"base_version": 40, "entries": 3, "replay_s": 0.01, "load_s": 0.02}
    shard = MemberView.of(
        record(
            "server",
            1,
            {"phase": "serving", "version": 43, "serving_since": 5.0, "recovered": recovered},
        )
    )
    starting = MemberView.of(record("server", 1, {"phase": "starting"}))
    worker = MemberView.of(record("worker", 0, {"clock": 9, "loss": 1.5, "resumed_at": 6.0}))
    launcher = MemberView.of(record("launcher", 0, {"phase": "train", "restarts": {"server": 1}}))
    assert shard.shard is not None and shard.shard.recovered == Recovered(40, 3, 0.01, 0.02)
    assert (shard.ready_at, shard.version) == (5.0, 43)
    assert (starting.phase, starting.serving, starting.version) == ("starting", False, None)
    assert (worker.ready_at, worker.clock, worker.version) == (6.0, 9, None)
    assert launcher.launcher == LauncherReport("train", {"server": 1}, None)
    assert (launcher.ready_at, launcher.clock, launcher.phase) == (None, None, "train")  # fmt: skip


def test_a_record_missing_fields_or_from_an_older_version_parses():
    # Just registered: nothing reported yet.
    for role in ("server", "worker", "launcher"):
        view = MemberView.of(record(role, 0, {}))
        assert (view.phase, view.ready_at, view.clock, view.version) == (None, None, None, None)
        assert (view.spawn, view.heartbeats_skipped, view.peak_rss_bytes) == ("", 0, None)
    # A worker from before the ack ledger, a shard from before the log: what is missing is None.
    old_worker = MemberView.of(record("worker", 0, {"clock": 3, "loss": 0.7, "samples_per_s": 9}))
    assert old_worker.worker == WorkerReport(clock=3, loss=0.7, samples_per_s=9.0)
    assert last_losses([old_worker]) == [0.7] and lost_updates([old_worker]) == 0
    old_shard = MemberView.of(
        record(
            "server",
            0,
            {"version": 3, "updates_applied": 3, "clocks": [3, 3], "serving_since": 1.0},
        )
    )
    assert old_shard.shard == ShardNumbers(version=3, updates_applied=3, clocks=(3, 3),
                                           serving_since=1.0)  # fmt: skip
    # Values of another kind read as not reported, never as an error.
    odd = MemberView.of(record("worker", 0, {"clock": "soon", "acked_seqs": 4, "spawn": 7}))
    assert (odd.clock, odd.worker.acked_seqs, odd.spawn) == (None, None, "7")


def test_the_summary_reads_the_workers_reports():
    workers = member_views([
        record("worker", 0, {"clock": 2, "loss": 0.5, "acked_seqs": [1], "lost_updates": {"0:2": 1},
                             "lost_acked": {"0:2": 1}}),
        record("worker", 1, {"clock": 2, "loss": 0.25, "lost_updates": {"0:2": 2}}),
        record("worker", 2, {}),
    ])  # fmt: skip
    assert last_losses(workers) == [0.5, 0.25]
    assert lost_updates(workers) == 2  # the largest report per recovery
    audit = audit_ledger(2, [], workers)
    assert audit["lost_acked"] == {"worker 0 shard:epoch 0:2": 1}


# -- the aliveness rule --------------------------------------------------------------------------


@given(st.lists(st.floats(0, 100), max_size=40), st.floats(0.1, 20), st.floats(1, 8))
def test_the_views_lease_is_the_detector_s(intervals, lease_s, factor):
    policy = LivenessPolicy(lease_s=lease_s, lease_cap_s=max(30.0, lease_s), adaptive_factor=factor)
    detector = Detector(policy)
    key = ("worker", 0, 1)
    detector.spawned(key, 0.0)
    t = 1.0
    detector.heartbeat(key, t, True, t)  # serving from here
    for i, gap in enumerate(intervals):
        t += gap
        detector.heartbeat(key, float(i + 2), True, t)
    seen = list(detector.members[key].intervals)
    assert detector.lease(key) == lease(policy, seen)
    assert policy.lease_s <= lease(policy, seen) <= policy.lease_cap_s


def test_a_reader_that_keeps_reading_learns_the_intervals_and_the_lease_adapts():
    here = Here(HOST, lambda pid: True)
    run: RunView | None = None
    for t in (0.0, 3.0, 6.0, 9.0):  # a worker on a busy machine beats every 3 s
        run = observe(run, RUN, [MemberView.of(record("worker", 0, {}, heartbeat=t))], POLICY,
                      now=t, here=here)  # fmt: skip
    silent = [MemberView.of(record("worker", 0, {}, heartbeat=9.0))]
    kept = observe(run, RUN, silent, POLICY, now=16.0, here=here)
    one_read = observe(None, RUN, silent, POLICY, now=16.0, here=here)
    assert kept.beats[("worker", 0, 1)].intervals == (3.0, 3.0, 3.0)
    assert (kept.members[0].lease_s, kept.members[0].alive) == (12.0, True)
    # One read has seen no interval: the lease is its floor, the run's --lease, as for the
    # detector before a member's second beat.
    assert (one_read.members[0].lease_s, one_read.members[0].alive) == (5.0, False)
    assert one_read.members[0].why_not_alive == "silent 7s"
    # A new registration (a restart) starts again; so does a long silence once capped.
    restarted = [MemberView.of(record("worker", 0, {}, epoch=2, heartbeat=16.0))]
    assert observe(kept, RUN, restarted, POLICY, now=16.0, here=here).members[0].lease_s == 5.0
    paused = [MemberView.of(record("worker", 0, {}, heartbeat=109.0))]
    assert observe(kept, RUN, paused, POLICY, now=109.0, here=here).members[0].lease_s == 30.0
    # Only the registrations still in the store are remembered.
    assert observe(kept, RUN, [], POLICY, now=20.0, here=here).beats == {}


def test_alive_is_running_within_the_lease_with_a_live_pid_where_it_can_be_checked():
    here = Here(HOST, lambda pid: pid != 66)
    fresh = MemberView.of(record("worker", 0, {}))
    assert is_alive(fresh, 1.0, 5.0, here)
    assert not is_alive(fresh, 5.5, 5.0, here)  # silent past its lease
    assert not is_alive(MemberView.of(record("worker", 0, {}, pid=66)), 1.0, 5.0, here)
    assert is_alive(MemberView.of(record("worker", 0, {}, pid=66, host="node-b")), 1.0, 5.0, here)
    for state in ("exited", "failed"):
        assert not is_alive(MemberView.of(record("worker", 0, {}, state=state)), 1.0, 5.0, here)


def test_progress_and_status_agree_on_the_same_records():
    members = member_views([
        record("launcher", 0, {"phase": "train", "recoveries": []}, heartbeat=99.5),
        record("server", 0, {"phase": "serving", "version": 8, "serving_since": 1.0}),
        record("server", 1, {"phase": "serving", "version": 7}, heartbeat=90.0),  # silent 10 s
        record("worker", 0, {"clock": 8, "loss": 0.5, "samples_per_s": 100.0}),
        record("worker", 1, {"clock": 7, "loss": 0.5, "samples_per_s": 90.0}, pid=66),  # gone
        record("worker", 2, {"clock": 10, "loss": 0.5, "samples_per_s": 80.0}, state="exited"),
        record("worker", 3, {"clock": 4, "loss": 0.5, "samples_per_s": 70.0}, state="failed"),
    ])  # fmt: skip
    run = observe(None, RUN, members, POLICY, now=100.0, here=Here(HOST, lambda pid: pid != 66))
    cfg = {"mode": "bsp", "shards": 2, "workers": 4, "steps": 10}
    status = status_of(RunRecord(RUN, cfg, 0.0, False, None), run, "sqlite:///x")
    alive = {(m["role"], m["id"]): m["alive"] for m in status["members"]}
    assert alive == {
        ("launcher", 0): True, ("server", 0): True, ("server", 1): False, ("worker", 0): True,
        ("worker", 1): False, ("worker", 2): False, ("worker", 3): False,
    }  # fmt: skip
    out = io.StringIO()
    with ProgressView(RunConfig(run_id=RUN, steps=10), out) as view:
        view.update(run)
    (line,) = out.getvalue().splitlines()
    assert line == (
        "tether: w0 8/10 loss 0.500 100/s | w1 7/10 loss 0.500 90/s (no process) | "
        "w2 10/10 loss 0.500 80/s | w3 4/10 loss 0.500 70/s (failed) | shard 1 (silent 10s)"
    )
    # Every member the line marks is one status calls not alive (an exited one is not news).
    marked = {("worker", 1), ("worker", 3), ("server", 1)}
    assert marked <= {k for k, a in alive.items() if not a}
    assert {k for k, a in alive.items() if not a} - marked == {("worker", 2)}


def test_status_reads_the_store_once_and_applies_the_run_s_lease(tmp_path):
    store = open_store(default_store_uri(tmp_path))
    config = RunConfig.of(RUN, lease_s=2.5).to_dict()
    store.create_run(RUN, config)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here = socket.gethostname()
    store.register(RUN, "server", 0, address="a:1", pid=os.getpid(), host=here)
    store.register(RUN, "worker", 0, address="", pid=gone.pid, host=here)
    store.close()
    assert run_liveness(config).lease_s == 2.5
    assert run_liveness({"lease_s": 40.0, "from": "another version"}) == LivenessPolicy(
        lease_s=40.0, lease_cap_s=40.0
    )
    status = run_status(run_dir=tmp_path, store_uri=None, run_id=RUN)
    alive = {(m["role"], m["id"]): m["alive"] for m in status["members"]}
    assert alive == {("server", 0): True, ("worker", 0): False}


@pytest.mark.parametrize("role", ["server", "worker", "launcher"])
def test_a_view_of_a_record_is_frozen(role):
    view = MemberView.of(record(role, 0, {}))
    with pytest.raises(AttributeError):
        view.epoch = 2  # type: ignore[misc]

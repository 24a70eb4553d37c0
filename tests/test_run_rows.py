"""A run's members as rows, the one renderer of a `RunView`, and `tether status --watch`'s loop
driven with records made by hand (DESIGN §9, §13)."""

from __future__ import annotations

import io
import math

import pytest

from helpers import RUN
from tether.cli.watch import EXIT_INTERRUPTED, launcher_gone, watch
from tether.config import LivenessPolicy
from tether.exitcodes import EXIT_FAILED, EXIT_OK
from tether.member.rows import COLUMNS, cause_label, header, rows, text_table
from tether.member.view import Here, RunView, member_views, observe
from tether.store import Member, RunRecord

HOST = "node-a"
HERE = Here(HOST, lambda pid: pid != 66)
CONFIG = {"mode": "ssp", "staleness": 2, "shards": 1, "workers": 2, "steps": 100}
SIGKILLED = {
    "role": "server", "id": 0, "exit_code": -9, "epoch": 1, "t": 95.0,
    "cause": "exited", "detail": "exited with code -9 (SIGKILL)", "recovery_s": 0.4,
}  # fmt: skip


def record(role: str, mid: int, info: dict, *, epoch: int = 1, heartbeat: float = 100.0,
           state: str = "running", pid: int = 10) -> Member:  # fmt: skip
    return Member(RUN, role, mid, epoch, f"{HOST}:1", pid, HOST, 90.0, heartbeat, state, info)


def seen(members: list[Member], now: float, previous: RunView | None = None) -> RunView:
    return observe(previous, RUN, member_views(members), LivenessPolicy(), now=now, here=HERE)


def shard(version: int, heartbeat: float, *, epoch: int = 1) -> Member:
    info = {"phase": "serving", "version": version, "durable_version": version - 3,
            "replication_lag_max_s": 0.25, "serving_since": 91.0}  # fmt: skip
    return record("server", 0, info, epoch=epoch, heartbeat=heartbeat)


def worker(mid: int, clock: int, heartbeat: float, **more: object) -> Member:
    info = {"clock": clock, "loss": 0.5, "samples_per_s": 640.0, "wait_s": 1.5,
            "resumed_at": 92.0, **more}  # fmt: skip
    return record("worker", mid, info, heartbeat=heartbeat)


def test_rates_are_progress_over_the_heartbeats_between_two_reads():
    first = seen([shard(40, 100.0), worker(0, 20, 100.0), worker(1, 18, 100.0)], now=100.2)
    second = seen([shard(60, 101.0), worker(0, 30, 101.0), worker(1, 18, 100.0)], now=101.2,
                  previous=first)  # fmt: skip
    by_name = {r.name: r for r in rows(second, first)}
    assert by_name["shard 0"].rate == pytest.approx(20.0)  # updates per second
    assert by_name["worker 0"].rate == pytest.approx(10.0)  # steps per second
    assert by_name["worker 1"].rate is None  # no heartbeat between the two reads: no news
    assert all(r.rate is None for r in rows(first))  # one read: no rate yet
    s = by_name["shard 0"]
    assert (s.clock, s.lag_entries, s.lag_max_s, s.phase) == (60, 3, 0.25, "serving")
    w = by_name["worker 0"]
    assert (w.clock, w.loss, w.wait_s, w.phase, w.alive) == (30, 0.5, 1.5, "training", True)
    assert w.cells() == ("worker 0", "training", "yes", "30", "10.0", "1.5s", "-", "0", "0.5000")
    assert s.cells()[3:7] == ("60", "20.0", "-", "3 (max 0.25s)")


def test_a_restarted_member_shows_its_restarts_and_causes_and_no_rate_across_epochs():
    before = seen([shard(40, 100.0)], now=100.2)
    replaced = shard(41, 101.0, epoch=2)
    launcher = record("launcher", 0, {"phase": "train", "recoveries": [SIGKILLED]})
    after = seen([replaced, launcher], now=101.2, previous=before)
    s, lau = rows(after, before)
    assert (s.restarts, s.causes, s.rate) == (1, ("SIGKILL",), None)  # a new registration
    assert s.cells()[7] == "1 (SIGKILL)"
    assert (lau.name, lau.restarts, lau.phase) == ("launcher 0", 0, "train")
    # The summary's recoveries win once the run has one; a run with no launcher has epochs.
    probed = {**SIGKILLED, "cause": "probe_failed", "exit_code": -9}
    (s,) = rows(seen([replaced], now=101.2), None, [probed, {**SIGKILLED, "epoch": 2}])
    assert (s.restarts, s.causes) == (2, ("probe_failed", "SIGKILL"))
    assert rows(seen([replaced], now=101.2))[0].restarts == 1
    assert cause_label({"cause": "exited", "exit_code": 1, "detail": "exited with code 1"}) == (
        "exit 1"
    )


def test_a_member_with_no_numbers_yet_is_a_row_of_dashes():
    starting = [record("server", 0, {"phase": "starting"}), record("worker", 1, {})]
    table = rows(seen(starting, now=100.0))
    assert [(r.name, r.phase, r.clock, r.loss, r.lag_entries) for r in table] == [
        ("shard 0", "starting", None, None, None),
        ("worker 1", "starting", None, None, None),
    ]
    assert table[1].cells() == ("worker 1", "starting", "yes", "-", "-", "-", "-", "0", "-")
    lines = text_table([r.cells() for r in table])
    assert lines[0].split() == ["member", "phase", "alive", "clock", "rate/s", "waits", "repl",
                                "lag", "restarts", "loss"]  # fmt: skip
    assert len(lines) == 3 and len(COLUMNS) == 9


def test_not_alive_says_why_and_the_header_counts_the_slowest_worker():
    run = seen([worker(0, 30, 100.0), worker(1, 12, 100.0, loss=math.nan),
                record("worker", 2, {"clock": 5}, pid=66), shard(9, 90.0)],
               now=100.5)  # fmt: skip
    by_name = {r.name: r for r in rows(run)}
    assert by_name["worker 2"].cells()[2] == "no process"
    assert by_name["shard 0"].cells()[2] == "silent 10s"
    assert by_name["worker 1"].cells()[8] == "-"  # a nan loss is not a number to show
    h = header(RunRecord(RUN, {**CONFIG, "workers": 3}, 80.0, False, None), run)
    assert (h.done, h.steps, h.elapsed_s) == (5, 100, 20.5)
    assert h.text() == f"run {RUN}: ssp(2), 1 shards, 3 workers; step 5/100 (5%); 20.5s; running"
    # Until every worker has reported, no step is done.
    h = header(RunRecord(RUN, {**CONFIG, "workers": 4}, 80.0, False, None), run)
    assert h.done == 0


# -- the --watch loop ---------------------------------------------------------------------------


def reads(*frames: tuple[RunRecord, RunView]):
    """A read function that returns the frames in turn (the last again and again)."""
    seen_previous: list[RunView | None] = []

    def read(previous: RunView | None) -> tuple[RunRecord, RunView]:
        seen_previous.append(previous)
        return frames[min(len(seen_previous) - 1, len(frames) - 1)]

    return read, seen_previous


def test_watch_prints_a_plain_line_per_read_and_exits_0_once_the_run_finished():
    launcher = record("launcher", 0, {"phase": "train"}, pid=10)
    going = RunRecord(RUN, CONFIG, 80.0, False, None)
    summary = {"final_loss": 0.125, "test_accuracy": 0.975, "wall_s": 21.0,
               "restarts": {"server": 1, "worker": 0}, "recoveries": [SIGKILLED]}  # fmt: skip
    done = RunRecord(RUN, CONFIG, 80.0, True, summary)
    one = seen([shard(40, 100.0), worker(0, 20, 100.0), worker(1, 20, 100.0), launcher], 100.2)
    two = seen([shard(60, 101.0, epoch=2), worker(0, 30, 101.0), worker(1, 30, 101.0), launcher],
               101.2, one)  # fmt: skip
    read, previous = reads((going, one), (done, two))
    out, sleeps = io.StringIO(), []
    assert watch(read, 0.5, out=out, here=HERE, sleep=sleeps.append) == EXIT_OK
    assert previous == [None, one] and sleeps == [0.5]  # each read updates the one before
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()  # not a terminal: no ANSI codes
    assert lines[0].startswith(f"run {RUN}: ssp(2), 1 shards, 2 workers; step 20/100 (20%)")
    assert "| worker 0 clock 20 loss 0.5000 |" in lines[0]
    assert "| shard 0 v60 lag 3 restarts 1 (SIGKILL) |" in lines[1]
    assert "| worker 0 clock 30 10.0/s loss 0.5000 |" in lines[1]
    assert lines[2] == (
        f"run {RUN} finished: final loss 0.1250, test accuracy 0.9750, 21.0s, "
        "restarts 1 shard, 0 worker"
    )


def test_watch_exits_1_when_the_launcher_is_gone_and_130_on_ctrl_c():
    going = RunRecord(RUN, CONFIG, 80.0, False, None)
    dead = seen([record("launcher", 0, {"phase": "train"}, pid=66)], 100.2)
    assert launcher_gone(dead, HERE) == "launcher 0 (pid 66) is no longer running"
    out = io.StringIO()
    assert watch(reads((going, dead))[0], 1.0, out=out, here=HERE) == EXIT_FAILED
    assert out.getvalue().splitlines()[-1] == (
        f"run {RUN} ended without finishing: launcher 0 (pid 66) is no longer running"
    )
    # A driverless run (no launcher) and a silent launcher are watched on.
    silent = seen([record("launcher", 0, {}, heartbeat=50.0)], 100.2)
    assert launcher_gone(silent, HERE) is None and launcher_gone(seen([], 100.0), HERE) is None

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    alive = seen([record("launcher", 0, {"phase": "train"})], 100.2)
    assert watch(reads((going, alive))[0], 1.0, out=io.StringIO(), here=HERE,
                 sleep=interrupt) == EXIT_INTERRUPTED  # fmt: skip

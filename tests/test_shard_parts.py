"""The pieces the shard core is made of (STYLE §2-3): the log cursor, the dense table, the
membership, the replica's table-prefixed encoding and the report. Each keeps its own invariants,
checked by its `validate()` after every event; a log written before tables existed is still
recovered bit for bit."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.config import OptimizerConfig, ReplicationPolicy, RunConfig
from tether.consistency import Consistency, Mode
from tether.member.report import ShardNumbers
from tether.server.codec import from_replica, recover, to_replica
from tether.server.log import LogCursor
from tether.server.main import initial_params, shard_spec
from tether.server.membership import ClockTable, Membership
from tether.server.messages import Ack, Code, PushHeader, Reject, Serve, Wait
from tether.server.report import ServingCounters, ShardReport
from tether.server.spec import ShardSpec
from tether.server.state import ShardState
from tether.server.tables import DenseSlice
from tether.store import open_store
from tether.store.base import LogEntry, ShardLog, ShardSnapshot

RUN = "run-parts"
N = 12
LEGACY = Path(__file__).parent / "data" / "legacy-log-9dab2e8"


def grad(seed: int, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


# ---- the log cursor ---------------------------------------------------------------------------


def entry(position: int) -> LogEntry:
    return LogEntry(position, {"version": position}, {"dense.grad": grad(position)})


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(["sync", "async", "off"]),
    ops=st.lists(st.sampled_from(["apply", "replicate", "some", "base", "tick"]), max_size=40),
)
def test_the_log_cursor_keeps_its_invariants_after_every_event(mode, ops) -> None:
    cursor = LogCursor(ReplicationPolicy(mode, every_updates=3, interval_s=0.5))
    version, now = 0, 0.0
    for op in ops:
        if op == "apply":
            cursor.changed(now)
            version += 1
            cursor.applied(0.001)
            if cursor.logs:
                cursor.append(entry(version))
        elif op in ("replicate", "some") and cursor.unlogged:
            batch = cursor.batch()
            upto = batch[-1] if op == "replicate" else batch[0]
            before = cursor.durable_version
            lag = cursor.replicated(upto.position, now)
            assert cursor.durable_version == upto.position > before
            assert lag is not None and lag >= 0
            assert cursor.replicated(upto.position, now) is None  # a repeat moves nothing
        elif op == "base" and cursor.durable_version > cursor.base_version:
            cursor.base_saved(cursor.durable_version)
            assert not cursor.since_base and cursor.replay_estimate_s() == 0
        now += 0.2
        cursor.validate(version)
        needed = cursor.durable_needed(version)
        assert needed == {"sync": version, "async": max(0, version - 3), "off": 0}[mode]
        if mode == "off":
            assert not cursor.unlogged and not cursor.replication_due(now)
        elif mode == "sync":
            assert cursor.replication_due(now) == bool(cursor.unlogged)


def test_the_log_cursor_refuses_a_gap_and_a_durable_version_past_the_state() -> None:
    cursor = LogCursor(ReplicationPolicy("sync"))
    cursor.append(entry(1))
    cursor.validate(1)
    cursor.append(entry(3))  # version 2 was never logged
    with pytest.raises(AssertionError):
        cursor.validate(3)
    ahead = LogCursor(ReplicationPolicy("sync"))
    ahead.append(entry(1))
    ahead.replicated(1, 0.0)
    with pytest.raises(AssertionError):
        ahead.validate(0)  # durable past the state's version


def test_async_appends_fall_due_by_count_or_by_time() -> None:
    cursor = LogCursor(ReplicationPolicy("async", every_updates=2, interval_s=1.0))
    cursor.changed(10.0)
    cursor.append(entry(1))
    assert not cursor.replication_due(10.5) and cursor.wait_s(10.5) == pytest.approx(0.5)
    assert cursor.replication_due(11.0)
    cursor.append(entry(2))
    assert cursor.replication_due(10.1)  # two entries behind
    assert cursor.replicated(2, 10.1) == pytest.approx(0.1)
    assert cursor.wait_s(10.1) is None and not cursor.replication_due(99.0)


# ---- the dense table ----------------------------------------------------------------------------


def dense(optimizer: str = "adam", keeps_previous: bool = True) -> DenseSlice:
    return DenseSlice(
        np.linspace(-1, 1, N, dtype=np.float32),
        OptimizerConfig(optimizer, lr=0.05),
        offset=0,
        keeps_previous=keeps_previous,
    )


def image(table: DenseSlice) -> tuple[bytes, ...]:
    opt = table.optimizer.state_arrays()
    return (table.params.tobytes(), *(opt[k].tobytes() for k in sorted(opt)))


@settings(max_examples=30, deadline=None)
@given(
    optimizer=st.sampled_from(["sgd", "momentum", "adam"]),
    clocks=st.lists(st.permutations([0, 1, 2]), min_size=1, max_size=6),
)
def test_a_dense_slice_replayed_from_its_log_parts_equals_the_live_one(optimizer, clocks) -> None:
    live, replayed = dense(optimizer), dense(optimizer)
    for clock, order in enumerate(clocks):
        for w in order:  # arrival order differs from clock to clock
            live.hold(w, grad(100 * clock + w))
            live.validate()
        assert list(live.held()) == [0, 1, 2]
        before = live.params.copy()
        part = live.apply(live.aggregate((0, 1, 2)))
        live.validate()
        assert not live.held() and np.array_equal(live.prev_params, before)
        replayed.replay(part)
        replayed.validate()
        assert image(replayed) == image(live)
        # Served: the previous version to a worker redoing the clock, the current to the rest.
        assert b"".join(live.serve(True, None)) == before.tobytes()
        assert b"".join(live.serve(False, None)) == live.params.tobytes()


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_the_aggregate_is_summed_in_id_order_whatever_the_arrival(order) -> None:
    reference, table = dense(), dense()
    for w in range(3):
        reference.hold(w, grad(w))
    for w in order:
        table.hold(w, grad(w))
    expected = ((grad(0) + grad(1)) + grad(2)) / np.float32(3)
    got = table.aggregate((0, 1, 2))
    assert got.tobytes() == reference.aggregate((0, 1, 2)).tobytes() == expected.tobytes()
    assert reference.pending == {} and table.pending == {}


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros(N, np.float64), "not a flat float32 vector"),
        (np.zeros(N + 1, np.float32), "not a flat float32 vector"),
        (np.zeros((2, N // 2), np.float32), "not a flat float32 vector"),
        (np.array([np.nan] + [0.0] * (N - 1), np.float32), "NaN or Inf"),
        (np.array([np.inf] + [0.0] * (N - 1), np.float32), "NaN or Inf"),
    ],
)
def test_a_bad_part_is_refused_and_changes_nothing(bad, message) -> None:
    table = dense()
    before = image(table)
    refused = table.check(bad, "worker 0 at clock 0")
    assert isinstance(refused, Reject) and refused.code is Code.INVALID_ARGUMENT
    assert message in refused.message and image(table) == before
    assert table.check(grad(1), "worker 0 at clock 0") is None


def test_a_dense_base_loads_back_into_a_slice_that_goes_on_identically() -> None:
    table = dense()
    for seed in range(3):
        table.apply(grad(seed))
    meta, arrays = table.base_parts()
    assert set(arrays) >= {"params", "prev_params"} and "optimizer_scalars" in meta
    copy = dense()
    copy.load(meta, {k: a.copy() for k, a in arrays.items()})
    copy.validate()
    assert image(copy) == image(table) and copy.nbytes == table.nbytes
    table.apply(grad(9))
    copy.apply(grad(9))
    assert image(copy) == image(table)
    with pytest.raises(ValueError):
        dense().load(meta, {**arrays, "params": np.zeros(N + 1, np.float32)})


# ---- the membership ----------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [(), (1, 1), (2, 1), (-1, 0)])
def test_a_membership_is_a_sorted_set_of_distinct_ids(ids) -> None:
    with pytest.raises(ValueError):
        Membership(0, ids)


def test_the_clock_table_is_keyed_by_worker_id_and_refuses_others() -> None:
    table = ClockTable(Membership(0, (3, 7, 11)))
    assert list(table) == [3, 7, 11] and table.clocks() == {3: 0, 7: 0, 11: 0}
    refused = table.check(0)
    assert isinstance(refused, Reject) and "unknown worker 0" in refused.message
    assert "workers 3, 7, 11" in refused.message and table.check(7) is None
    table[7].last_seq = 4
    table.validate()
    table[7].last_seq = 2  # an accepted seq accepted again
    with pytest.raises(AssertionError):
        table.validate()


def spec(mode: Mode, ids: tuple[int, ...], replication: str = "sync") -> ShardSpec:
    consistency = Consistency(mode, 1 if mode is Mode.SSP else 0)
    return ShardSpec(
        RUN, 0, 0, N, len(ids), consistency, OptimizerConfig("adam", lr=0.05),
        replication=ReplicationPolicy(replication), worker_ids=ids,
    )  # fmt: skip


def push(state: ShardState, w: int, clock: int, seed: int) -> Ack | Reject:
    h = PushHeader(RUN, w, clock, clock, state.version, state.epoch, N)
    result = state.push(h, grad(seed), 0.0)
    state.validate()
    return result


@pytest.mark.parametrize("mode", [Mode.BSP, Mode.SSP, Mode.ASP])
def test_a_shard_of_workers_3_7_11_computes_what_workers_0_1_2_do(mode) -> None:
    """No code outside the membership takes worker ids for positions: the same pushes under
    other ids give the same bits, and BSP sums in the order of the ids."""
    ids = (3, 7, 11)
    other = ShardState(spec(mode, ids), np.linspace(-1, 1, N, dtype=np.float32))
    plain = ShardState(spec(mode, (0, 1, 2)), np.linspace(-1, 1, N, dtype=np.float32))
    for clock in range(3):
        for position in (2, 0, 1):
            seed = 10 * clock + position
            assert push(other, ids[position], clock, seed) == push(plain, position, clock, seed)
    assert other.params.tobytes() == plain.params.tobytes() and other.version == plain.version
    refused = push(other, 0, 0, 0)
    assert isinstance(refused, Reject) and refused.code is Code.INVALID_ARGUMENT
    assert [w.worker_id for w in other.report().workers] == list(ids)
    assert other.unlogged[-1].meta["membership"] == {"version": 0, "ids": list(ids)}


def test_a_pull_waits_for_and_names_the_slow_worker_by_id() -> None:
    state = ShardState(spec(Mode.SSP, (4, 9)), np.zeros(N, np.float32))
    for clock in range(2):
        push(state, 9, clock, clock)
    waiting = state.pull(RUN, 9, 2, 0.0)
    state.validate()
    assert waiting == Wait((4,))
    refusal = state.pull_timed_out(9, 2, 5.0, 10.0)
    assert "worker 4 at clock 0" in refusal.message
    assert isinstance(state.pull(RUN, 4, 0, 0.0), Serve)
    late = state.push_timed_out(9, 1, 3.0)
    assert late.code is Code.DEADLINE_EXCEEDED


def test_a_log_recovers_only_under_the_membership_it_was_written_with() -> None:
    ids = (3, 7, 11)
    live = ShardState(spec(Mode.BSP, ids), np.zeros(N, np.float32))
    for w in ids:
        push(live, w, 0, w)
    log = ShardLog(None, list(live.unlogged), last_epoch=1)
    back = recover(spec(Mode.BSP, ids), 2, log, lambda: np.zeros(N, np.float32))
    back.validate()
    assert back.params.tobytes() == live.params.tobytes() and back.clocks == live.clocks
    with pytest.raises(ValueError, match="replicated state has workers 3, 7, 11"):
        recover(spec(Mode.BSP, (0, 1, 2)), 2, log, lambda: np.zeros(N, np.float32))


# ---- the replica's encoding ---------------------------------------------------------------------


def test_a_base_names_every_array_by_its_table_and_records_the_membership() -> None:
    live = ShardState(spec(Mode.BSP, (0, 1)), np.linspace(0, 1, N, dtype=np.float32))
    for clock in range(2):
        for w in (0, 1):
            push(live, w, clock, 10 * clock + w)
    meta, arrays = to_replica(live)
    assert all(name.startswith("dense.") for name in arrays)
    assert {"dense.params", "dense.prev_params"} <= set(arrays)
    assert set(meta["tables"]) == {"dense"} and "optimizer_scalars" in meta["tables"]["dense"]
    assert meta["membership"] == {"version": 0, "ids": [0, 1]}
    back = from_replica(live.spec, 2, meta, arrays)
    back.validate()
    assert back.params.tobytes() == live.params.tobytes()
    assert back.prev_params.tobytes() == live.prev_params.tobytes()
    assert back.clocks == live.clocks and back.version == live.version == back.durable_version


def legacy(meta: dict, arrays: dict) -> tuple[dict, dict]:
    """A replica as the shard wrote it before tables: unprefixed arrays, scalars on top."""
    old = {k: v for k, v in meta.items() if k not in ("membership", "tables")}
    if "tables" in meta:
        old["optimizer_scalars"] = meta["tables"]["dense"]["optimizer_scalars"]
    return old, {name.removeprefix("dense."): a for name, a in arrays.items()}


@pytest.mark.parametrize("mode", [Mode.BSP, Mode.ASP])
def test_a_replica_in_the_format_before_tables_is_recovered_bit_for_bit(mode) -> None:
    live = ShardState(spec(mode, (0, 1)), np.linspace(0, 1, N, dtype=np.float32))
    for clock in range(2):
        for w in (0, 1):
            push(live, w, clock, 10 * clock + w)
    meta, arrays = legacy(*to_replica(live))
    base = ShardSnapshot(RUN, 0, 1, live.version, meta, arrays)
    live.replicated(live.version, 0.0)
    for w in (0, 1):
        push(live, w, 2, 20 + w)
    entries = [LogEntry(e.position, *legacy(e.meta, e.arrays)) for e in live.unlogged]
    assert all("grad" in e.arrays for e in entries)
    back = recover(live.spec, 2, ShardLog(base, entries, 1), lambda: np.zeros(N, np.float32))
    back.validate()
    assert back.params.tobytes() == live.params.tobytes() and back.clocks == live.clocks
    assert back.version == live.version and back.stats == live.stats


def test_a_log_written_by_the_shard_before_tables_is_recovered(tmp_path: Path) -> None:
    """tests/data/legacy-log-9dab2e8: a run's SQLite store (a base and its log for shard 0, a
    log for shard 1) and its exported final parameters, written by the shard as it was at
    9dab2e8: `tether launch --model logreg --shards 2 --workers 2 --steps 12 --seed 4
    --replication sync --compaction-budget-ms 0.001 --export final.npz`."""
    shutil.copytree(LEGACY, tmp_path / "run")
    store = open_store(f"sqlite:///{tmp_path / 'run' / 'tether.db'}")
    try:
        [record] = store.list_runs()
        config = RunConfig.from_dict(record.config)
        final = np.load(tmp_path / "run" / "final.npz")["params"]
        bases = []
        for shard in range(config.shards):
            s = shard_spec(config, shard)
            log = store.load_shard_log(config.run_id, shard)
            state = recover(s, 2, log, lambda s=s: initial_params(config, s.offset, s.length))
            state.validate()
            bases.append(log.base_version)
            assert state.version == 12 and state.clocks == {0: 12, 1: 12}
            assert state.params.tobytes() == final[s.offset : s.offset + s.length].tobytes()
        assert max(bases) > 0  # one shard started from a base, not only from the log
    finally:
        store.close()


# ---- the report ------------------------------------------------------------------------------


def test_the_report_is_the_one_source_of_info_and_the_heartbeat() -> None:
    state = ShardState(spec(Mode.SSP, (2, 5), "async"), np.zeros(N, np.float32))
    push(state, 2, 0, 1)
    push(state, 5, 0, 2)
    state.pull(RUN, 2, 1, 0.0)
    counters = ServingCounters(pull_wait_s=1.5, segment_pulls=2, segment_pushes=3, waiting=1)
    report = state.report(counters)
    back = ShardReport.from_info(report.info_reply())
    carried = {"base_version", "log_entries", "recovered", "waiting"}
    for name in ShardReport.__dataclass_fields__:
        if name not in carried:
            assert getattr(back, name) == getattr(report, name), name
    assert report.clocks == [1, 1] and report.pushes_accepted == 2 and report.pulls_served == 1
    assert report.segment_pushes == 3 and report.pull_wait_s == 1.5
    beat = report.heartbeat(serving_since=7.0)
    assert set(beat) == {
        "version",
        "durable_version",
        "replication_lag_max_s",
        "updates_applied",
        "clocks",
        "max_clock_gap",
        "base_version",
        "log_entries",
        "restored_version",
        "serving_since",
    }  # fmt: skip  (nothing recovered: a fresh shard publishes no "recovered")
    assert beat["clocks"] == [1, 1] and beat["version"] == 2
    numbers = ShardNumbers.from_info(beat)  # what every reader parses, MemberView included
    assert numbers.clocks == (1, 1) and numbers.serving_since == 7.0 and numbers.recovered is None

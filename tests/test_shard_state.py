"""The sans-I/O shard (STYLE §2-3): every decision tested without sockets or a database.

`validate()` runs after every event; rejected events must leave the state untouched.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.config import OptimizerConfig
from tether.consistency import Consistency, Mode
from tether.server.state import (
    Ack,
    Code,
    PushHeader,
    Reject,
    Serve,
    ShardSpec,
    ShardState,
    Stop,
    Wait,
    split_ranges,
)

RUN = "run-1"
N = 10


def make_state(mode=Mode.SSP, staleness=0, workers=3, n=N, optimizer="sgd", lr=0.5, offset=0):
    consistency = Consistency(mode, staleness if mode is Mode.SSP else 0)
    spec = ShardSpec(RUN, 0, offset, n, workers, consistency, OptimizerConfig(optimizer, lr=lr))
    return ShardState(spec, np.arange(n, dtype=np.float32) / 7, epoch=1)


def header(state, w, clock, seq=None, length=None, **kw):
    fields = dict(
        run_id=RUN,
        worker_id=w,
        clock=clock,
        seq=clock if seq is None else seq,
        read_version=state.version,
        epoch=state.epoch,
        length=state.spec.length if length is None else length,
    )
    fields.update(kw)
    return PushHeader(**fields)


def grad_for(w, clock, n=N):
    return np.random.default_rng([w, clock]).standard_normal(n).astype(np.float32)


def fingerprint(state):
    return (
        state.params.tobytes(),
        state.version,
        state.epoch,
        tuple(state.clocks.items()),
        tuple((w, e.last_seq) for w, e in state.workers.items()),
        tuple(sorted(state.pending)),
        state.optimizer.state_arrays().__repr__(),
        state.stats.pushes_accepted,
    )


def push(state, w, clock, **kw):
    result = state.push(header(state, w, clock, **kw), grad_for(w, clock, state.spec.length), 0.0)
    state.validate()
    return result


def pull(state, w, clock):
    result = state.pull(RUN, w, clock, 0.0)
    state.validate()
    return result


def test_split_ranges_are_balanced_and_contiguous():
    for total, parts in [(10, 3), (7, 7), (1000, 6)]:
        ranges = split_ranges(total, parts)
        assert ranges[0][0] == 0 and sum(n for _, n in ranges) == total
        assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert max(n for _, n in ranges) - min(n for _, n in ranges) <= 1
    with pytest.raises(ValueError):
        split_ranges(2, 3)


def test_bsp_holds_gradients_until_all_workers_pushed_then_applies_the_average_once():
    state = make_state(Mode.BSP, workers=3)
    before = state.params.copy()
    for w in (2, 0):
        ack = push(state, w, 0)
        assert isinstance(ack, Ack) and not ack.applied
        assert state.version == 0 and np.array_equal(state.params, before)
    ack = push(state, 1, 0)
    assert isinstance(ack, Ack) and ack.applied and state.version == 1
    g = (grad_for(0, 0) + grad_for(1, 0)) + grad_for(2, 0)
    expected = before - np.float32(0.5) * (g / np.float32(3))
    np.testing.assert_array_equal(state.params, expected.astype(np.float32))


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_bsp_result_does_not_depend_on_arrival_order(order):
    reference = make_state(Mode.BSP, optimizer="adam", lr=0.1)
    state = make_state(Mode.BSP, optimizer="adam", lr=0.1)
    for clock in range(3):
        for w in range(3):
            push(reference, w, clock)
        for w in order:
            push(state, w, clock)
    assert state.params.tobytes() == reference.params.tobytes()


def test_bsp_pull_for_the_next_clock_waits_until_the_clock_is_applied():
    state = make_state(Mode.BSP, workers=2)
    assert isinstance(pull(state, 0, 0), Serve)
    push(state, 0, 0)
    waiting = pull(state, 0, 1)
    assert waiting == Wait((1,))
    assert isinstance(pull(state, 1, 0), Serve)
    push(state, 1, 0)
    served = pull(state, 0, 1)
    assert isinstance(served, Serve) and served.version == 1 and served.clock_gap == 0
    assert state.stats.max_clock_gap == 0


def test_ssp_worker_blocks_when_s_plus_one_ahead_and_resumes_when_the_straggler_catches_up():
    s = 2
    state = make_state(Mode.SSP, staleness=s, workers=2)
    for clock in range(s + 1):
        served = pull(state, 0, clock)
        assert isinstance(served, Serve) and served.clock_gap == clock
        push(state, 0, clock)
    assert pull(state, 0, s + 1) == Wait((1,))  # s+1 ahead of worker 1: blocked
    pull(state, 1, 0)
    push(state, 1, 0)  # the straggler completes one iteration
    served = pull(state, 0, s + 1)
    assert isinstance(served, Serve) and served.clock_gap == s
    assert state.stats.max_clock_gap == s


def test_ssp_applies_on_arrival_and_records_version_staleness():
    state = make_state(Mode.SSP, staleness=5, workers=2)
    h0 = header(state, 0, 0)  # both read version 0
    h1 = header(state, 1, 0)
    assert state.push(h0, grad_for(0, 0), 0.0).applied
    assert state.push(h1, grad_for(1, 0), 0.0).applied
    state.validate()
    assert state.version == 2
    assert state.stats.staleness_hist == [1, 1]  # one fresh gradient, one a version stale


def test_asp_never_waits():
    state = make_state(Mode.ASP, workers=2)
    for clock in range(20):
        assert isinstance(pull(state, 0, clock), Serve)
        push(state, 0, clock)
    assert state.stats.max_clock_gap == 19


def test_a_retried_push_is_acknowledged_as_duplicate_and_changes_nothing():
    state = make_state(Mode.ASP, workers=2)
    h = header(state, 0, 0)
    first = state.push(h, grad_for(0, 0), 0.0)
    before = fingerprint(state)
    again = state.push(h, grad_for(0, 0), 0.0)
    state.validate()
    assert first == Ack(1, 1, applied=True)
    assert again.duplicate and again.version == 1
    assert fingerprint(state) == before


def test_bsp_duplicate_of_a_pending_push_reports_not_applied():
    state = make_state(Mode.BSP, workers=2)
    h = header(state, 0, 0)
    state.push(h, grad_for(0, 0), 0.0)
    again = state.push(h, grad_for(0, 0), 0.0)
    assert again.duplicate and not again.applied


BAD_PUSHES = {
    "unknown run": (dict(run_id="other"), Code.INVALID_ARGUMENT, "unknown run"),
    "unknown worker": (dict(worker_id=7), Code.INVALID_ARGUMENT, "unknown worker 7"),
    "negative worker": (dict(worker_id=-1), Code.INVALID_ARGUMENT, "unknown worker"),
    "wrong size": (dict(length=N + 1), Code.INVALID_ARGUMENT, "elements"),
    "stale epoch": (dict(epoch=0), Code.FAILED_PRECONDITION, "stale epoch"),
    "clock from the future": (dict(clock=5, seq=5), Code.FAILED_PRECONDITION, "future"),
    "version from the future": (dict(read_version=99), Code.INVALID_ARGUMENT, "read version"),
}


@pytest.mark.parametrize("case", sorted(BAD_PUSHES))
def test_bad_pushes_get_a_precise_code_and_change_nothing(case):
    overrides, code, words = BAD_PUSHES[case]
    state = make_state(Mode.SSP, staleness=1, workers=2)
    push(state, 0, 0)
    before = fingerprint(state)
    h = header(state, 0, 1)
    fields = {f: getattr(h, f) for f in h.__dataclass_fields__} | overrides
    result = state.push(PushHeader(**fields), grad_for(0, 1), 0.0)
    state.validate()
    assert isinstance(result, Reject) and result.code is code and words in result.message
    assert fingerprint(state) == before


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradients_are_rejected_and_change_nothing(bad):
    state = make_state(Mode.SSP, staleness=1, workers=2)
    before = fingerprint(state)
    g = grad_for(0, 0)
    g[3] = bad
    result = state.push(header(state, 0, 0), g, 0.0)
    assert isinstance(result, Reject) and result.code is Code.INVALID_ARGUMENT
    assert "NaN or Inf" in result.message
    assert fingerprint(state) == before


def test_huge_finite_gradients_are_not_mistaken_for_inf():
    state = make_state(Mode.ASP, workers=1, optimizer="sgd", lr=1e-30)
    g = np.full(N, 3e38, dtype=np.float32)  # the sum overflows, every element is finite
    assert isinstance(state.push(header(state, 0, 0), g, 0.0), Ack)


def test_an_old_clock_with_a_new_seq_is_aborted():
    state = make_state(Mode.ASP, workers=1)
    push(state, 0, 0)
    result = state.push(header(state, 0, 0, seq=1), grad_for(0, 0), 0.0)
    assert isinstance(result, Reject) and result.code is Code.ABORTED


def test_ssp_and_asp_admit_a_pull_one_clock_ahead_of_the_pushes_received_bsp_does_not():
    """A worker overlapping communication pulls clock c while its push of c-1 is in flight:
    SSP and ASP admit it under the usual bound (the in-flight push counts as not received);
    BSP, which never overlaps, still calls it a clock from the future."""
    ssp0 = make_state(Mode.SSP, staleness=0, workers=1)
    assert isinstance(pull(ssp0, 0, 0), Serve)
    assert pull(ssp0, 0, 1) == Wait((0,))  # SSP(0): waits for its own push of clock 0
    push(ssp0, 0, 0)
    assert isinstance(pull(ssp0, 0, 1), Serve)
    asp = make_state(Mode.ASP, workers=2)
    served = pull(asp, 0, 1)
    assert isinstance(served, Serve) and served.clock_gap == 1
    assert pull(asp, 0, 2).code is Code.FAILED_PRECONDITION  # two ahead: from the future
    bsp = make_state(Mode.BSP, workers=1)
    assert pull(bsp, 0, 1).code is Code.FAILED_PRECONDITION


def test_pull_rejects_unknown_members_and_clocks_out_of_step():
    state = make_state(Mode.SSP, staleness=1, workers=2)
    before = fingerprint(state)
    future = state.pull(RUN, 0, 3, 0.0)
    assert isinstance(future, Reject) and future.code is Code.FAILED_PRECONDITION
    assert "future" in future.message
    assert state.pull("nope", 0, 0, 0.0).code is Code.INVALID_ARGUMENT
    assert state.pull(RUN, 2, 0, 0.0).code is Code.INVALID_ARGUMENT
    assert fingerprint(state) == before and state.stats.pulls_served == 0


def test_pull_timeout_names_the_missing_workers_their_clocks_and_last_heartbeat():
    state = make_state(Mode.BSP, workers=3)
    state.pull(RUN, 0, 0, 100.0)
    state.push(header(state, 0, 0), grad_for(0, 0), 100.0)
    state.pull(RUN, 2, 0, 95.0)
    rejected = state.pull_timed_out(0, 1, waited_s=60.0, now=160.0)
    assert rejected.code is Code.DEADLINE_EXCEEDED
    assert "worker 1 at clock 0 (last seen never)" in rejected.message
    assert "worker 2 at clock 0 (last seen 65.0s ago)" in rejected.message
    assert "waited 60.0s at clock 1 under bsp" in rejected.message


def test_snapshot_is_the_slice_in_little_endian_chunks():
    spec = ShardSpec(RUN, 0, 0, 1000, 1, Consistency(Mode.ASP), OptimizerConfig("sgd"), 1024)
    state = ShardState(spec, np.arange(1000, dtype=np.float32))
    chunks = state.observe().chunks
    assert [len(c) for c in chunks] == [1024, 1024, 1024, 928]
    assert np.array_equal(np.frombuffer(b"".join(chunks), "<f4"), state.params)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_shard_count_does_not_change_bsp_params_at_all(optimizer):
    total, workers, steps = 101, 3, 6
    init = np.random.default_rng(5).standard_normal(total).astype(np.float32)
    grads = {
        (w, c): np.random.default_rng([w, c, 9]).standard_normal(total).astype(np.float32)
        for w in range(workers)
        for c in range(steps)
    }
    results = []
    for shards in (1, 2, 3, 7):
        parts = []
        for sid, (off, n) in enumerate(split_ranges(total, shards)):
            cons = Consistency(Mode.BSP)
            spec = ShardSpec(RUN, sid, off, n, workers, cons, OptimizerConfig(optimizer, lr=0.05))
            st_ = ShardState(spec, init[off : off + n])
            for c in range(steps):
                for w in range(workers):
                    h = PushHeader(RUN, w, c, c, st_.version, 1, n)
                    assert isinstance(st_.push(h, grads[w, c][off : off + n].copy(), 0.0), Ack)
                    st_.validate()
            parts.append(st_.params)
        results.append(np.concatenate(parts).tobytes())
    assert all(r == results[0] for r in results)


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from([Mode.BSP, Mode.SSP, Mode.ASP]),
    staleness=st.integers(0, 3),
    workers=st.integers(1, 4),
    schedule=st.lists(st.integers(0, 3), min_size=1, max_size=80),
)
def test_random_schedules_keep_every_invariant(mode, staleness, workers, schedule):
    """Workers act in a random interleaving; served pulls never break the bound."""
    state = make_state(mode, staleness, workers)
    # Each worker alternates pull -> push; a Wait leaves it pending on the pull.
    phase = ["pull"] * workers
    for pick in schedule:
        w = pick % workers
        clock = state.workers[w].clock
        if phase[w] == "pull":
            decision = pull(state, w, clock)
            if isinstance(decision, Serve):
                bound = state.spec.consistency.read_bound
                assert bound is None or decision.clock_gap <= bound
                phase[w] = "push"
            else:
                assert isinstance(decision, Wait) and decision.waiting_for
        else:
            assert isinstance(push(state, w, clock), Ack)
            phase[w] = "pull"
    if mode is not Mode.ASP:
        assert state.stats.max_clock_gap <= state.spec.consistency.read_bound


# ---- stopping and fencing (DESIGN §5) ---------------------------------------------------------

STOPPED = (Code.UNAVAILABLE, "shard is stopping; re-resolve it from the store")
FENCED = (
    Code.FAILED_PRECONDITION,
    "shard 0 at epoch 1 was replaced by a newer epoch; re-resolve it from the store",
)


def stop(state, fenced):
    result = state.stop(fenced=fenced)
    state.validate()
    return result


@pytest.mark.parametrize("mode", [Mode.BSP, Mode.SSP, Mode.ASP])
@pytest.mark.parametrize("fenced, refusal", [(False, STOPPED), (True, FENCED)])
def test_a_stopped_shard_refuses_pushes_and_pulls_and_changes_nothing(mode, fenced, refusal):
    state = make_state(mode, staleness=1, workers=2)
    push(state, 0, 0)
    before = fingerprint(state)
    stopped = stop(state, fenced)
    assert isinstance(stopped, Stop) and (stopped.refusal.code, stopped.refusal.message) == refusal
    assert fingerprint(state) == before
    for decision in (
        push(state, 1, 0),  # a new push
        push(state, 0, 0),  # a retry of an accepted one
        pull(state, 0, 1),
        pull(state, 1, 0),
        state.observe(),
        state.check_push_header(header(state, 1, 0)),
    ):
        assert isinstance(decision, Reject) and (decision.code, decision.message) == refusal
        state.validate()
        assert fingerprint(state) == before
    assert state.stats.pulls_served == 0 and state.check_info(RUN) is None  # status still answers


def test_fencing_outlives_a_later_stop_and_a_stopped_shard_stays_stopped():
    state = make_state(Mode.ASP)
    assert stop(state, False).refusal.code is Code.UNAVAILABLE
    assert stop(state, True).refusal.code is Code.FAILED_PRECONDITION  # the store said so later
    assert stop(state, False).refusal.code is Code.FAILED_PRECONDITION
    assert state.status == "fenced"
    state.status = "serving"  # no event does this; validate() catches it
    with pytest.raises(AssertionError, match="revived"):
        state.validate()


def test_info_checks_only_the_run():
    state = make_state()
    assert state.check_info("") is None and state.check_info(RUN) is None
    rejected = state.check_info("other")
    assert rejected == Reject(Code.INVALID_ARGUMENT, "unknown run 'other'")

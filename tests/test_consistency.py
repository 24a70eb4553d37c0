"""The one rule core (DESIGN §3): read rule properties and the mode equivalences."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.consistency import (
    Consistency,
    Mode,
    blocking_workers,
    check_staleness,
    clock_gap,
    may_read,
    parse_consistency,
    parse_mode,
)

clock_tables = st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=8)


@given(clocks=clock_tables, ahead=st.integers(0, 20), s=st.integers(0, 10))
def test_ssp_reads_exactly_when_the_gap_is_within_the_bound(clocks, ahead, s):
    clock = min(clocks) + ahead
    assert may_read(Consistency(Mode.SSP, s), clock, clocks) == (ahead <= s)
    assert clock_gap(clock, clocks) == ahead


@given(clocks=clock_tables, ahead=st.integers(0, 20))
def test_ssp0_reads_like_bsp(clocks, ahead):
    clock = min(clocks) + ahead
    bsp, ssp0 = Consistency(Mode.BSP), Consistency(Mode.SSP, 0)
    assert may_read(bsp, clock, clocks) == may_read(ssp0, clock, clocks)
    assert blocking_workers(bsp, clock, clocks) == blocking_workers(ssp0, clock, clocks)
    assert bsp.read_bound == ssp0.read_bound == 0
    assert bsp.aggregates and not ssp0.aggregates


@given(clocks=clock_tables, ahead=st.integers(0, 10_000))
def test_asp_never_waits_and_is_ssp_with_an_unbounded_staleness(clocks, ahead):
    clock = min(clocks) + ahead
    asp = Consistency(Mode.ASP)
    assert may_read(asp, clock, clocks)
    assert blocking_workers(asp, clock, clocks) == ()
    # SSP(s) for any s at least the gap behaves like ASP (SSP(inf) is ASP).
    assert may_read(Consistency(Mode.SSP, ahead), clock, clocks)


@given(clocks=clock_tables, ahead=st.integers(0, 20), s=st.integers(0, 10))
def test_blocking_workers_are_exactly_those_too_far_behind(clocks, ahead, s):
    clock = min(clocks) + ahead
    c = Consistency(Mode.SSP, s)
    blocking = blocking_workers(c, clock, clocks)
    assert set(blocking) == {w for w, cw in enumerate(clocks) if clock - cw > s}
    # Waiting is needed exactly when someone blocks.
    assert may_read(c, clock, clocks) == (blocking == ())


@given(clocks=clock_tables, s=st.integers(0, 5), bump=st.integers(0, 7))
def test_read_rule_is_monotone_in_the_slowest_clock(clocks, s, bump):
    # Other workers catching up can only turn a wait into a read, never the reverse.
    c = Consistency(Mode.SSP, s)
    clock = max(clocks)
    caught_up = [max(cw, min(clocks) + bump) for cw in clocks]
    if may_read(c, clock, clocks):
        assert may_read(c, clock, caught_up)


def test_parse_consistency_and_errors():
    assert parse_consistency("BSP") == Consistency(Mode.BSP)
    assert parse_consistency("ssp", 3) == Consistency(Mode.SSP, 3)
    assert parse_consistency("asp").read_bound is None
    assert parse_consistency("ssp", 2).describe() == "ssp(2)"
    with pytest.raises(ValueError, match="unknown mode"):
        parse_consistency("eventual")
    with pytest.raises(ValueError, match="ssp only"):
        parse_consistency("bsp", 2)
    with pytest.raises(ValueError, match=">= 0"):
        parse_consistency("ssp", -1)


# The command line prints these sentences as they are (tether launch exits 2 with one line).
STALENESS_ERRORS = [
    ("ssp", None, "--mode ssp needs --staleness s (the bound, e.g. 2)"),
    ("ssp", -1, "staleness must be >= 0 for SSP, got -1"),
    ("bsp", 2, "--staleness applies to --mode ssp only, not bsp"),
    ("asp", 1, "--staleness applies to --mode ssp only, not asp"),
    ("eventual", 0, "unknown mode 'eventual': choose bsp, ssp or asp"),
]


@pytest.mark.parametrize("mode, staleness, message", STALENESS_ERRORS)
def test_check_staleness_is_the_one_check_with_the_command_line_messages(mode, staleness, message):
    with pytest.raises(ValueError) as e:
        check_staleness(mode, staleness)
    assert str(e.value) == message
    if staleness is not None:
        # The dial and its parser refuse the same values with the same sentence.
        with pytest.raises(ValueError) as parsed:
            parse_consistency(mode, staleness)
        assert str(parsed.value) == message
        if mode != "eventual":
            with pytest.raises(ValueError) as built:
                Consistency(Mode(mode), staleness)
            assert str(built.value) == message


@pytest.mark.parametrize(
    "mode, staleness", [("ssp", 0), ("ssp", 3), ("SSP", 1), ("bsp", None), ("bsp", 0), ("asp", 0)]
)
def test_check_staleness_accepts_valid_settings(mode, staleness):
    check_staleness(mode, staleness)
    check_staleness(parse_mode(mode), staleness)
    # A library caller may leave SSP's bound out; the command line may not.
    assert parse_consistency("ssp") == Consistency(Mode.SSP, 0)

"""The one consistency rule core (DESIGN §3).

Pure functions over an explicit clock table, keyed by worker id: a worker's clock is the number
of iterations the shard has received from it. BSP, SSP(s) and ASP are configurations of the same
read rule:

- BSP reads like SSP(0) and additionally aggregates a clock's gradients before applying them;
- SSP(s) serves a pull at clock c only when ``c - min_w(clock_w) <= s``;
- ASP is SSP with no bound (SSP(inf)).

The *apply* half of BSP is not here: holding each worker's pending gradient of the open clock,
summing them in worker-id order and keeping the previous parameters for a restarted worker is
the shard's work (server/state.py, server/tables.py). The rules decide who may read and whether
a clock's gradients are aggregated; the state that owns the parameters applies the decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum


class Mode(StrEnum):
    BSP = "bsp"
    SSP = "ssp"
    ASP = "asp"


@dataclass(frozen=True, slots=True)
class Consistency:
    """The consistency dial: a mode and, for SSP, its staleness bound s."""

    mode: Mode
    staleness: int = 0

    def __post_init__(self) -> None:
        check_staleness(self.mode, self.staleness)

    @property
    def read_bound(self) -> int | None:
        """Largest clock gap a served pull may have; None means unbounded (ASP)."""
        if self.mode is Mode.ASP:
            return None
        return 0 if self.mode is Mode.BSP else self.staleness

    @property
    def aggregates(self) -> bool:
        """BSP sums a clock's gradients of all workers and applies them once."""
        return self.mode is Mode.BSP

    def describe(self) -> str:
        return f"ssp({self.staleness})" if self.mode is Mode.SSP else self.mode.value


def parse_mode(mode: str) -> Mode:
    """A mode name, in any case; raises ValueError naming the valid modes."""
    try:
        return Mode(mode.lower())
    except ValueError:
        raise ValueError(f"unknown mode {mode!r}: choose bsp, ssp or asp") from None


def check_staleness(mode: Mode | str, staleness: int | None) -> None:
    """The one check of a mode's staleness bound; raises ValueError with one clear sentence.

    `staleness` None means "not given": SSP needs its bound stated, the other modes take none.
    """
    m = parse_mode(mode)
    if m is Mode.SSP:
        if staleness is None:
            raise ValueError("--mode ssp needs --staleness s (the bound, e.g. 2)")
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0 for SSP, got {staleness}")
    elif staleness not in (None, 0):
        raise ValueError(f"--staleness applies to --mode ssp only, not {m.value}")


def parse_consistency(mode: str, staleness: int | None = None) -> Consistency:
    """Read the dial from command-line values; raises ValueError with one clear sentence.

    A caller may leave SSP's bound out (it is then 0; the command line insists on it before it
    gets here). The staleness is checked once, by `check_staleness` in `Consistency`.
    """
    return Consistency(parse_mode(mode), 0 if staleness is None else staleness)


# A clock table: worker id -> iterations received from it. A plain sequence is read as the table
# of the workers at its positions (0..W-1).
Clocks = Mapping[int, int] | Sequence[int]


def _items(clocks: Clocks) -> list[tuple[int, int]]:
    if isinstance(clocks, Mapping):
        return sorted(clocks.items())
    return list(enumerate(clocks))


def _slowest(clocks: Clocks) -> int:
    return min(clocks.values()) if isinstance(clocks, Mapping) else min(clocks)


def clock_gap(clock: int, clocks: Clocks) -> int:
    """How far a worker at `clock` is ahead of the slowest worker (DESIGN §3 `clock_gap`)."""
    return clock - _slowest(clocks)


def may_read(consistency: Consistency, clock: int, clocks: Clocks) -> bool:
    """The read rule: may a pull by a worker at `clock` be served now?"""
    bound = consistency.read_bound
    return bound is None or clock_gap(clock, clocks) <= bound


def blocking_workers(consistency: Consistency, clock: int, clocks: Clocks) -> tuple[int, ...]:
    """The workers (by id, in id order) a pull at `clock` waits for: those more than the bound
    behind it."""
    bound = consistency.read_bound
    if bound is None:
        return ()
    return tuple(w for w, c in _items(clocks) if clock - c > bound)

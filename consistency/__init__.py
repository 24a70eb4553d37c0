"""Consistency models as configurations of one pure rule core (DESIGN §3)."""

from tether.consistency.rules import (
    Consistency,
    Mode,
    blocking_workers,
    check_staleness,
    clock_gap,
    may_read,
    parse_consistency,
    parse_mode,
)

__all__ = [
    "Consistency",
    "Mode",
    "blocking_workers",
    "check_staleness",
    "clock_gap",
    "may_read",
    "parse_consistency",
    "parse_mode",
]

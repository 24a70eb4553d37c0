"""Consistency models as configurations of one pure rule core (DESIGN.md §3)."""

from tether.consistency.rules import (
    Consistency,
    Mode,
    blocking_workers,
    clock_gap,
    may_read,
    parse_consistency,
)

__all__ = [
    "Consistency",
    "Mode",
    "blocking_workers",
    "clock_gap",
    "may_read",
    "parse_consistency",
]

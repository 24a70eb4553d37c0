"""Helpers over metric rows (:class:`~tether.store.base.MetricRow`), shared by the harnesses."""

from __future__ import annotations

from collections.abc import Iterable

from tether.store.base import MetricRow


def first_iteration_start(rows: Iterable[MetricRow]) -> float | None:
    """Unix time the first iteration of any worker began (a worker row's time less its
    duration); None without worker rows."""
    starts = [r.t - r.values.get("step_s", 0.0) for r in rows if r.source.startswith("worker:")]
    return min(starts, default=None)

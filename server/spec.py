"""What a shard is (its place in the run, the rules it serves by) and the statistics it keeps:
plain values shared by the shard core, its codec and its adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tether.config import GradientGuard, OptimizerConfig, ReplicationPolicy
from tether.consistency import Consistency
from tether.wire import DEFAULT_CHUNK_BYTES


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """What a shard is: its place in the run and the rules it serves by."""

    run_id: str
    shard_id: int
    offset: int
    length: int
    num_workers: int
    consistency: Consistency
    optimizer: OptimizerConfig
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    replication: ReplicationPolicy = ReplicationPolicy()
    # The task's own optax transformation (its `optimizer()`), used in place of `optimizer`'s
    # named one; None for the named one (DESIGN §11).
    transformation: Any = None
    # The ids of the run's workers; () for 0..num_workers-1. Only the shard's membership
    # (server/membership.py) reads them.
    worker_ids: tuple[int, ...] = ()
    # Refuse a push whose norm is far above the recent ones (server/guard.py); off by default.
    guard: GradientGuard = GradientGuard()

    def __post_init__(self) -> None:
        if self.worker_ids and len(self.worker_ids) != self.num_workers:
            raise ValueError(f"{self.num_workers} workers but ids {self.worker_ids}")


@dataclass(slots=True)
class Stats:
    updates_applied: int = 0
    pushes_accepted: int = 0
    pulls_served: int = 0
    max_clock_gap: int = 0
    clock_gap_hist: list[int] = field(default_factory=list)
    staleness_hist: list[int] = field(default_factory=list)
    replications: int = 0
    replication_lag_max_s: float = 0.0  # first unreplicated change -> durable
    replication_lag_sum_s: float = 0.0


def bump(hist: list[int], index: int) -> None:
    if index >= len(hist):
        hist.extend([0] * (index + 1 - len(hist)))
    hist[index] += 1


def split_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """Balanced contiguous (offset, length) ranges of a flat vector (DESIGN §2)."""
    if parts < 1 or total < parts:
        raise ValueError(f"cannot split {total} parameters into {parts} shards")
    bounds = [total * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)]

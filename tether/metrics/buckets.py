"""Fixed-bucket histograms observed at event time, and the bounds of every Tether histogram
(DESIGN §13). No Prometheus here: the members count with these whether metrics are served or
not; `tether.metrics.collect` turns them into metric families at scrape time."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Seconds a push or pull takes at the shard, from its request to its reply (waits included).
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# Seconds a worker's iteration takes (pull, gradient, push).
STEP_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Clocks (clock gap) and versions (version staleness): counted exactly by the shard, folded into
# these buckets at scrape time.
GAP_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256, 1024)
# Seconds from a member's exit to its replacement serving (DESIGN §5).
RECOVERY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# Why a shard's call waited: a pull for slower workers (the consistency rule, DESIGN §3), a push's
# acknowledgement for its version to be durable (sync replication, DESIGN §5).
WAIT_REASONS = ("workers", "durable")
# Why the driver restarted a member (`tether.driver.liveness.CauseKind`, DESIGN §5), and the roles
# it restarts: the bounded label values of `tether_run_restarts_total`.
RESTART_CAUSES = ("exited", "probe_failed", "startup_deadline", "node_lost")
MEMBER_ROLES = ("server", "worker")


class Buckets:
    """Counts of a histogram with fixed bounds, observed at event time (cheap: DESIGN §13).

    The owner serialises `observe` (a shard observes under its lock, a worker on its loop's
    thread); a scrape reads the counts without a lock and may see one observation half-added,
    which a monotonic counter tolerates."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


def folded(exact: Sequence[int], bounds: Sequence[float] = ()) -> Buckets:
    """Small integers counted exactly (index = value, value = count) folded into `bounds`
    (`GAP_BUCKETS` by default)."""
    out = Buckets(bounds or GAP_BUCKETS)
    for value, n in enumerate(exact):
        out.counts[bisect_left(out.bounds, value)] += n
        out.sum += value * n
    return out


@dataclass(slots=True)
class StepCounters:
    """What a worker counts about its iterations, on its loop's thread (worker/loop.py)."""

    steps: int = 0  # iterations completed by this process
    samples: int = 0
    step_s: Buckets = field(default_factory=lambda: Buckets(STEP_BUCKETS_S))
    pull_s: Buckets = field(default_factory=lambda: Buckets(LATENCY_BUCKETS_S))
    push_s: Buckets = field(default_factory=lambda: Buckets(LATENCY_BUCKETS_S))
    task: Mapping[str, Any] = field(default_factory=dict)  # the task's last metrics, by name

    def step(self, step_s: float, pull_s: float, push_s: float, samples: int) -> None:
        self.steps += 1
        self.samples += samples
        self.step_s.observe(step_s)
        self.pull_s.observe(pull_s)
        self.push_s.observe(push_s)

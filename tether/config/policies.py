"""How shard state reaches the store (`ReplicationPolicy`, DESIGN §5), how the driver judges a
silent member (`LivenessPolicy`, DESIGN §5 Liveness) and which gradients a shard refuses
(`GradientGuard`, DESIGN §10), with the product's defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ReplicationMode = Literal["off", "sync", "async"]


@dataclass(frozen=True, slots=True)
class ReplicationPolicy:
    """How shard state reaches the store (DESIGN §5)."""

    mode: ReplicationMode = "off"
    every_updates: int = 50  # async: replicate at least every k applied updates...
    interval_s: float = 0.1  # ...and at most t seconds after any change
    # Compaction budget: a new base is written once replaying the log after the last one would
    # take this long (estimated from the measured optimizer step and the entries' bytes).
    compact_replay_s: float = 0.25

    def __post_init__(self) -> None:
        if self.mode not in ("off", "sync", "async"):
            raise ValueError(f"--replication must be sync, async or off, got {self.mode!r}")
        if self.every_updates < 1:
            raise ValueError(f"--replicate-every must be >= 1, got {self.every_updates}")
        if not 0 < self.interval_s <= 3600:
            raise ValueError(f"--replicate-interval-ms must be > 0, got {self.interval_s * 1e3}")
        if not (math.isfinite(self.compact_replay_s) and 0 < self.compact_replay_s <= 3600):
            raise ValueError(
                f"--compaction-budget-ms must be > 0 and at most an hour, got "
                f"{self.compact_replay_s * 1e3}"
            )


@dataclass(frozen=True, slots=True)
class LivenessPolicy:
    lease_s: float = 5.0  # heartbeat silence that raises suspicion (the floor of the lease)
    probe_timeout_s: float = 10.0  # how long probes must keep failing before a kill
    startup_timeout_s: float = 120.0  # from spawn to serving
    probe_interval_s: float = 1.0  # between the start of two probes of one suspect
    min_failed_probes: int = 2
    adaptive_factor: float = 4.0
    lease_cap_s: float = 30.0
    history: int = 32  # heartbeat intervals remembered per member

    def __post_init__(self) -> None:
        for name in ("lease_s", "probe_timeout_s", "startup_timeout_s", "probe_interval_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.lease_cap_s < self.lease_s:
            raise ValueError(f"lease_cap_s ({self.lease_cap_s}) is below lease_s ({self.lease_s})")
        if self.min_failed_probes < 1 or self.history < 1 or self.adaptive_factor < 1:
            raise ValueError("min_failed_probes and history must be >= 1, adaptive_factor >= 1")


def default_replication(mode: str) -> ReplicationMode:
    """Sync for BSP (its bit-identity through faults needs it, DESIGN §5), async otherwise."""
    return "sync" if mode == "bsp" else "async"


@dataclass(frozen=True, slots=True)
class GradientGuard:
    """A shard refuses a push whose gradient norm exceeds `factor` × the median of its last
    `window` accepted pushes, once it accepted `warmup` (DESIGN §10); None: off (the default)."""

    factor: float | None = None
    window: int = 32
    warmup: int = 8

    def __post_init__(self) -> None:
        f = self.factor
        if f is not None and (isinstance(f, bool) or not math.isfinite(f) or f <= 1):
            raise ValueError(
                f"--reject-grad-norm must be a finite factor > 1 (0 or none: off), got {f!r}"
            )
        if not 1 <= self.warmup <= self.window:
            raise ValueError(f"the guard's warmup {self.warmup} is outside 1..{self.window}")

"""The typed run configuration (STYLE.md §7: read at the edge, passed down as arguments).

A run's config is written to the store once, by whoever creates the run (the launcher, or a user
script on a cluster); every `tether server` and `tether worker` of the run reads it from there, so
all members agree on the model, the data, the dial and the optimizer.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from tether.consistency import Consistency, parse_consistency
from tether.driver.liveness import LivenessPolicy
from tether.server.optim import OptimizerConfig
from tether.server.state import ReplicationPolicy
from tether.wire import DEFAULT_CHUNK_BYTES

DEVICES = ("cpu", "gpu", "tpu")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def parse_straggler(text: str) -> tuple[int, int]:
    """`ID:MS` -> (worker id, delay in ms per step)."""
    try:
        wid, ms = text.split(":")
        pair = int(wid), int(ms)
    except ValueError:
        raise ValueError(f"--straggler expects ID:MS (e.g. 1:50), got {text!r}") from None
    if pair[0] < 0 or pair[1] < 0:
        raise ValueError(f"--straggler expects a worker id and a delay >= 0, got {text!r}")
    return pair


@dataclass(frozen=True, slots=True)
class RunConfig:
    run_id: str
    shards: int = 2
    workers: int = 2
    mode: str = "bsp"
    staleness: int = 0
    model: str = "mlp:64"
    dataset: str = "digits"
    steps: int = 200
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 0.01
    seed: int = 0
    device: str = "cpu"
    stragglers: dict[int, int] = field(default_factory=dict)  # worker id -> ms per step
    wait_timeout_s: float = 60.0  # deadline of every wait for other workers (DESIGN §3)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    # Replication and recovery (DESIGN §5): sync acknowledges only durable state; async writes
    # in the background at least every `replicate_every` updates or `replicate_interval_ms`.
    replication: str = "off"
    replicate_every: int = 50
    replicate_interval_ms: float = 100.0
    max_restarts: int = 3
    # Failure detection (DESIGN §5 Liveness, tether/liveness.py): a serving member whose heartbeat
    # is silent past the lease is probed directly and killed only if the probes keep failing for
    # `probe_timeout_s`; start-up (spawn to serving) has its own deadline instead of the lease.
    lease_s: float = 5.0
    probe_timeout_s: float = 10.0
    startup_timeout_s: float = 120.0
    # Resolved from the model and data set when the run is created.
    num_params: int = 0
    in_dim: int = 0
    num_classes: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.shards >= 1, f"--shards must be >= 1, got {self.shards}"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
            (
                math.isfinite(self.wait_timeout_s) and self.wait_timeout_s > 0,
                f"--wait-timeout must be > 0 seconds, got {self.wait_timeout_s}",
            ),
            (1 << 10 <= self.chunk_bytes <= 4 << 20, "chunk size must be 1 KiB to 4 MiB"),
            (self.max_restarts >= 0, f"--max-restarts must be >= 0, got {self.max_restarts}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for wid in self.stragglers:
            if not 0 <= wid < self.workers:
                raise ValueError(
                    f"--straggler names worker {wid} but the run has workers 0..{self.workers - 1}"
                )
        self.consistency  # noqa: B018 - validates mode and staleness
        self.optimizer_config  # noqa: B018 - validates optimizer and lr
        self.replication_policy  # noqa: B018 - validates the replication settings
        self.liveness_policy  # noqa: B018 - validates the failure-detection settings

    @property
    def consistency(self) -> Consistency:
        return parse_consistency(self.mode, self.staleness)

    @property
    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(name=self.optimizer, lr=self.lr)  # type: ignore[arg-type]

    @property
    def replication_policy(self) -> ReplicationPolicy:
        return ReplicationPolicy(
            mode=self.replication,  # type: ignore[arg-type]
            every_updates=self.replicate_every,
            interval_s=self.replicate_interval_ms / 1000,
        )

    @property
    def liveness_policy(self) -> LivenessPolicy:
        for flag, value in (
            ("--lease", self.lease_s),
            ("--probe-timeout", self.probe_timeout_s),
            ("--startup-timeout", self.startup_timeout_s),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{flag} must be a positive number of seconds, got {value}")
        return LivenessPolicy(
            lease_s=self.lease_s,
            probe_timeout_s=self.probe_timeout_s,
            startup_timeout_s=self.startup_timeout_s,
            lease_cap_s=max(30.0, self.lease_s),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stragglers"] = {str(k): v for k, v in self.stragglers.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"run config has unknown fields: {', '.join(unknown)}")
        d = dict(d)
        d["stragglers"] = {int(k): int(v) for k, v in d.get("stragglers", {}).items()}
        return cls(**d)

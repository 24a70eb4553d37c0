"""The typed run configuration (STYLE §7: read at the edge, passed down as arguments).

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
from typing import Any, Literal, get_args

import numpy as np

from tether.consistency import Consistency, parse_consistency
from tether.wire import DEFAULT_CHUNK_BYTES

DEVICES = ("cpu", "gpu", "tpu")

OptimizerName = Literal["sgd", "momentum", "adam"]
OPTIMIZER_NAMES: tuple[str, ...] = get_args(OptimizerName)
ReplicationMode = Literal["off", "sync", "async"]


@dataclass(frozen=True, slots=True)
class OptimizerConfig:
    """Which optimizer a run uses and its hyperparameters (identical on every shard)."""

    name: OptimizerName = "adam"
    lr: float = 0.01
    momentum: float = 0.9
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(
                f"unknown optimizer {self.name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}."
            )
        # Checked in float32 too: that is the precision the update runs in, and a value that
        # rounds to 0 or 1 there (lr=1e-50, b2=0.99999999) would silently break the math.
        for name in ("lr", "eps"):
            v = _real(self, name)
            if not (math.isfinite(v) and v > 0 and 0 < np.float32(v) < np.inf):
                raise ValueError(
                    f"optimizer {name} must be a finite number > 0 in float32, "
                    f"got {getattr(self, name)!r}."
                )
        for name in ("momentum", "b1", "b2"):
            v = _real(self, name)
            if not (0.0 <= v < 1.0 and np.float32(v) < 1):
                raise ValueError(
                    f"optimizer {name} must be in [0, 1) in float32, got {getattr(self, name)!r}."
                )


def _real(config: OptimizerConfig, field: str) -> float:
    value = getattr(config, field)
    if isinstance(value, bool):
        raise ValueError(f"optimizer {field} must be a number, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"optimizer {field} must be a number, got {value!r}.") from None


@dataclass(frozen=True, slots=True)
class ReplicationPolicy:
    """How shard state reaches the store (DESIGN §5)."""

    mode: ReplicationMode = "off"
    every_updates: int = 50  # async: replicate at least every k applied updates...
    interval_s: float = 0.1  # ...and at most t seconds after any change

    def __post_init__(self) -> None:
        if self.mode not in ("off", "sync", "async"):
            raise ValueError(f"--replication must be sync, async or off, got {self.mode!r}")
        if self.every_updates < 1:
            raise ValueError(f"--replicate-every must be >= 1, got {self.every_updates}")
        if not 0 < self.interval_s <= 3600:
            raise ValueError(f"--replicate-interval-ms must be > 0, got {self.interval_s * 1e3}")


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
    # A user task's import spec (DESIGN §11: `path/to/file.py:NAME` with an absolute path once
    # resolved, or `package.module:NAME`); empty for the built-in classifier of model/dataset.
    task: str = ""
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

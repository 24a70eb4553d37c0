"""A run's configuration, nested by concern (STYLE §7: read at the edge, passed down as arguments).

A run's config is written to the store once, by whoever creates the run (the launcher, or a user
script on a cluster); every `tether server` and `tether worker` of the run reads it from there, so
all members agree on the model, the data, the dial and the optimizer.

`RunConfig` holds the run's shape (shards, workers, steps, batch size, seed, device) and one value
per concern: what is trained (`TaskConfig`), the consistency dial (`Consistency`), the shards'
optimizer (`OptimizerConfig`), replication (`ReplicationPolicy`), failure detection
(`LivenessPolicy`) and how tensors move (`Transport`). The defaults are the product's:
`RunConfig(run_id)` is the run `tether launch` makes with no flags (replication sync under BSP,
async otherwise; the learning rate of the optimizer named).

The stored form (`to_dict`/`from_dict`) is flat, one key per setting (`SETTINGS`: the names of
the command line's flags and of `tether.launch`'s keywords), as every run before was written.
`RunConfig.of(run_id, **settings)` builds a config from those names, and the same names read back
as properties, so that a member reading `config.mode` or `config.lr` sees the stored value.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from tether.config.optimizer import OptimizerConfig, default_lr
from tether.config.policies import (
    GradientGuard,
    LivenessPolicy,
    ReplicationPolicy,
    default_replication,
)
from tether.consistency import Consistency, Mode, parse_consistency
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
class TaskConfig:
    """What a run trains (DESIGN §11): a user's task by its import spec (`path/to/file.py:NAME`,
    the path absolute once resolved, or `package.module:NAME`), or, with no spec, the built-in
    classifier of `model` on `dataset`. The sizes are filled in when the run is created."""

    spec: str = ""
    model: str = "mlp:64"
    dataset: str = "digits"
    num_params: int = 0
    in_dim: int = 0
    num_classes: int = 0

    def describe(self) -> str:
        return self.spec or f"{self.model} on {self.dataset}"


@dataclass(frozen=True, slots=True)
class Transport:
    """How parameters and gradients move between workers and shards (DESIGN §2, §3, §11)."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    # A worker whose shard runs on its own machine moves parameters and gradients through a
    # shared-memory segment instead of gRPC bytes (DESIGN §2); False: always the byte stream.
    shared_memory: bool = True
    wait_timeout_s: float = 60.0  # deadline of every wait for other workers (DESIGN §3)
    # SSP/ASP: push clock c in the background while pulling and computing c+1 (the shard still
    # enforces the staleness bound); BSP never overlaps, since its next pull waits for c anyway.
    # Off by default: measured, it bought 8% more updates/s and cost every gradient about two
    # versions more staleness, which tripled the final loss of an SSP(2) run (DESIGN §11).
    overlap: bool = False
    # TLS (DESIGN §13): PEM paths on every member's host (a Kubernetes Secret mounted at the
    # same path); a certificate and key make shards serve TLS, a CA makes it mutual. "": off.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    # The name clients check the shards' certificates against instead of the address they dial
    # (pods whose IPs no certificate can name); "": the dialled host.
    tls_server_name: str = ""

    def __post_init__(self) -> None:
        if (self.tls_cert or self.tls_key or self.tls_ca) and not (self.tls_cert and self.tls_key):
            raise ValueError(
                "TLS needs both --tls-cert and --tls-key (and --tls-ca for mutual TLS)"
            )
        if not (math.isfinite(self.wait_timeout_s) and self.wait_timeout_s > 0):
            raise ValueError(f"--wait-timeout must be > 0 seconds, got {self.wait_timeout_s}")
        if not 1 << 10 <= self.chunk_bytes <= 4 << 20:
            raise ValueError("chunk size must be 1 KiB to 4 MiB")


# The replication a run gets when none is given: the product's, which depends on the consistency
# (`default_replication`). Recognised by identity, never stored.
_BY_CONSISTENCY = ReplicationPolicy()


@dataclass(frozen=True, slots=True)
class RunConfig:
    run_id: str
    shards: int = 2
    workers: int = 2
    steps: int = 200
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    stragglers: dict[int, int] = field(default_factory=dict)  # worker id -> ms per step
    max_restarts: int = 3  # restarts per member before the run fails (DESIGN §5)
    task_config: TaskConfig = TaskConfig()
    consistency: Consistency = Consistency(Mode.BSP)
    # Its horizon is always the run's (`optimizer_updates`) unless the schedule names one.
    optimizer_config: OptimizerConfig = OptimizerConfig()
    # Sync acknowledges only durable state; async writes in the background (DESIGN §5).
    replication_policy: ReplicationPolicy = _BY_CONSISTENCY
    # A serving member whose heartbeat is silent past the lease is probed directly and killed
    # only if the probes keep failing for the probe timeout; start-up has its own deadline.
    liveness_policy: LivenessPolicy = LivenessPolicy()
    transport: Transport = Transport()
    # Off by default: a shard refuses a push whose norm is far above the recent ones (DESIGN §10).
    gradient_guard: GradientGuard = GradientGuard()

    def __post_init__(self) -> None:
        _check_shape(
            self.shards, self.workers, self.steps, self.batch_size, self.seed, self.device,
            self.max_restarts, self.stragglers,
        )  # fmt: skip
        if self.replication_policy is _BY_CONSISTENCY:
            mode = default_replication(self.consistency.mode.value)
            object.__setattr__(self, "replication_policy", ReplicationPolicy(mode=mode))
        if self.optimizer_config.horizon != self.optimizer_updates:
            object.__setattr__(
                self,
                "optimizer_config",
                dataclasses.replace(self.optimizer_config, horizon=self.optimizer_updates),
            )

    @property
    def optimizer_updates(self) -> int:
        """Optimizer updates each shard applies in the run, a schedule's default horizon: one
        per clock under BSP, one per push (every worker's every step) otherwise (DESIGN §3)."""
        return self.steps if self.consistency.aggregates else self.steps * self.workers

    def with_task(self, **changes: Any) -> RunConfig:
        """This config with `TaskConfig` fields changed (the task resolved, DESIGN §11)."""
        return dataclasses.replace(
            self, task_config=dataclasses.replace(self.task_config, **changes)
        )

    # -- the flat form: the store's and the command line's names ---------------------------

    @classmethod
    def of(cls, run_id: str, **settings: Any) -> RunConfig:
        """The config of `settings` named as in `SETTINGS` (the stored form, the command line's
        flags, `tether.launch`'s keywords); what is not given takes the product's default, and
        every problem is one sentence naming the flag."""
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"run config has unknown fields: {', '.join(unknown)}")
        s = {**_FLAT_DEFAULTS, **settings}
        stragglers = {int(k): int(v) for k, v in dict(s["stragglers"]).items()}
        _check_shape(
            s["shards"], s["workers"], s["steps"], s["batch_size"], s["seed"], s["device"],
            s["max_restarts"], stragglers,
        )  # fmt: skip
        transport = Transport(
            chunk_bytes=s["chunk_bytes"],
            shared_memory=s["shared_memory"],
            wait_timeout_s=s["wait_timeout_s"],
            overlap=s["overlap"],
            tls_cert=s["tls_cert"],
            tls_key=s["tls_key"],
            tls_ca=s["tls_ca"],
            tls_server_name=s["tls_server_name"],
        )
        consistency = parse_consistency(s["mode"], s["staleness"])
        updates = s["steps"] if consistency.aggregates else s["steps"] * s["workers"]
        name = s["optimizer"]
        optimizer = OptimizerConfig(
            name=name,
            lr=default_lr(name) if s["lr"] is None else s["lr"],
            args=s["opt_args"],
            schedule=s["schedule"],
            horizon=updates,
        )
        replication = s["replication"] or default_replication(consistency.mode.value)
        policy = ReplicationPolicy(
            mode=replication,
            every_updates=s["replicate_every"],
            interval_s=s["replicate_interval_ms"] / 1000,
            compact_replay_s=s["compaction_budget_ms"] / 1000,
        )
        for flag, key in (
            ("--lease", "lease_s"),
            ("--probe-timeout", "probe_timeout_s"),
            ("--startup-timeout", "startup_timeout_s"),
        ):
            if not (math.isfinite(s[key]) and s[key] > 0):
                raise ValueError(f"{flag} must be a positive number of seconds, got {s[key]}")
        liveness = LivenessPolicy(
            lease_s=s["lease_s"],
            probe_timeout_s=s["probe_timeout_s"],
            startup_timeout_s=s["startup_timeout_s"],
            lease_cap_s=max(30.0, s["lease_s"]),
        )
        task = TaskConfig(
            spec=s["task"],
            model=s["model"],
            dataset=s["dataset"],
            num_params=s["num_params"],
            in_dim=s["in_dim"],
            num_classes=s["num_classes"],
        )
        return cls(
            run_id=run_id,
            shards=s["shards"],
            workers=s["workers"],
            steps=s["steps"],
            batch_size=s["batch_size"],
            seed=s["seed"],
            device=s["device"],
            stragglers=stragglers,
            max_restarts=s["max_restarts"],
            task_config=task,
            consistency=consistency,
            optimizer_config=optimizer,
            replication_policy=policy,
            liveness_policy=liveness,
            transport=transport,
            gradient_guard=GradientGuard(factor=s["reject_grad_norm"] or None),  # 0: off
        )

    def to_dict(self) -> dict[str, Any]:
        """The stored form: flat, keys in `SETTINGS` order (DESIGN §6)."""
        stored = {key: _stored(getattr(self, key)) for key in SETTINGS} | {
            "stragglers": {str(k): v for k, v in self.stragglers.items()}
        }
        # A setting added later is stored only when set: a run stored before reads it as off
        # and is stored again unchanged.
        return {k: v for k, v in stored.items() if k not in _ADDED or v != _ADDED[k]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        if "run_id" not in d:
            raise ValueError("run config has no run_id")
        return cls.of(**d)

    # The stored names, read-only: what members read (`config.mode`, `config.lr`, ...).

    @property
    def mode(self) -> str:
        return self.consistency.mode.value

    @property
    def staleness(self) -> int:
        return self.consistency.staleness

    @property
    def task(self) -> str:
        return self.task_config.spec

    @property
    def model(self) -> str:
        return self.task_config.model

    @property
    def dataset(self) -> str:
        return self.task_config.dataset

    @property
    def num_params(self) -> int:
        return self.task_config.num_params

    @property
    def in_dim(self) -> int:
        return self.task_config.in_dim

    @property
    def num_classes(self) -> int:
        return self.task_config.num_classes

    @property
    def optimizer(self) -> str:
        return self.optimizer_config.name

    @property
    def lr(self) -> float:
        return self.optimizer_config.lr

    @property
    def opt_args(self) -> dict[str, Any]:
        return self.optimizer_config.args

    @property
    def schedule(self) -> str:
        return self.optimizer_config.schedule

    @property
    def replication(self) -> str:
        return self.replication_policy.mode

    @property
    def replicate_every(self) -> int:
        return self.replication_policy.every_updates

    @property
    def replicate_interval_ms(self) -> float:
        return _ms(self.replication_policy.interval_s)

    @property
    def compaction_budget_ms(self) -> float:
        return _ms(self.replication_policy.compact_replay_s)

    @property
    def lease_s(self) -> float:
        return self.liveness_policy.lease_s

    @property
    def probe_timeout_s(self) -> float:
        return self.liveness_policy.probe_timeout_s

    @property
    def startup_timeout_s(self) -> float:
        return self.liveness_policy.startup_timeout_s

    @property
    def chunk_bytes(self) -> int:
        return self.transport.chunk_bytes

    @property
    def shared_memory(self) -> bool:
        return self.transport.shared_memory

    @property
    def wait_timeout_s(self) -> float:
        return self.transport.wait_timeout_s

    @property
    def overlap(self) -> bool:
        return self.transport.overlap

    @property
    def tls_cert(self) -> str:
        return self.transport.tls_cert

    @property
    def tls_key(self) -> str:
        return self.transport.tls_key

    @property
    def tls_ca(self) -> str:
        return self.transport.tls_ca

    @property
    def tls_server_name(self) -> str:
        return self.transport.tls_server_name

    @property
    def reject_grad_norm(self) -> float | None:
        return self.gradient_guard.factor


# The flat settings in their stored order, and the product's default of each (`lr` None: the
# optimizer's own default, `replication` None: the consistency's).
_FLAT_DEFAULTS: dict[str, Any] = {
    "run_id": "",
    "shards": 2,
    "workers": 2,
    "mode": "bsp",
    "staleness": 0,
    "model": "mlp:64",
    "dataset": "digits",
    "task": "",
    "overlap": False,
    "shared_memory": True,
    "steps": 200,
    "batch_size": 32,
    "optimizer": "adam",
    "lr": None,
    "opt_args": {},
    "schedule": "constant",
    "reject_grad_norm": None,
    "seed": 0,
    "device": "cpu",
    "stragglers": {},
    "wait_timeout_s": 60.0,
    "chunk_bytes": DEFAULT_CHUNK_BYTES,
    "replication": None,
    "replicate_every": 50,
    "replicate_interval_ms": 100.0,
    "compaction_budget_ms": 250.0,
    "max_restarts": 3,
    "lease_s": 5.0,
    "probe_timeout_s": 10.0,
    "startup_timeout_s": 120.0,
    "num_params": 0,
    "in_dim": 0,
    "num_classes": 0,
    "tls_cert": "",
    "tls_key": "",
    "tls_ca": "",
    "tls_server_name": "",
}
SETTINGS: tuple[str, ...] = tuple(_FLAT_DEFAULTS)
# Settings added after the stored form was fixed, by the value that means "not set".
_ADDED: dict[str, Any] = {
    "reject_grad_norm": None,
    "tls_cert": "",
    "tls_key": "",
    "tls_ca": "",
    "tls_server_name": "",
}


def _check_shape(
    shards: int, workers: int, steps: int, batch_size: int, seed: int, device: str,
    max_restarts: int, stragglers: dict[int, int],
) -> None:  # fmt: skip
    checks = [
        (shards >= 1, f"--shards must be >= 1, got {shards}"),
        (workers >= 1, f"--workers must be >= 1, got {workers}"),
        (steps >= 1, f"--steps must be >= 1, got {steps}"),
        (batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}"),
        (seed >= 0, f"--seed must be >= 0, got {seed}"),
        (device in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
        (max_restarts >= 0, f"--max-restarts must be >= 0, got {max_restarts}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    for wid in stragglers:
        if not 0 <= wid < workers:
            raise ValueError(
                f"--straggler names worker {wid} but the run has workers 0..{workers - 1}"
            )


def _ms(seconds: float) -> float:
    """Seconds back to the milliseconds they were given in: 15 significant digits drop the last
    bit that the division by 1000 may have cost, so a stored config reads back as written."""
    return float(f"{seconds * 1000:.15g}")


def _stored(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value

"""The typed run configuration (STYLE §7: read at the edge, passed down as arguments).

A run's config is written to the store once, by whoever creates the run (the launcher, or a user
script on a cluster); every `tether server` and `tether worker` of the run reads it from there, so
all members agree on the model, the data, the dial and the optimizer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from tether.consistency import Consistency, parse_consistency
from tether.wire import DEFAULT_CHUNK_BYTES

DEVICES = ("cpu", "gpu", "tpu")

ReplicationMode = Literal["off", "sync", "async"]

# Optimizers a run may name that are not optax aliases: `momentum` is sgd with momentum 0.9,
# kept from the first versions of the command line (DESIGN §4).
_MOMENTUM = 0.9
_BUILT_IN = ("sgd", "momentum", "adam")  # exist in every optax: validated without importing it
SCHEDULE_FORMS = (
    "constant | linear[:end=X] | cosine[:alpha=A] | warmup_cosine:warmup=N[,end=X] | "
    "exponential:rate=R[,transition=N], each but constant and exponential also taking decay=N"
)
# Each schedule's keys and their kinds: "steps" is an int >= 0, "value" a finite float >= 0.
_SCHEDULES: dict[str, dict[str, str]] = {
    "constant": {},
    "linear": {"end": "value", "decay": "steps"},
    "cosine": {"alpha": "value", "decay": "steps"},
    "warmup_cosine": {"warmup": "steps", "end": "value", "decay": "steps"},
    "exponential": {"rate": "value", "transition": "steps"},
}
_REQUIRED = {"warmup_cosine": ("warmup",), "exponential": ("rate",)}


@functools.cache
def optimizer_names() -> tuple[str, ...]:
    """What `--optimizer` may name: optax's aliases (public functions whose first parameter is
    ``learning_rate``, the ``scale_by_*`` building blocks aside) and ``momentum``."""
    import inspect

    import optax

    names = {"momentum"}
    for name in dir(optax):
        fn = getattr(optax, name)
        if name.startswith(("_", "scale_by_")) or inspect.isclass(fn) or not callable(fn):
            continue
        try:
            params = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            continue
        if params[:1] == ["learning_rate"]:
            names.add(name)
    return tuple(sorted(names))


def parse_schedule(text: str) -> tuple[str, dict[str, float]]:
    """``KIND[:KEY=VALUE,...]`` -> (kind, values); ValueError naming the accepted forms."""
    kind, _, rest = str(text).partition(":")
    keys = _SCHEDULES.get(kind)
    values: dict[str, float] = {}
    problem = "" if keys is not None else f"unknown kind {kind!r}"
    for item in rest.split(",") if rest and keys is not None else []:
        key, sep, raw = item.partition("=")
        kind_of = keys.get(key) if keys is not None else None
        if not sep or kind_of is None or key in values:
            problem = f"{item!r} is not one of its keys ({', '.join(keys or ()) or 'none'})"
            break
        try:
            values[key] = int(raw) if kind_of == "steps" else float(raw)
        except ValueError:
            problem = f"{key} must be {'an integer' if kind_of == 'steps' else 'a number'}"
            break
        least = 1 if key in ("decay", "transition") else 0  # horizons: at least one update
        if not (math.isfinite(values[key]) and values[key] >= least):
            problem = f"{key} must be >= {least}"
            break
    missing = [k for k in _REQUIRED.get(kind, ()) if k not in values]
    if not problem and missing:
        problem = f"{kind} needs {missing[0]}="
    if not problem and kind == "exponential" and not values["rate"] > 0:
        problem = "rate must be > 0"
    if not problem and kind == "cosine" and not values.get("alpha", 0.0) <= 1:
        problem = "alpha must be in [0, 1]"
    if problem:
        raise ValueError(f"--schedule {text!r}: {problem}; expected {SCHEDULE_FORMS}.")
    return kind, values


def parse_opt_arg(text: str) -> tuple[str, Any]:
    """`--opt KEY=VALUE` -> (key, value): the value as a Python literal, else the text itself."""
    import ast

    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise ValueError(f"--opt expects KEY=VALUE (e.g. weight_decay=0.01), got {text!r}.")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word: a string (e.g. mu_dtype=bfloat16)
    return key, value


@dataclass(frozen=True, slots=True)
class OptimizerConfig:
    """Which optimizer a run's shards apply: an optax alias by name, its keyword arguments and a
    learning-rate schedule (identical on every shard; DESIGN §4)."""

    name: str = "adam"
    lr: float = 0.01  # the schedule's initial (peak, for warmup_cosine) learning rate
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of optax.<name>
    schedule: str = "constant"  # see SCHEDULE_FORMS
    # Optimizer updates a shard applies in the run: a decaying schedule's horizon unless the
    # schedule names one (decay=N). 0: unknown, and then it must.
    horizon: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"optimizer must be a name, got {self.name!r}.")
        # Checked in float32 too: the precision the update runs in, where an lr that rounds to 0
        # (1e-50) would silently train nothing.
        lr = _real(self.lr)
        if not (math.isfinite(lr) and lr > 0 and 0 < np.float32(lr) < np.inf):
            raise ValueError(
                f"optimizer lr must be a finite number > 0 in float32, got {self.lr!r}."
            )
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < 0:
            raise ValueError(f"optimizer horizon must be an integer >= 0, got {self.horizon!r}.")
        if not isinstance(self.args, dict):
            raise ValueError(f"optimizer arguments must be a dict, got {self.args!r}.")
        object.__setattr__(self, "args", dict(self.args))  # frozen: not the caller's dict
        for key, value in self.args.items():
            _check_arg(self.name, key, value)
        kind, values = parse_schedule(self.schedule)
        decay = values.get("decay", values.get("transition", self.horizon))
        if kind != "constant" and decay < 1:
            raise ValueError(
                f"--schedule {self.schedule!r} needs a horizon: add "
                f"{'transition' if kind == 'exponential' else 'decay'}=N (optimizer updates)."
            )
        if kind == "warmup_cosine" and not values["warmup"] < decay:
            raise ValueError(
                f"--schedule {self.schedule!r}: warmup ({int(values['warmup'])}) must be "
                f"shorter than the horizon ({int(decay)} optimizer updates)."
            )
        if self.name not in _BUILT_IN or self.args:
            self.transformation()  # unknown names and bad arguments are refused here

    def learning_rate(self) -> Any:
        """The lr, or an optax schedule of it (a function of the shard's update count)."""
        kind, v = parse_schedule(self.schedule)
        lr = float(self.lr)
        if kind == "constant":
            return lr
        import optax  # only for a schedule: a constant rate starts a shard without it

        decay = int(v.get("decay", self.horizon))
        if kind == "linear":
            return optax.linear_schedule(lr, v.get("end", 0.0), decay)
        if kind == "cosine":
            return optax.cosine_decay_schedule(lr, decay, alpha=v.get("alpha", 0.0))
        if kind == "warmup_cosine":
            return optax.warmup_cosine_decay_schedule(
                0.0, lr, int(v["warmup"]), decay, end_value=v.get("end", 0.0)
            )
        if kind == "exponential":
            return optax.exponential_decay(lr, int(v.get("transition", self.horizon)), v["rate"])
        raise AssertionError(f"unreachable: parse_schedule knows no {kind!r}")

    def transformation(self) -> Any:
        """``optax.<name>(learning_rate=<schedule>, **args)``, an optax GradientTransformation;
        ValueError (one sentence) for an unknown name or an argument the alias refuses."""
        import optax

        alias = optax.sgd if self.name == "momentum" else getattr(optax, self.name, None)
        if self.name not in optimizer_names() or alias is None:
            raise ValueError(
                f"unknown optimizer {self.name!r}; expected one of {', '.join(optimizer_names())}."
            )
        args = {"momentum": _MOMENTUM, **self.args} if self.name == "momentum" else self.args
        unknown, accepted = _unknown_keywords(alias, args)
        if unknown:
            raise ValueError(
                f"optimizer {self.name} has no argument {unknown!r}; it takes "
                f"{', '.join(accepted)}."
            )
        try:
            return alias(self.learning_rate(), **args)
        except (TypeError, ValueError) as e:  # e.g. a value of the wrong kind
            reason = str(e).strip().rstrip(".").replace("\n", " ")
            raise ValueError(
                f"optimizer {self.name} refused its arguments ({_shown(self.args)}): {reason}."
            ) from None


def _unknown_keywords(alias: Any, args: dict[str, Any]) -> tuple[str, list[str]]:
    """The first of ``args`` that ``alias`` has no parameter for ("" if none), and those it has."""
    import inspect

    params = inspect.signature(alias).parameters
    accepted = [k for k in list(params)[1:] if params[k].kind is not inspect.Parameter.VAR_KEYWORD]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = next((k for k in args if k not in accepted), "") if not takes_any else ""
    return unknown, accepted


def _check_arg(name: str, key: str, value: Any) -> None:
    # Arguments travel through the store as JSON (DESIGN §6): plain literals only.
    if not isinstance(key, str) or not key.isidentifier() or key == "learning_rate":
        raise ValueError(
            f"optimizer {name} argument {key!r} is not a keyword argument name"
            + (" (the learning rate is --lr)." if key == "learning_rate" else ".")
        )
    if value is not None and not isinstance(value, bool | int | float | str):
        raise ValueError(
            f"optimizer {name} argument {key}={value!r} must be a number, a bool, None or a string."
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"optimizer {name} argument {key}={value!r} must be finite.")


def _shown(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items()) or "its defaults"


def _real(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"optimizer lr must be a number, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"optimizer lr must be a number, got {value!r}.") from None


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


def default_lr(optimizer: str) -> float:
    """The learning rate a run gets when none is given: plain gradient descent (sgd, momentum)
    takes larger steps than the adaptive optimizers. The command line, `tether.launch` and chaos
    scenarios all use this one rule."""
    return 0.1 if optimizer in ("sgd", "momentum") else 0.01


def default_replication(mode: str) -> ReplicationMode:
    """Sync for BSP (its bit-identity through faults needs it, DESIGN §5), async otherwise."""
    return "sync" if mode == "bsp" else "async"


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
    # SSP/ASP: push clock c in the background while pulling and computing c+1 (the shard still
    # enforces the staleness bound); BSP never overlaps, since its next pull waits for c anyway.
    # Off by default: measured, it bought 8% more updates/s and cost every gradient about two
    # versions more staleness, which tripled the final loss of an SSP(2) run (DESIGN §11).
    overlap: bool = False
    # A worker whose shard runs on its own machine moves parameters and gradients through a
    # shared-memory segment instead of gRPC bytes (DESIGN §2); False: always the byte stream.
    shared_memory: bool = True
    steps: int = 200
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 0.01
    # The optimizer's keyword arguments (`--opt K=V`) and learning-rate schedule (DESIGN §4).
    opt_args: dict[str, Any] = field(default_factory=dict)
    schedule: str = "constant"
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
    compaction_budget_ms: float = 250.0  # replay time a recovery may spend on the log
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
        self.optimizer_config  # noqa: B018 - validates the optimizer, its arguments and lr
        self.replication_policy  # noqa: B018 - validates the replication settings
        self.liveness_policy  # noqa: B018 - validates the failure-detection settings

    @property
    def consistency(self) -> Consistency:
        return parse_consistency(self.mode, self.staleness)

    @property
    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(
            name=self.optimizer,
            lr=self.lr,
            args=self.opt_args,
            schedule=self.schedule,
            horizon=self.optimizer_updates,
        )

    @property
    def optimizer_updates(self) -> int:
        """Optimizer updates each shard applies in the run, a schedule's default horizon: one
        per clock under BSP, one per push (every worker's every step) otherwise (DESIGN §3)."""
        return self.steps if self.consistency.aggregates else self.steps * self.workers

    @property
    def replication_policy(self) -> ReplicationPolicy:
        return ReplicationPolicy(
            mode=self.replication,  # type: ignore[arg-type]
            every_updates=self.replicate_every,
            interval_s=self.replicate_interval_ms / 1000,
            compact_replay_s=self.compaction_budget_ms / 1000,
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

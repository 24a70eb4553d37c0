"""The optimizer a run's shards apply: an optax alias by name, its arguments and a learning-rate
schedule (DESIGN §4), and the parsing of `--opt` and `--schedule`. Validated without importing
optax where the name is one every optax has, so a shard with a constant rate starts without it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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


def default_lr(optimizer: str) -> float:
    """The learning rate a run gets when none is given: plain gradient descent (sgd, momentum)
    takes larger steps than the adaptive optimizers. `RunConfig.of` applies it, so every way
    into a run uses this one rule."""
    return 0.1 if optimizer in ("sgd", "momentum") else 0.01

"""What members publish in their heartbeats, as typed values (DESIGN §5 Liveness, §9).

A member's record in the store carries an `info` object that its heartbeats shallow-merge into
(`Store.heartbeat`): a key a beat does not mention keeps its stored value. Each report here is
the one source of its part of that object: `to_info()` is the one function that builds the
heartbeat dict from it, `from_info()` reads it back, and a field left None is not part of the
beat (the stored value, if any, is kept). Both come from `Stored`: a report's fields are its
stored keys, and each is read back by the reader its type names. Readers do not use these
directly but the parsed record, `tether.member.view.MemberView`.

- `BeatReport`: what the heartbeat thread adds to every member's beat (`tether.member.heartbeat`).
- `WorkerReport`: what a worker publishes (worker/loop.py): its progress every heartbeat
  interval, `resumed_at` once its clock is read back from the shards (it serves), and its last
  clock when it exits.
- `LauncherReport`: what the driver publishes about the run (tether/driver/launcher.py).
- `ShardNumbers`: what a shard publishes, built from its `ShardReport` (server/report.py) by
  `ShardReport.heartbeat`; `Recovered` is how its state was rebuilt when it started.

The keys and their values are a stored contract: other processes and runs written by older
versions read them, so they do not change.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def parse(convert: Callable[[Any], T], value: Any) -> T | None:
    """`convert(value)`, or None when the value is missing or not of the kind expected: a record
    written by another version of Tether reads as "not reported", never as an error."""
    if value is None:
        return None
    try:
        return convert(value)
    except (TypeError, ValueError, AttributeError):
        return None


def counts(value: Any) -> dict[str, int]:
    """A JSON object of counts (e.g. "shard:epoch" -> n)."""
    return {str(k): int(v) for k, v in dict(value).items()}


def ints(value: Any) -> tuple[int, ...]:
    if isinstance(value, Mapping):  # keyed by id: in id order
        return tuple(int(value[k]) for k in sorted(value, key=int))
    return tuple(int(v) for v in value)


def records(value: Any) -> tuple[dict[str, Any], ...]:
    """A JSON list of objects, in order."""
    return tuple(dict(r) for r in value)


S = TypeVar("S", bound="Stored")


class Stored:
    """A report whose stored form is its fields under their own names, in declaration order
    (the order they are stored in). `to_info` writes the fields that are not None; `from_info`
    reads each back, through `parse`, with the reader of the type the field holds (`_READERS`;
    a nested report by its own `from_info`)."""

    __slots__ = ()

    def to_info(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, Stored):
                value = value.to_info()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_info(cls: type[S], info: Mapping[str, Any]) -> S:
        return cls(**{name: parse(read, info.get(name)) for name, read in _readers(cls).items()})


# How a stored value is read, by the type its field holds when it is not None.
_READERS: dict[Any, Callable[[Any], Any]] = {
    int: int,
    float: float,
    str: lambda v: str(v) or None,  # an empty string is not reported
    tuple[int, ...]: ints,
    Mapping[str, int]: counts,
    tuple[Mapping[str, Any], ...]: records,
}


_BY_CLASS: dict[type, dict[str, Callable[[Any], Any]]] = {}


def _readers(cls: type) -> dict[str, Callable[[Any], Any]]:
    """Field name -> reader, for a report class (worked out once per class)."""
    if cls not in _BY_CLASS:
        out: dict[str, Callable[[Any], Any]] = {}
        for name, hint in typing.get_type_hints(cls).items():
            held = next(a for a in typing.get_args(hint) or (hint,) if a is not type(None))
            nested = isinstance(held, type) and issubclass(held, Stored)
            out[name] = held.from_info if nested else _READERS[held]
        _BY_CLASS[cls] = out
    return _BY_CLASS[cls]


@dataclass(frozen=True, slots=True)
class BeatReport(Stored):
    """Added to every beat by the heartbeat thread, whatever the member's role."""

    heartbeats_skipped: int | None = None  # beats this process could not write (store busy)
    peak_rss_bytes: int | None = None  # this process's peak resident memory
    spawn: str | None = None  # the driver's token for the start that made this process
    metrics_url: str | None = None  # its Prometheus endpoint, when it serves one (DESIGN §13)


@dataclass(frozen=True, slots=True)
class WorkerReport(Stored):
    """What a worker publishes. The fields are in the order the progress beat stores them."""

    clock: int | None = None  # iterations done (the next clock it pulls)
    loss: float | None = None  # the last mini-batch loss
    samples_per_s: float | None = None  # since the worker started training
    wait_s: float | None = None  # time spent waiting for pulls so far
    reconnects: int | None = None  # shard re-resolutions after failures
    # The ack ledger's read-outs (worker/ledger.py), audited against the shards' logs:
    lost_updates: Mapping[str, int] | None = None  # "shard:epoch" -> acked versions lost
    acked_seqs: tuple[int, ...] | None = None  # per shard, the highest seq acknowledged
    lost_acked: Mapping[str, int] | None = None  # "shard:epoch" -> acked pushes lost
    peak_rss_bytes: int | None = None
    resumed_at: float | None = None  # unix time its clock was read back: serving (again)


@dataclass(frozen=True, slots=True)
class LauncherReport(Stored):
    """What the driver publishes about its run while it trains (`tether status` reads it)."""

    phase: str | None = None  # "train"
    restarts: Mapping[str, int] | None = None  # per role, so far
    recoveries: tuple[Mapping[str, Any], ...] | None = None  # policy.Recovery.to_json(), in order


@dataclass(frozen=True, slots=True)
class Recovered(Stored):
    """How a shard's state was rebuilt when it started: the base and the log entries after it."""

    base_version: int | None
    entries: int | None
    replay_s: float | None
    load_s: float | None = None  # set by the shard process: reading the base and log


@dataclass(frozen=True, slots=True)
class ShardNumbers(Stored):
    """What a shard's heartbeat reports: built by `ShardReport.heartbeat` (server/report.py)
    from the shard's report, read back by `MemberView`."""

    version: int | None = None
    durable_version: int | None = None
    replication_lag_max_s: float | None = None  # longest first change -> durable so far
    updates_applied: int | None = None
    clocks: tuple[int, ...] | None = None  # per worker, in worker id order
    max_clock_gap: int | None = None
    base_version: int | None = None  # the store's base; the log after it holds log_entries
    log_entries: int | None = None
    restored_version: int | None = None  # the version it started from
    recovered: Recovered | None = None  # None: it started from the initial parameters
    serving_since: float | None = None  # unix time it started serving: its state is loaded

"""What members publish in their heartbeats, as typed values (DESIGN §5 Liveness, §9).

A member's record in the store carries an `info` object that its heartbeats shallow-merge into
(`Store.heartbeat`): a key a beat does not mention keeps its stored value. Each report here is
the one source of its part of that object: `to_info()` is the one function that builds the
heartbeat dict from it, `from_info()` reads it back, and a field left None is not part of the
beat (the stored value, if any, is kept). Readers do not use these directly but the parsed
record, `tether.member.view.MemberView`.

- `BeatReport`: what the heartbeat thread adds to every member's beat (`tether.member.heartbeat`).
- `WorkerReport`: what a worker publishes (worker/loop.py): its progress every heartbeat
  interval, `resumed_at` once its clock is read back from the shards (it serves), and its last
  clock when it exits.
- `LauncherReport`: what the driver publishes about the run (tether/driver/launcher.py).

- `ShardNumbers`: what a shard publishes, built from its `ShardReport` (server/report.py) by
  `ShardReport.heartbeat`; `Recovered` is how its state was rebuilt when it started.

The keys and their values are a stored contract: other
processes and runs written by older versions read them, so they do not change.
"""

from __future__ import annotations

import dataclasses
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


def _info(report: Any) -> dict[str, Any]:
    """The reported fields in declaration order (the order they are stored in), as JSON values."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(report):
        value = getattr(report, f.name)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        out[f.name] = value
    return out


@dataclass(frozen=True, slots=True)
class BeatReport:
    """Added to every beat by the heartbeat thread, whatever the member's role."""

    heartbeats_skipped: int | None = None  # beats this process could not write (store busy)
    peak_rss_bytes: int | None = None  # this process's peak resident memory
    spawn: str | None = None  # the driver's token for the start that made this process

    def to_info(self) -> dict[str, Any]:
        return _info(self)

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> BeatReport:
        return cls(
            heartbeats_skipped=parse(int, info.get("heartbeats_skipped")),
            peak_rss_bytes=parse(int, info.get("peak_rss_bytes")),
            spawn=parse(str, info.get("spawn")) or None,
        )


@dataclass(frozen=True, slots=True)
class WorkerReport:
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

    def to_info(self) -> dict[str, Any]:
        """The heartbeat dict: the reported fields only, under their stored names."""
        return _info(self)

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> WorkerReport:
        return cls(
            clock=parse(int, info.get("clock")),
            loss=parse(float, info.get("loss")),
            samples_per_s=parse(float, info.get("samples_per_s")),
            wait_s=parse(float, info.get("wait_s")),
            reconnects=parse(int, info.get("reconnects")),
            lost_updates=parse(counts, info.get("lost_updates")),
            acked_seqs=parse(ints, info.get("acked_seqs")),
            lost_acked=parse(counts, info.get("lost_acked")),
            peak_rss_bytes=parse(int, info.get("peak_rss_bytes")),
            resumed_at=parse(float, info.get("resumed_at")),
        )


@dataclass(frozen=True, slots=True)
class LauncherReport:
    """What the driver publishes about its run while it trains (`tether status` reads it)."""

    phase: str | None = None  # "train"
    restarts: Mapping[str, int] | None = None  # per role, so far
    recoveries: tuple[Mapping[str, Any], ...] | None = None  # policy.Recovery.to_json(), in order

    def to_info(self) -> dict[str, Any]:
        return _info(self)

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> LauncherReport:
        return cls(
            phase=parse(str, info.get("phase")),
            restarts=parse(counts, info.get("restarts")),
            recoveries=parse(lambda v: tuple(dict(r) for r in v), info.get("recoveries")),
        )


@dataclass(frozen=True, slots=True)
class Recovered:
    """How a shard's state was rebuilt when it started: the base and the log entries after it."""

    base_version: int | None
    entries: int | None
    replay_s: float | None
    load_s: float | None

    def to_info(self) -> dict[str, Any]:
        return _info(self)

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> Recovered:
        return cls(
            base_version=parse(int, info.get("base_version")),
            entries=parse(int, info.get("entries")),
            replay_s=parse(float, info.get("replay_s")),
            load_s=parse(float, info.get("load_s")),
        )


@dataclass(frozen=True, slots=True)
class ShardNumbers:
    """What a shard's heartbeat reports: built by `ShardReport.heartbeat` (server/report.py)
    from the shard's report, read back by `MemberView`."""

    version: int | None = None
    durable_version: int | None = None
    updates_applied: int | None = None
    clocks: tuple[int, ...] | None = None  # per worker, in worker id order
    max_clock_gap: int | None = None
    base_version: int | None = None  # the store's base; the log after it holds log_entries
    log_entries: int | None = None
    restored_version: int | None = None  # the version it started from
    recovered: Recovered | None = None  # None: it started from the initial parameters
    serving_since: float | None = None  # unix time it started serving: its state is loaded

    def to_info(self) -> dict[str, Any]:
        info = _info(dataclasses.replace(self, recovered=None))
        if self.recovered is not None:
            info["recovered"] = self.recovered.to_info()
        return info

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> ShardNumbers:
        return cls(
            version=parse(int, info.get("version")),
            durable_version=parse(int, info.get("durable_version")),
            updates_applied=parse(int, info.get("updates_applied")),
            clocks=parse(ints, info.get("clocks")),
            max_clock_gap=parse(int, info.get("max_clock_gap")),
            base_version=parse(int, info.get("base_version")),
            log_entries=parse(int, info.get("log_entries")),
            restored_version=parse(int, info.get("restored_version")),
            recovered=parse(Recovered.from_info, info.get("recovered")),
            serving_since=parse(float, info.get("serving_since")),
        )

"""Toxics: small named faults with a direction and a probability, registered by name.

Mirrors Toxiproxy 2.x's Go ``toxics/`` package: a toxic type is a frozen dataclass whose fields are
its JSON ``attributes`` plus an ``async pipe(stub)`` that moves chunks from ``stub.recv()`` to
``stub.emit()``; :class:`ToxicSpec` is the wrapper the API shows (name, type, stream, toxicity).
A ``stage.Stage`` runs one toxic on one link of the engine (``proxy.py``) and is its :class:`Stub`.

Contract for ``pipe`` (DESIGN §7: faults may stall or cut a stream, never corrupt it):

- ``recv()`` returns the next chunk, ``None`` at end of stream, and raises :class:`Interrupted`
  when the toxic is being updated or removed; return then (or let it propagate).
- ``sleep()`` returns ``False`` when interrupted: emit the data in hand *before* returning, so
  removing a toxic never loses data in flight.
- Returning after ``recv()`` gave ``None`` passes the end of stream on; ``close()`` ends the
  connection instead. Returning otherwise makes the toxic a pass-through for the rest.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, TypeVar, cast

Stream = Literal["upstream", "downstream"]
STREAMS: tuple[Stream, ...] = ("upstream", "downstream")


class Interrupted(Exception):
    """Raised by ``Stub.recv()``/``Stub.hold()`` when the toxic is updated or removed."""


class Stub(Protocol):
    """What a running toxic sees of its link (Toxiproxy's ToxicStub)."""

    rng: random.Random
    state: dict[str, Any]  # per (toxic, link), kept across updates (limit_data counts bytes)
    timestamp: float  # monotonic arrival time of the chunk last received

    async def recv(self) -> bytes | None: ...
    async def emit(self, data: bytes) -> None: ...
    async def sleep(self, seconds: float) -> bool: ...
    async def hold(self) -> None: ...
    async def close(self) -> None: ...
    def reset(self) -> None: ...


@dataclass(frozen=True)
class Toxic:
    """Base of every toxic type: its fields are the JSON attributes (ints, Toxiproxy's int64)."""

    type_name: ClassVar[str] = ""

    async def pipe(self, stub: Stub) -> None:
        """Pass everything through unchanged (Toxiproxy's noop toxic)."""
        while (data := await stub.recv()) is not None:
            await stub.emit(data)

    def validate(self) -> None:
        """Raise ValueError for attributes that make no sense; every attribute is >= 0."""
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{self.type_name}: {f.name} must be >= 0")

    def attributes(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REGISTRY: dict[str, type[Toxic]] = {}
T = TypeVar("T", bound=type[Toxic])


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a toxic type available to the API under ``name``."""

    def add(cls: T) -> T:
        cls.type_name = name
        REGISTRY[name] = cls
        return cls

    return add


@register("noop")
@dataclass(frozen=True)
class Noop(Toxic):
    """Does nothing; Toxiproxy registers it too."""


@register("latency")
@dataclass(frozen=True)
class Latency(Toxic):
    """Delays each chunk by latency ± jitter ms, counted from its arrival; order is kept."""

    latency: int = 0
    jitter: int = 0

    async def pipe(self, stub: Stub) -> None:
        while (data := await stub.recv()) is not None:
            delay = self.latency / 1000
            if self.jitter > 0:
                delay += stub.rng.uniform(-self.jitter, self.jitter) / 1000
            # Measured from arrival (like Toxiproxy's chunk timestamps), so chunks queued behind a
            # sleeping one are not delayed twice and throughput is not capped at a chunk per delay.
            due = stub.timestamp + max(delay, 0.0)
            wait = due - time.monotonic()
            if wait > 0 and not await stub.sleep(wait):
                await stub.emit(data)  # interrupted: no data on the floor
                return
            stub.timestamp = max(due, stub.timestamp)
            await stub.emit(data)


@register("bandwidth")
@dataclass(frozen=True)
class Bandwidth(Toxic):
    """Limits throughput to ``rate`` KB/s (1 KB = 1000 bytes, as Toxiproxy); 0 = unlimited."""

    rate: int = 0

    async def pipe(self, stub: Stub) -> None:
        bytes_per_s = self.rate * 1000
        slot = time.monotonic()  # when the next byte may leave
        while (data := await stub.recv()) is not None:
            if bytes_per_s <= 0:
                await stub.emit(data)
                continue
            # At most 100 ms worth at a time, as Toxiproxy, so a slow rate still trickles.
            piece_size = max(1, bytes_per_s // 10)
            view = memoryview(data)
            while view:
                piece, view = view[:piece_size], view[piece_size:]
                slot = max(slot, time.monotonic()) + len(piece) / bytes_per_s
                wait = slot - time.monotonic()
                if wait > 0 and not await stub.sleep(wait):
                    await stub.emit(bytes(piece) + bytes(view))
                    return
                await stub.emit(bytes(piece))


@register("slow_close")
@dataclass(frozen=True)
class SlowClose(Toxic):
    """Delays passing the close (end of stream) on by ``delay`` ms."""

    delay: int = 0

    async def pipe(self, stub: Stub) -> None:
        while (data := await stub.recv()) is not None:
            await stub.emit(data)
        await stub.sleep(self.delay / 1000)  # interrupted or not, the close is passed on now


@register("timeout")
@dataclass(frozen=True)
class Timeout(Toxic):
    """Stops all data; closes the connection after ``timeout`` ms (0 = hold until removed).

    Held data stays queued (the sender is back-pressured, as in a network partition) and flows
    on, complete and in order, when the toxic is removed. Toxiproxy 2.x instead drops the data
    and closes the connection on removal; the chaos runner wants a partition that heals.
    """

    timeout: int = 0

    async def pipe(self, stub: Stub) -> None:
        if self.timeout > 0:
            if await stub.sleep(self.timeout / 1000):
                await stub.close()
            return
        await stub.hold()


@register("reset_peer")
@dataclass(frozen=True)
class ResetPeer(Toxic):
    """On the first data, waits ``timeout`` ms then resets both ends (RST, SO_LINGER 0)."""

    timeout: int = 0

    async def pipe(self, stub: Stub) -> None:
        data = await stub.recv()
        if not await stub.sleep(self.timeout / 1000):
            if data is not None:
                await stub.emit(data)
            return
        stub.reset()  # the data that triggered it is dropped, as with a real reset


@register("slicer")
@dataclass(frozen=True)
class Slicer(Toxic):
    """Slices chunks into pieces of average_size ± size_variation bytes, ``delay`` µs apart."""

    average_size: int = 0
    size_variation: int = 0
    delay: int = 0

    def validate(self) -> None:
        super().validate()
        if self.average_size < 1:
            raise ValueError("slicer: average_size must be >= 1")
        if self.size_variation >= self.average_size:
            raise ValueError("slicer: size_variation must be less than average_size")

    async def pipe(self, stub: Stub) -> None:
        while (data := await stub.recv()) is not None:
            view = memoryview(data)
            while view:
                size = self.average_size + stub.rng.randint(
                    -self.size_variation, self.size_variation
                )
                piece, view = view[:size], view[size:]
                await stub.emit(bytes(piece))
                if view and not await stub.sleep(self.delay / 1_000_000):
                    await stub.emit(bytes(view))
                    return


@register("limit_data")
@dataclass(frozen=True)
class LimitData(Toxic):
    """Closes the connection once ``bytes`` bytes have passed (counted per link)."""

    bytes: int = 0

    async def pipe(self, stub: Stub) -> None:
        while (data := await stub.recv()) is not None:
            sent = stub.state.get("sent", 0)
            take = data[: max(self.bytes - sent, 0)]
            if take:
                await stub.emit(take)
                stub.state["sent"] = sent + len(take)
            if stub.state.get("sent", 0) >= self.bytes:
                await stub.close()
                return


@dataclass(frozen=True)
class ToxicSpec:
    """A toxic as the API shows it: ``{name, type, stream, toxicity, attributes}``."""

    name: str
    type: str
    stream: Stream
    toxicity: float
    toxic: Toxic

    def to_json(self) -> dict[str, Any]:
        return {
            "attributes": self.toxic.attributes(),
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": self.toxicity,
        }


class InvalidStream(ValueError):
    """The stream is neither upstream nor downstream."""


class InvalidType(ValueError):
    """No toxic is registered under that type."""


class ToxicExists(ValueError):
    """The proxy already has a toxic of that name."""


def parse_spec(body: Any, taken: Container[str] = ()) -> ToxicSpec:
    """A ToxicSpec from a decoded ``POST /proxies/{p}/toxics`` body (Toxiproxy's defaults).

    Raises, in Toxiproxy's order, InvalidStream, InvalidType, ToxicExists (name in ``taken``) or
    ValueError (bad body or attributes).
    """
    if not isinstance(body, dict):
        raise ValueError("toxic must be a JSON object")
    stream = _string(body, "stream", "downstream")
    if stream not in STREAMS:
        raise InvalidStream(stream)
    type_ = _string(body, "type", "")
    name = _string(body, "name", "") or f"{type_}_{stream}"
    if type_ not in REGISTRY:
        raise InvalidType(type_)
    if name in taken:
        raise ToxicExists(name)
    toxicity = _toxicity(body.get("toxicity", 1.0))
    toxic = build(type_, body.get("attributes", {}), None)
    return ToxicSpec(name, type_, cast(Stream, stream), toxicity, toxic)


def updated_spec(spec: ToxicSpec, body: Any) -> ToxicSpec:
    """``spec`` with the attributes and toxicity of an update body laid over it."""
    if not isinstance(body, dict):
        raise ValueError("toxic must be a JSON object")
    toxicity = _toxicity(body.get("toxicity", spec.toxicity))
    toxic = build(spec.type, body.get("attributes", {}), spec.toxic)
    return dataclasses.replace(spec, toxicity=toxicity, toxic=toxic)


def build(type_: str, attributes: Any, base: Toxic | None) -> Toxic:
    """A validated toxic of ``type_``; unknown attribute names are ignored, as Go's decoder does."""
    if attributes is None:
        attributes = {}
    if not isinstance(attributes, dict):
        raise ValueError("attributes must be a JSON object")
    cls = REGISTRY[type_]
    values = dataclasses.asdict(base) if base is not None else {}
    for f in dataclasses.fields(cls):
        if f.name in attributes:
            value = attributes[f.name]
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{type_}: attribute {f.name} must be an integer")
            values[f.name] = value
    toxic = cls(**values)
    toxic.validate()
    return toxic


def _string(body: dict[str, Any], key: str, default: str) -> str:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


def _toxicity(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError("toxicity must be a number between 0 and 1")
    return float(value)


NOOP = Noop()  # what a stage runs once its toxic is done, or while it is disabled

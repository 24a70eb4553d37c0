"""Toxics: small named faults with a direction and a probability, registered by name.

Mirrors Toxiproxy 2.x's Go ``toxics/`` package: a toxic type is a frozen dataclass whose fields are
its JSON ``attributes`` plus an ``async pipe(stub)`` that moves chunks from ``stub.recv()`` to
``stub.emit()``; :class:`ToxicSpec` is the wrapper the API shows (name, type, stream, toxicity).
A ``stage.Stage`` runs one toxic on one link of the engine (``proxy.py``) and is its :class:`Stub`.

Contract for ``pipe`` (DESIGN §7: faults may stall or cut a stream, never corrupt it):

- ``recv()`` returns the next chunk, ``None`` at end of stream, and raises :class:`Interrupted`
  when the toxic is being updated or removed; return then (or let it propagate).
  ``recv_until(deadline)`` is the same but gives ``None`` once the deadline passes too.
- ``sleep()`` returns ``False`` when interrupted: emit the data in hand *before* returning, so
  removing a toxic never loses data in flight; ``hold_with(data)`` holds ``data`` until then.
- Returning after ``recv()`` gave ``None`` passes the end of stream on; ``close()`` ends the
  connection instead. Returning otherwise makes the toxic a pass-through for the rest.
- ``cleanup()`` runs when the toxic is removed from a live link (Toxiproxy's ``CleanupToxic``):
  only ``timeout`` has one, and it closes the connection, dropping what it held, as Toxiproxy's
  own tests pin (``TestTimeoutToxicClosesConnectionOnRemove``).

Where Toxiproxy would crash or spin on an attribute (a slicer with ``average_size`` 0), the toxic
does the nearest sane thing; negative attributes are refused (400), which Toxiproxy accepts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Callable, Container, Sequence
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
    async def recv_until(self, deadline: float | None) -> bytes | None: ...
    async def sleep(self, seconds: float) -> bool: ...
    async def hold(self) -> None: ...
    async def hold_with(self, data: bytes) -> None: ...
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

    async def cleanup(self, stub: Stub) -> None:
        """Called when the toxic is removed from a live link (Toxiproxy's CleanupToxic)."""

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
    """Limits throughput to ``rate`` KB/s (1 KB = 1000 bytes, as Toxiproxy).

    A rate of 0 holds every byte until the toxic is updated or removed, as Toxiproxy 2.x does
    (its 100 ms loop then sends empty slices forever); the held data is passed on then.
    """

    rate: int = 0

    async def pipe(self, stub: Stub) -> None:
        bytes_per_s = self.rate * 1000
        slot = time.monotonic()  # when the next byte may leave
        while (data := await stub.recv()) is not None:
            if bytes_per_s <= 0:
                await stub.hold_with(data)
                return
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
    """Drops all data; closes the connection after ``timeout`` ms (0 = never), at the end of the
    stream, or when the toxic is removed (Toxiproxy's Cleanup; an update only restarts the
    clock). What it dropped is gone, as in Toxiproxy 2.x."""

    timeout: int = 0

    async def pipe(self, stub: Stub) -> None:
        deadline = time.monotonic() + self.timeout / 1000 if self.timeout > 0 else None
        while True:
            data = await stub.recv_until(deadline)
            if data is None:  # end of stream, or the timeout: close the connection
                await stub.close()
                return
            # Anything else is dropped on the floor, as Toxiproxy does.

    async def cleanup(self, stub: Stub) -> None:
        await stub.close()


@register("reset_peer")
@dataclass(frozen=True)
class ResetPeer(Toxic):
    """On the first data (or end of stream), waits ``timeout`` ms then resets both ends (RST,
    SO_LINGER 0). The wait is not cut short by removing the toxic, as in Toxiproxy 2.x, whose
    toxic ignores interrupts while it waits; the data that triggered it is dropped."""

    timeout: int = 0

    async def pipe(self, stub: Stub) -> None:
        await stub.recv()
        await asyncio.sleep(max(self.timeout, 0) / 1000)
        stub.reset()


@register("slicer")
@dataclass(frozen=True)
class Slicer(Toxic):
    """Slices chunks into pieces of about average_size ± size_variation bytes, sent ``delay`` µs
    apart, by Toxiproxy's recursive halving (``chunk``), so the pieces and their count match."""

    average_size: int = 0
    size_variation: int = 0
    delay: int = 0

    def chunk(self, rng: random.Random, start: int, end: int) -> list[int]:
        """Toxiproxy's ``SlicerToxic.chunk``: flat [start, end, start, end, ...] of the pieces."""
        out: list[int] = []
        todo = [(start, end)]
        while todo:  # depth first, left before right, without Python's recursion limit
            start, end = todo.pop()
            # ``end - start <= 1`` and the clamp below only matter where Toxiproxy would recurse
            # forever (average_size + size_variation < 1) or slice out of range and panic
            # (size_variation well above average_size); elsewhere the pieces are Toxiproxy's.
            if (end - start) - self.average_size <= self.size_variation or end - start <= 1:
                out += (start, end)
                continue
            mid = start + (end - start) // 2
            if self.size_variation > 0:
                mid += rng.randrange(self.size_variation * 2) - self.size_variation
                if not start <= mid <= end:
                    mid = min(max(mid, start + 1), end - 1)
            todo += ((mid, end), (start, mid))
        return out

    async def pipe(self, stub: Stub) -> None:
        while (data := await stub.recv()) is not None:
            bounds = self.chunk(stub.rng, 0, len(data))
            for i in range(1, len(bounds), 2):
                await stub.emit(data[bounds[i - 1] : bounds[i]])
                if not await stub.sleep(self.delay / 1_000_000):
                    if data[bounds[i] :]:
                        await stub.emit(data[bounds[i] :])
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
    """A toxic as the API shows it: ``{name, type, stream, toxicity, attributes}``.

    ``stream`` is the direction, lower case; ``stream_text`` is the stream as the client spelt it
    (Toxiproxy parses it case-insensitively but shows and names the toxic with what it was sent).
    """

    name: str
    type: str
    stream: Stream
    toxicity: float
    toxic: Toxic
    stream_text: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "attributes": self.toxic.attributes(),
            "name": self.name,
            "type": self.type,
            "stream": self.stream_text or self.stream,
            "toxicity": self.toxicity,
        }


class InvalidStream(ValueError):
    """The stream is neither upstream nor downstream."""


class InvalidType(ValueError):
    """No toxic is registered under that type."""


class ToxicExists(ValueError):
    """The proxy already has a toxic of that name."""


def parse_stream(text: str) -> Stream:
    """Toxiproxy's ``stream.ParseDirection``: "upstream" or "downstream" in any case, nothing else
    (no abbreviations, not empty); InvalidStream otherwise."""
    lowered = text.lower()
    if lowered not in STREAMS:
        raise InvalidStream(text)
    return cast(Stream, lowered)


def parse_spec(body: Any, taken: Container[str] = ()) -> ToxicSpec:
    """A ToxicSpec from a decoded ``POST /proxies/{p}/toxics`` body (Toxiproxy's defaults).

    Keys are matched as Go's encoding/json matches them (case-insensitively, the last one wins;
    null leaves the default). Raises, in Toxiproxy's order, InvalidStream, InvalidType,
    ToxicExists (name in ``taken``) or ValueError (bad body or attributes).
    """
    if body is None:
        body = {}  # Go decodes null into the defaults
    if not isinstance(body, dict):
        raise ValueError("toxic must be a JSON object")
    fields = _fold(body, ("name", "type", "stream", "toxicity", "attributes"))
    if not isinstance(fields.get("attributes", {}), dict | None):
        raise ValueError("attributes must be a JSON object")  # Go's first decode refuses it
    stream_text = _string(fields, "stream", "downstream")
    toxicity = _toxicity(fields.get("toxicity"), 1.0)
    name = _string(fields, "name", "")
    type_ = _string(fields, "type", "")
    stream = parse_stream(stream_text)
    name = name or f"{type_}_{stream_text}"
    if type_ not in REGISTRY:
        raise InvalidType(type_)
    if name in taken:
        raise ToxicExists(name)
    toxic = build(type_, fields.get("attributes"), None)
    return ToxicSpec(name, type_, stream, toxicity, toxic, stream_text)


def updated_spec(spec: ToxicSpec, body: Any) -> ToxicSpec:
    """``spec`` with the attributes and toxicity of an update body laid over it (the name, type
    and stream of an update body are ignored, as Toxiproxy ignores them)."""
    if body is None:
        body = {}  # Go decodes null as "no change"
    if not isinstance(body, dict):
        raise ValueError("toxic must be a JSON object")
    fields = _fold(body, ("toxicity", "attributes"))
    toxicity = _toxicity(fields.get("toxicity"), spec.toxicity)
    toxic = build(spec.type, fields.get("attributes"), spec.toxic)
    return dataclasses.replace(spec, toxicity=toxicity, toxic=toxic)


INT64 = range(-(1 << 63), 1 << 63)


def build(type_: str, attributes: Any, base: Toxic | None) -> Toxic:
    """A validated toxic of ``type_`` from JSON ``attributes`` laid over ``base`` (or defaults).

    As Go's decoder: names match case-insensitively, unknown names are ignored, null leaves a
    value as it was, and a value must be an integer in int64's range. A float with no fraction
    (``1.0``) is taken too, which Go refuses.
    """
    if attributes is None:
        attributes = {}
    if not isinstance(attributes, dict):
        raise ValueError("attributes must be a JSON object")
    cls = REGISTRY[type_]
    values = dataclasses.asdict(base) if base is not None else {}
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in _fold(attributes, names).items():
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value not in INT64:
            raise ValueError(f"{type_}: attribute {key} must be an integer")
        values[key] = value
    toxic = cls(**values)
    toxic.validate()
    return toxic


def _fold(obj: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """``obj``'s values under ``names``, its keys matched as Go's encoding/json matches struct
    fields: an exact or case-insensitive match, the last one in the object winning."""
    folded = {name.casefold(): name for name in names}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = folded.get(key.casefold()) if isinstance(key, str) else None
        if name is not None:
            out[name] = value
    return out


def _string(fields: dict[str, Any], key: str, default: str) -> str:
    value = fields.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


def _toxicity(value: Any, default: float) -> float:
    """Any JSON number, as Toxiproxy's float32: below 0 never runs, 1 or more always does."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("toxicity must be a number")
    return float(value)


NOOP = Noop()  # what a stage runs once its toxic is done, or while it is disabled

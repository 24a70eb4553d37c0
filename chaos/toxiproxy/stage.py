"""The per-link engine of a toxic: a :class:`Stage` runs one toxic on one link (DESIGN §7).

A stage is a task with a bounded inbox between the stage (or socket) before it and the one after
it; it is the :class:`~.toxics.Stub` its toxic's ``pipe`` sees. It knows its link only as a
:class:`Chain` (what ``proxy.Link`` offers it), so the engine and the proxy do not import each
other.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from typing import Any, Protocol

from .toxics import NOOP, Interrupted, ToxicSpec

log = logging.getLogger(__name__)

INBOX_LIMIT = 4 << 20  # bytes a stage may queue before the one feeding it waits


class Connection(Protocol):
    """What a stage may do to the connection of its link: reset_peer resets it, a failure aborts."""

    def reset(self) -> None: ...
    def abort(self) -> None: ...


class Chain(Protocol):
    """What a stage sees of its link (``proxy.Link``): the chain of stages it is in, and where
    what it emits goes."""

    stages: list[Stage]
    full_close: bool  # set by a toxic that closes: the destination is closed, not half-closed

    @property
    def conn(self) -> Connection: ...

    async def forward(self, stage: Stage, data: bytes | None, ts: float) -> None: ...
    def unlink(self, stage: Stage) -> None: ...
    def chain_has_space(self) -> None: ...


class Stage:
    """One toxic running on one link, as a task with a bounded inbox (Toxiproxy's ToxicStub).

    Control comes from the API: ``update()`` re-runs the toxic with new attributes, ``remove()``
    makes it forward what it holds, in order, then leave the link's chain.
    """

    def __init__(self, link: Chain, spec: ToxicSpec, rng: random.Random) -> None:
        self.link, self.spec, self.rng = link, spec, rng
        self.enabled = rng.random() < spec.toxicity  # toxicity is decided per connection
        self.state: dict[str, Any] = {}
        self.timestamp = time.monotonic()
        self.inbox: deque[tuple[bytes | None, float]] = deque()
        self.queued = 0
        self.interrupted = self.removing = self.eof_seen = self.closed = False
        self._loop = asyncio.get_running_loop()
        self._recv_waiter: asyncio.Future[None] | None = None
        self._sleep_waiter: asyncio.Future[None] | None = None
        self._space_waiters: list[asyncio.Future[None]] = []
        self.task = self._loop.create_task(self._run())

    # -- feeding, from the source or the previous stage --
    def put_nowait(self, data: bytes | None, ts: float) -> None:
        if self.task.done():
            return  # the toxic closed the stream: what follows is dropped, not queued
        self.inbox.append((data, ts))
        self.queued += len(data) if data else 0
        wake(self._recv_waiter)

    async def put(self, data: bytes | None, ts: float) -> None:
        self.put_nowait(data, ts)  # queued before waiting, so a drain always sees it
        while self.queued > INBOX_LIMIT and not self.task.done():
            fut = self._loop.create_future()
            self._space_waiters.append(fut)
            await fut

    def _took(self, data: bytes | None) -> None:
        self.queued -= len(data) if data else 0
        if self.queued <= INBOX_LIMIT:
            waiters, self._space_waiters = self._space_waiters, []
            for fut in waiters:
                wake(fut)
        if self.link.stages and self.link.stages[0] is self:
            self.link.chain_has_space()

    # -- the Stub interface --
    async def recv(self) -> bytes | None:
        while not self.inbox or self.interrupted:
            if self.interrupted:
                raise Interrupted
            self._recv_waiter = self._loop.create_future()
            try:
                await self._recv_waiter
            finally:
                self._recv_waiter = None
        data, self.timestamp = self.inbox.popleft()
        self._took(data)
        self.eof_seen = data is None
        return data

    async def recv_until(self, deadline: float | None) -> bytes | None:
        """The next chunk, or None at end of stream or once ``deadline`` (monotonic) passes."""
        if deadline is None:
            return await self.recv()
        while not self.inbox or self.interrupted:
            wait = deadline - time.monotonic()
            if self.interrupted:
                raise Interrupted
            if wait <= 0:
                return None
            self._recv_waiter = fut = self._loop.create_future()
            handle = self._loop.call_later(wait, wake, fut)
            try:
                await fut
            finally:
                handle.cancel()
                self._recv_waiter = None
        return await self.recv()

    async def emit(self, data: bytes) -> None:
        await self.link.forward(self, data, self.timestamp)

    async def sleep(self, seconds: float) -> bool:
        if self.interrupted:
            return False
        if seconds > 0:
            self._sleep_waiter = fut = self._loop.create_future()
            handle = self._loop.call_later(seconds, wake, fut)
            try:
                await fut
            finally:
                handle.cancel()
                self._sleep_waiter = None
        return not self.interrupted

    async def hold(self) -> None:
        while not self.interrupted:
            self._sleep_waiter = self._loop.create_future()
            try:
                await self._sleep_waiter
            finally:
                self._sleep_waiter = None
        raise Interrupted

    async def hold_with(self, data: bytes) -> None:
        """Hold ``data`` (and what queues behind it) until interrupted, then emit it first."""
        try:
            await self.hold()
        except Interrupted:
            await self.emit(data)  # no data on the floor
            raise

    async def close(self) -> None:
        self.closed = self.link.full_close = True
        await self.link.forward(self, None, self.timestamp)

    def reset(self) -> None:
        self.link.conn.reset()

    # -- control, from the API --
    def interrupt(self) -> None:
        self.interrupted = True
        wake(self._recv_waiter)
        wake(self._sleep_waiter)

    def update(self, spec: ToxicSpec) -> None:
        self.spec = spec
        self.enabled = self.rng.random() < spec.toxicity  # re-decided, as Toxiproxy re-runs it
        self.interrupt()

    def remove(self) -> None:
        self.removing = True
        if self.task.done():
            self.link.unlink(self)
        else:
            self.interrupt()

    async def _run(self) -> None:
        try:
            while True:
                self.interrupted = False
                try:
                    if self.enabled and not self.removing:
                        await self.spec.toxic.pipe(self)
                    if not (self.closed or self.eof_seen or self.interrupted):
                        await NOOP.pipe(self)  # a toxic that is done passes the rest through
                except Interrupted:
                    pass
                if self.removing and not (self.closed or self.eof_seen):
                    # Toxiproxy calls a removed toxic's Cleanup whether or not toxicity let it
                    # run; the timeout toxic's closes the connection.
                    await self.spec.toxic.cleanup(self)
                if self.closed:
                    if self.removing:
                        self.link.unlink(self)
                    return
                if self.eof_seen and self.interrupted and not self.removing:
                    # Updated after the end of stream: Toxiproxy re-runs the toxic on its closed
                    # input, which gives the end again (slow_close waits its new delay).
                    self.inbox.appendleft((None, self.timestamp))
                    self.eof_seen = False
                    continue
                if self.eof_seen:
                    await self.link.forward(self, None, self.timestamp)
                    break
                if self.removing:
                    await self._drain()
                    break
                # Interrupted by an update: run again with the new attributes.
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("toxic %s failed; dropping the connection", self.spec.name)
            self.link.conn.abort()
        if self.removing:
            self.link.unlink(self)

    async def _drain(self) -> None:
        """Forward everything still queued, in order; the caller then unlinks (no await between)."""
        while self.inbox:
            data, ts = self.inbox.popleft()
            self._took(data)
            await self.link.forward(self, data, ts)
            if data is None:
                return


def wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)

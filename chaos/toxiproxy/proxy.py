"""TCP proxy engine: proxies (listeners), connections and links (Toxiproxy's proxy.go, link.go).

Everything runs on one asyncio loop. A :class:`Proxy` accepts clients and dials its upstream per
client; a :class:`Connection` owns two :class:`Link` objects, ``upstream`` (client -> server) and
``downstream`` (server -> client). A link with no toxics is a straight copy: what a socket read
returns is written to the other transport at once, flow-controlled by pausing the reader while
the writer's buffer is full. With toxics, chunks go through a chain of ``stage.Stage`` tasks,
one per toxic, each with a bounded inbox (the sender is back-pressured, never buffered unbounded).

Toxics are added, updated and removed on live links as Toxiproxy does. A removed stage forwards
what it holds, in order, before it leaves the chain, so removing a toxic loses no data (DESIGN §7)
-- but a removed timeout toxic, which has dropped its data, closes the connection, as Toxiproxy's.
End of stream is passed on as a half-close; a toxic that closes (limit_data, timeout) closes the
connection, and reset_peer resets both ends with SO_LINGER 0.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import random
import socket
import struct
import sys
import threading
import time
from typing import Any, cast

from .stage import INBOX_LIMIT, Stage, wake
from .toxics import (
    InvalidStream,
    InvalidType,
    Stream,
    ToxicExists,
    ToxicSpec,
    parse_spec,
    updated_spec,
)

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20  # one socket read; large reads keep the per-byte Python cost negligible
WRITE_HIGH, WRITE_LOW = 4 << 20, 1 << 20  # transport buffer limits for pausing the reader
# From 3.12 a transport buffers the caller's memoryview instead of a copy of it.
WRITE_KEEPS_VIEW = sys.version_info >= (3, 12)
_local = threading.local()


def _read_buffer(renew: bool = False) -> memoryview:
    """The loop thread's read buffer: a socket read and its forwarding are one synchronous step
    (get_buffer, recv_into, buffer_updated), so every connection of a loop can share it."""
    if renew or getattr(_local, "view", None) is None:
        _local.view = memoryview(bytearray(READ_SIZE))
    return cast(memoryview, _local.view)


class ApiError(Exception):
    """An error with the HTTP status Toxiproxy gives it; the body is ``{"error", "status"}``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def split_address(address: str, what: str = "address") -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT`` or ``[IPv6]:PORT``; ValueError if it is neither.

    The strict form, for the API server's own ``--listen``; proxies parse as Go does
    (:func:`resolve`)."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an IPv6 host must be in brackets
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid {what} {address!r}: expected HOST:PORT with a port 0-65535")
    return host, int(port)


def format_address(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NetError(Exception):
    """An address Go's net package would refuse, worded as Go words it (``address x: ...``)."""


def go_split_host_port(hostport: str) -> tuple[str, str]:
    """Go's ``net.SplitHostPort``: the same leniency (an empty host or port) and error texts."""

    def fail(why: str) -> NetError:
        return NetError(f"address {hostport}: {why}")

    i = hostport.rfind(":")
    if i < 0:
        raise fail("missing port in address")
    j = k = 0
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise fail("missing ']' in address")
        if end + 1 == len(hostport):
            raise fail("missing port in address")
        if end + 1 != i:
            raise fail(
                "too many colons in address"
                if hostport[end + 1] == ":"
                else "missing port in address"
            )
        host, j, k = hostport[1:end], 1, end + 1
    else:
        host = hostport[:i]
        if ":" in host:
            raise fail("too many colons in address")
    if "[" in hostport[j:]:
        raise fail("unexpected '[' in address")
    if "]" in hostport[k:]:
        raise fail("unexpected ']' in address")
    return host, hostport[i + 1 :]


def _go_port(port: str) -> int:
    """Go's LookupPort for tcp: a number 0-65535, a service name, or empty (0)."""
    if port == "":
        return 0
    digits = port[1:] if port[0] in "+-" else port
    if digits.isascii() and digits.isdigit():
        if port[0] == "-" or int(digits) > 65535:
            raise NetError(f"address {port}: invalid port")
        return int(digits)
    try:
        return socket.getservbyname(port, "tcp")
    except (OSError, ValueError):
        raise NetError(f"lookup tcp/{port}: unknown port") from None


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(address: str) -> tuple[str, int]:
    """``(ip, port)`` as Go's ``net.ResolveTCPAddr("tcp", address)``: a host name becomes its
    first IPv4 address (an IPv6 one only when it has none); an empty host stays empty."""
    host, port_text = go_split_host_port(address)
    port = _go_port(port_text)
    if host == "":
        return "", port
    try:
        ipaddress.ip_address(host.partition("%")[0])
        return host, port
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, ValueError):  # UnicodeError is a ValueError
        raise NetError(f"lookup {host}: no such host") from None
    ips = [str(info[4][0]) for info in infos]
    v4 = [ip for ip in ips if ":" not in ip]
    if not ips:
        raise NetError(f"lookup {host}: no such host")
    return (v4 or ips)[0], port


async def resolved(address: str) -> str:
    """The address as Go's ``ResolveTCPAddr(...).String()`` prints it (``localhost:80`` ->
    ``127.0.0.1:80``, ``:80`` stays ``:80``)."""
    return join_host_port(*await resolve(address))


def _wildcard_socket(port: int) -> socket.socket:
    """A listening socket on every interface: IPv6 dual-stack when the host has IPv6."""
    if socket.has_ipv6:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError:
            sock = None
        try:
            if sock is None:
                raise OSError(errno.EAFNOSUPPORT, "no IPv6")
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", port))
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
            return sock
        except OSError as e:
            if sock is not None:
                sock.close()
            if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Side(asyncio.BufferedProtocol):
    """One socket of a connection (the client's or the upstream's)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.reader: Link | None = None  # the link reading from this socket
        self.writer: Link | None = None  # the link writing to it
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()  # until both sides are connected and linked
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self.conn.side_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        assert self.reader is not None
        if self.reader.feed_view(_read_buffer()[:nbytes]):
            # The other transport kept part of the view (Python >= 3.12 buffers without copying):
            # read into a fresh buffer rather than overwrite bytes still to be sent.
            _read_buffer(renew=True)

    def eof_received(self) -> bool:
        if self.reader is not None:
            self.reader.feed_eof()
        return True  # keep the write side open: a half-close is passed on as one

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake_writers()
        self.conn.side_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.writer is not None:
            self.writer.dest_paused(True)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writers()
        if self.writer is not None:
            self.writer.dest_paused(False)

    async def writable(self) -> None:
        while self._write_paused and self.transport is not None and not self.transport.is_closing():
            fut = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut

    def _wake_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            wake(fut)


class Link:
    """One direction of a connection: source socket -> toxic stages -> destination socket."""

    def __init__(self, conn: Connection, stream: Stream, src: Side, dst: Side) -> None:
        self.conn, self.stream, self.src, self.dst = conn, stream, src, dst
        src.reader = dst.writer = self
        self.stages: list[Stage] = []
        self.eof_in = False  # the source ended
        self.done = False  # end of stream delivered, or the destination is gone
        self.full_close = False  # a toxic asked to close the connection, not half-close it
        self._pause_chain = self._pause_dest = self._reading_paused = False

    def feed_view(self, view: memoryview) -> bool:
        """Data read from the source; True if the destination transport kept a reference."""
        if self.stages:
            first = self.stages[0]
            first.put_nowait(bytes(view), time.monotonic())
            if first.queued > INBOX_LIMIT:
                self._pause_chain = True
                self._update_reading()
            return False
        if self.done or self.dst.transport is None:
            return False
        self.dst.transport.write(view)  # the straight copy: no toxics, no extra Python work
        return WRITE_KEEPS_VIEW and self.dst.transport.get_write_buffer_size() > 0

    def feed_eof(self) -> None:
        if self.eof_in:
            return
        self.eof_in = True
        if self.stages:
            self.stages[0].put_nowait(None, time.monotonic())
        else:
            self._deliver_eof()

    async def forward(self, stage: Stage, data: bytes | None, ts: float) -> None:
        """Pass what ``stage`` emits to the next stage, or to the destination."""
        i = self.stages.index(stage) + 1
        if i < len(self.stages):
            await self.stages[i].put(data, ts)
        elif data is None:
            self._deliver_eof()
        elif not self.done and self.dst.transport is not None:
            self.dst.transport.write(data)
            await self.dst.writable()

    def add_stage(self, spec: ToxicSpec, rng: random.Random) -> None:
        self.stages.append(Stage(self, spec, rng))

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.spec.name == name and not s.removing), None)

    def unlink(self, stage: Stage) -> None:
        if stage in self.stages:
            self.stages.remove(stage)
            self.chain_has_space()

    def chain_has_space(self) -> None:
        if self._pause_chain and (not self.stages or self.stages[0].queued <= INBOX_LIMIT):
            self._pause_chain = False
            self._update_reading()

    def dest_paused(self, paused: bool) -> None:
        self._pause_dest = paused
        self._update_reading()

    def _update_reading(self) -> None:
        want = self._pause_chain or self._pause_dest
        t = self.src.transport
        if want != self._reading_paused and t is not None and not t.is_closing():
            self._reading_paused = want
            t.pause_reading() if want else t.resume_reading()

    def _deliver_eof(self) -> None:
        if self.done:
            return
        self.done = True
        t = self.dst.transport
        if t is not None and not t.is_closing():
            if self.full_close:
                t.close()  # flushes, then the other direction ends when this socket is lost
            elif t.can_write_eof():
                t.write_eof()
        self.conn.check_done()

    def cancel(self) -> None:
        for stage in self.stages:
            stage.task.cancel()


class Connection:
    """A client, its upstream connection and the two links between them."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.client, self.upstream = Side(self), Side(self)
        self.links: dict[str, Link] = {}
        self.closed = False
        self._connect: asyncio.Task[None] | None = None

    def side_made(self, side: Side) -> None:
        if side is self.client:
            self._connect = asyncio.get_running_loop().create_task(self._dial())

    async def _dial(self) -> None:
        try:
            # As Go's net.Dial: the upstream is parsed and resolved per client, not when set.
            host, port_text = go_split_host_port(self.proxy.upstream)
            port = _go_port(port_text)
            await asyncio.get_running_loop().create_connection(
                lambda: self.upstream, host or "localhost", port
            )
        except (OSError, NetError, ValueError) as e:
            log.info(
                "proxy %s: upstream %s unreachable: %s", self.proxy.name, self.proxy.upstream, e
            )
            self.close()  # as Toxiproxy: the client is closed when the upstream cannot be reached
            return
        if self.closed:
            self.abort()
            return
        up = self.links["upstream"] = Link(self, "upstream", self.client, self.upstream)
        down = self.links["downstream"] = Link(self, "downstream", self.upstream, self.client)
        for spec in self.proxy.toxics:
            (up if spec.stream == "upstream" else down).add_stage(spec, self.proxy.rng)
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.resume_reading()

    def side_lost(self, side: Side) -> None:
        if all(s.lost or s.transport is None for s in (self.client, self.upstream)):
            self.proxy.connections.discard(self)  # both sockets are closed now
        if self.closed:
            return
        if side.reader is None or side.writer is None:
            self.abort()  # lost before it was linked
            return
        side.writer.done = True  # nothing more can be delivered to this side
        side.reader.feed_eof()  # what was read from it still goes through its toxics
        self.check_done()

    def check_done(self) -> None:
        if self.links and all(link.done for link in self.links.values()):
            self.close()

    def close(self) -> None:
        """Close both sockets after their buffers are flushed."""
        self._finish(lambda t: t.close())

    def abort(self) -> None:
        """Drop the connection now (what disabling or deleting the proxy does)."""
        self._finish(lambda t: t.abort())

    def reset(self) -> None:
        """Reset both ends: SO_LINGER 0 makes the close send RST instead of FIN."""
        for side in (self.client, self.upstream):
            sock = side.transport.get_extra_info("socket") if side.transport else None
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
        self.abort()

    def _finish(self, how: Any) -> None:
        # Idempotent, and abort() after close() still drops a socket that is slow to flush.
        if not self.closed:
            self.closed = True
            if self._connect is not None and not self._connect.done():
                self._connect.cancel()
            for link in self.links.values():
                link.cancel()
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.lost:
                how(side.transport)


class Proxy:
    """A named listener forwarding every client to ``upstream`` through its toxics."""

    def __init__(self, name: str, listen: str, upstream: str, rng: random.Random) -> None:
        self.name, self.listen, self.upstream, self.rng = name, listen, upstream, rng
        self.enabled = False
        self.toxics: list[ToxicSpec] = []
        self.connections: set[Connection] = set()
        self._server: asyncio.Server | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            "toxics": self.toxics_json(),
        }

    def toxics_json(self) -> list[dict[str, Any]]:
        # Toxiproxy lists the upstream chain first, then the downstream one, each in order.
        ordered = sorted(self.toxics, key=lambda s: s.stream != "upstream")
        return [spec.to_json() for spec in ordered]

    async def start(self) -> None:
        """Listen as Go's ``net.Listen("tcp", listen)``; report the bound address as ``listen``.

        A host name is resolved (its first IPv4 address), an empty host binds every interface
        (IPv6 dual-stack where there is one, as Go, so it reads ``[::]:PORT``); failures are
        500s worded as Go's (``listen tcp 127.0.0.1:80: bind: address already in use``).
        """
        if self.enabled:
            return
        try:
            host, port = await resolve(self.listen)
        except NetError as e:
            raise ApiError(f"listen tcp: {e}", 500) from None
        loop = asyncio.get_running_loop()
        try:
            if host == "":
                server = await loop.create_server(self._accept, sock=_wildcard_socket(port))
            else:
                server = await loop.create_server(self._accept, host, port)
        except OSError as e:
            reason = os.strerror(e.errno).lower() if e.errno else str(e)
            raise ApiError(
                f"listen tcp {join_host_port(host, port)}: bind: {reason}", 500
            ) from None
        self._server = server
        self.listen = format_address(server.sockets[0].getsockname())
        self.enabled = True

    async def differs(self, listen: str, upstream: str) -> bool:
        """Toxiproxy's ``Proxy.Differs``: ``listen`` is resolved before it is compared with this
        proxy's (as reported) listen address; NetError when it cannot be resolved."""
        return self.listen != await resolved(listen) or self.upstream != upstream

    def stop(self) -> None:
        """Stop listening and drop every live connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.enabled = False
        for conn in list(self.connections):
            conn.abort()

    def retarget(self, upstream: str) -> None:
        """Send new clients to `upstream` and drop the live ones, without closing the port."""
        self.upstream = upstream
        for conn in list(self.connections):
            conn.abort()

    def _accept(self) -> Side:
        conn = Connection(self)
        self.connections.add(conn)
        return conn.client

    # -- toxics --
    def toxic(self, name: str) -> ToxicSpec:
        for spec in self.toxics:
            if spec.name == name:
                return spec
        raise ApiError("toxic not found", 404)

    def add_toxic(self, body: Any) -> ToxicSpec:
        try:
            spec = parse_spec(body, {s.name for s in self.toxics})
        except InvalidStream:
            raise ApiError(
                "stream was invalid, can be either upstream or downstream", 400
            ) from None
        except InvalidType:
            raise ApiError("invalid toxic type", 400) from None
        except ToxicExists:
            raise ApiError("toxic already exists", 409) from None
        except ValueError as e:
            raise ApiError(f"bad request body: {e}", 400) from None
        self.toxics.append(spec)
        for conn in self.connections:
            if conn.links:
                conn.links[spec.stream].add_stage(spec, self.rng)
        return spec

    def update_toxic(self, name: str, body: Any) -> ToxicSpec:
        old = self.toxic(name)
        try:
            spec = updated_spec(old, body)
        except ValueError as e:
            raise ApiError(f"bad request body: {e}", 400) from None
        self.toxics[self.toxics.index(old)] = spec
        for conn in self.connections:
            stage = conn.links[spec.stream].stage(name) if conn.links else None
            if stage is not None:
                stage.update(spec)
        return spec

    def remove_toxic(self, name: str) -> None:
        spec = self.toxic(name)
        self.toxics.remove(spec)
        for conn in self.connections:
            stage = conn.links[spec.stream].stage(name) if conn.links else None
            if stage is not None:
                stage.remove()

    def reset_toxics(self) -> None:
        for spec in list(self.toxics):
            self.remove_toxic(spec.name)

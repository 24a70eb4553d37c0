"""The Toxiproxy 2.x HTTP API over the proxy engine, and the handles that run it (DESIGN §7).

Routes, status codes and bodies follow Toxiproxy's ``api.go`` so that its clients
(``toxiproxy-python``, the Go and Ruby clients, ``toxiproxy-cli``) work unchanged:

    GET /proxies · POST /proxies · POST /populate · GET|POST|PATCH|DELETE /proxies/{proxy}
    GET|POST /proxies/{proxy}/toxics · GET|POST|PATCH|DELETE /proxies/{proxy}/toxics/{toxic}
    POST /reset · GET /version

Errors are ``{"error": "...", "status": N}``; every routed response carries an
``X-Toxiproxy-Request-Id`` header (Toxiproxy >= 2.5.0). Bodies are decoded as Go's encoding/json
decodes them into Toxiproxy's structs (keys case-insensitive, null a no-op); listen addresses are
parsed and resolved as Go's net package does (proxy.py).

The HTTP server is a small HTTP/1.1 one on asyncio (keep-alive, Content-Length or chunked
bodies); it shares the loop with every proxy, so API calls and the data path never race.
:class:`ProxyServer` runs that loop in a background thread; :func:`serve` is
``tether chaos proxy``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import threading
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from .proxy import ApiError, NetError, Proxy, format_address, resolved, split_address

VERSION = "tether-chaos 0.1.0"
DEFAULT_LISTEN = "127.0.0.1:0"  # Toxiproxy binds every interface when listen is empty
MAX_BODY = 1 << 20
TEXT = "text/plain; charset=utf-8"  # Go's http.Error and NotFound
IDLE_TIMEOUT_S = 60.0  # as Toxiproxy's http.Server IdleTimeout

Response = tuple[int, Any]  # status, JSON-able body (None: no body)


def _decode(body: bytes) -> Any:
    """Decode the first JSON value of a body, as Go's json.Decoder does (trailing data ignored)."""
    text = body.decode("utf-8", errors="replace").lstrip()
    if not text:
        raise ApiError("bad request body: EOF", 400)
    try:
        return json.JSONDecoder().raw_decode(text)[0]
    except json.JSONDecodeError as e:
        raise ApiError(f"bad request body: {e}", 400) from None


_FIELDS = {"name": str, "listen": str, "upstream": str, "enabled": bool}


def _proxy_fields(body: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """name/listen/upstream/enabled from a request body over ``defaults``, decoded as Go's
    encoding/json decodes into Toxiproxy's Proxy: keys match case-insensitively, null leaves a
    default alone, unknown keys are ignored; addresses are not checked here (see Proxy.start)."""
    if body is None:
        body = {}  # Go decodes null into a struct as a no-op
    if not isinstance(body, dict):
        raise ApiError("bad request body: json: cannot unmarshal into Go value of type Proxy", 400)
    out = dict(defaults)
    for raw_key, value in body.items():
        key = raw_key.lower()
        kind = _FIELDS.get(key)
        if kind is None or value is None:
            continue
        if not isinstance(value, kind):
            got = _json_kind(value)
            raise ApiError(
                f"bad request body: json: cannot unmarshal {got} into Go struct field "
                f"Proxy.{key} of type {'string' if kind is str else 'bool'}",
                400,
            )
        out[key] = value
    return out


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _required(fields: dict[str, Any], where: str = "") -> None:
    for key in ("name", "upstream"):
        if not fields[key]:
            raise ApiError(f"missing required field: {key}{where}", 400)


class PopulateError(ApiError):
    """A populate that stopped at an entry; ``proxies`` are those done before it (kept)."""

    def __init__(self, error: ApiError, proxies: list[Proxy]) -> None:
        super().__init__(error.message, error.status)
        self.proxies = proxies


class Collection:
    """The named proxies (Toxiproxy's ProxyCollection)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.proxies: dict[str, Proxy] = {}

    def get(self, name: str) -> Proxy:
        proxy = self.proxies.get(name)
        if proxy is None:
            raise ApiError("proxy not found", 404)
        return proxy

    async def create(self, body: Any) -> Proxy:
        fields = _proxy_fields(body, {"name": "", "listen": "", "upstream": "", "enabled": True})
        _required(fields)
        if fields["name"] in self.proxies:
            raise ApiError("proxy already exists", 409)
        listen = fields["listen"] or DEFAULT_LISTEN
        proxy = Proxy(fields["name"], listen, fields["upstream"], self.rng)
        if fields["enabled"]:
            await proxy.start()
        self.proxies[proxy.name] = proxy
        return proxy

    async def update(self, name: str, body: Any) -> Proxy:
        """Toxiproxy's ``Proxy.Update``: a listen address that resolves to the current one is no
        change (``localhost:PORT`` for ``127.0.0.1:PORT``); a change restarts the listener and
        drops live connections; the name in the body is ignored."""
        proxy = self.get(name)
        current = {"name": name, "listen": proxy.listen, "upstream": proxy.upstream}
        fields = _proxy_fields(body, {**current, "enabled": proxy.enabled})
        listen = fields["listen"] or DEFAULT_LISTEN
        try:
            same_listen = proxy.listen == await resolved(listen)
        except NetError as e:
            raise ApiError(str(e), 500) from None
        differs = not same_listen or fields["upstream"] != proxy.upstream
        if differs and same_listen and proxy.enabled and fields["enabled"]:
            # A new upstream only: live connections are dropped, as Toxiproxy does, but the port
            # stays open. (Toxiproxy closes and re-binds it, and in between another socket may
            # take the port; chaos runs re-point links at every shard replacement.)
            proxy.retarget(fields["upstream"])
        elif differs:
            proxy.stop()
            proxy.listen, proxy.upstream = listen, fields["upstream"]
        if fields["enabled"] and not proxy.enabled:
            await proxy.start()  # if it fails the proxy stays disabled, as in Toxiproxy
        elif not fields["enabled"] and proxy.enabled:
            proxy.stop()
        return proxy

    def remove(self, name: str) -> None:
        self.get(name).stop()
        del self.proxies[name]

    async def populate(self, body: Any) -> list[Proxy]:
        """Toxiproxy's ``PopulateJson``: every entry is checked for a name and an upstream first
        (nothing is changed if one lacks them); then, in order, an entry whose resolved listen
        address and upstream equal an existing proxy's keeps that proxy as it is (toxics,
        connections and enabled state too), and any other replaces or creates one. The first
        entry that fails stops it: the ones before it stay (PopulateError carries them)."""
        if body is None:
            body = []  # Go decodes null into a slice as an empty one
        if not isinstance(body, list):
            raise ApiError(
                "bad request body: json: cannot unmarshal into Go value of type []Proxy", 400
            )
        default = {"name": "", "listen": "", "upstream": "", "enabled": True}
        wanted = [_proxy_fields(item, default) for item in body]
        for i, fields in enumerate(wanted):
            _required(fields, f" at proxy {i + 1}")
        result: list[Proxy] = []
        for f in wanted:
            try:
                result.append(await self._add_or_replace(f))
            except ApiError as e:
                raise PopulateError(e, result) from None
        return result

    async def _add_or_replace(self, f: dict[str, Any]) -> Proxy:
        listen = f["listen"] or DEFAULT_LISTEN
        old = self.proxies.get(f["name"])
        if old is not None:
            try:
                if not await old.differs(listen, f["upstream"]):
                    return old  # unchanged: kept as it is
            except NetError as e:
                raise ApiError(str(e), 500) from None
            old.stop()  # if the new one fails to start, the old one stays, stopped (as Toxiproxy)
        new = Proxy(f["name"], listen, f["upstream"], self.rng)
        if f["enabled"]:
            await new.start()
        self.proxies[new.name] = new
        return new

    async def reset(self) -> None:
        for proxy in list(self.proxies.values()):
            await proxy.start()
            proxy.reset_toxics()

    def clear(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()
        self.proxies.clear()


def route_of(method: str, path: str) -> int:
    """200 if Toxiproxy's router has a route for this request, else its 404 or 405."""
    parts = unquote(path).split("/")[1:]
    if not all(parts):
        return 404
    known = {
        ("version",): {"GET"},
        ("reset",): {"POST"},
        ("populate",): {"POST"},
        ("proxies",): {"GET", "POST"},
        ("proxies", "*"): {"GET", "POST", "PATCH", "DELETE"},
        ("proxies", "*", "toxics"): {"GET", "POST"},
        ("proxies", "*", "toxics", "*"): {"GET", "POST", "PATCH", "DELETE"},
    }
    shape = tuple("*" if i in (1, 3) else p for i, p in enumerate(parts))
    methods = known.get(shape)
    if methods is None:
        return 404
    return 200 if method in methods else 405


class VersionBody(str):
    """/version's body, written as Toxiproxy writes it: ``{"version": "..."}`` and a newline."""


def request_id() -> str:
    """A 20-character id like the xid Toxiproxy's X-Toxiproxy-Request-Id carries (since 2.5.0)."""
    return base64.b32hexencode(os.urandom(12)).decode().lower().rstrip("=")


class Api:
    """Routes requests to the collection; one lock serialises changes, as Toxiproxy's mutexes."""

    def __init__(self, rng: random.Random) -> None:
        self.collection = Collection(rng)
        self._lock = asyncio.Lock()
        self._writers: set[asyncio.StreamWriter] = set()

    async def dispatch(self, method: str, path: str, body: bytes) -> Response:
        parts = unquote(path).split("/")[1:]  # as Go's mux: the decoded path is matched
        c = self.collection
        async with self._lock:
            match parts, method:
                case ["version"], "GET":
                    return 200, VersionBody(VERSION)
                case ["reset"], "POST":
                    await c.reset()
                    return 204, None
                case ["populate"], "POST":
                    try:
                        proxies = await c.populate(_decode(body))
                    except PopulateError as e:
                        done = [p.to_json() for p in e.proxies] or None  # Go's nil slice: null
                        return e.status, {"error": e.message, "status": e.status, "proxies": done}
                    except ApiError as e:
                        return e.status, {"error": e.message, "status": e.status, "proxies": None}
                    return 201, {"proxies": [p.to_json() for p in proxies] or None}
                case ["proxies"], "GET":
                    return 200, {name: p.to_json() for name, p in c.proxies.items()}
                case ["proxies"], "POST":
                    return 201, (await c.create(_decode(body))).to_json()
                case ["proxies", name], "GET":
                    return 200, c.get(name).to_json()
                case ["proxies", name], "POST" | "PATCH":
                    return 200, (await c.update(name, _decode(body))).to_json()
                case ["proxies", name], "DELETE":
                    c.remove(name)
                    return 204, None
                case ["proxies", name, "toxics"], "GET":
                    return 200, c.get(name).toxics_json()
                case ["proxies", name, "toxics"], "POST":
                    proxy = c.get(name)
                    return 200, proxy.add_toxic(_decode(body)).to_json()  # 200, as Toxiproxy
                case ["proxies", name, "toxics", toxic], "GET":
                    return 200, c.get(name).toxic(toxic).to_json()
                case ["proxies", name, "toxics", toxic], "POST" | "PATCH":
                    proxy = c.get(name)
                    return 200, proxy.update_toxic(toxic, _decode(body)).to_json()
                case ["proxies", name, "toxics", toxic], "DELETE":
                    c.get(name).remove_toxic(toxic)
                    return 204, None
        return 404, None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP/1.1 connection: requests in order until the client or the server closes it."""
        self._writers.add(writer)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            pass  # the client went away, idled out or sent an unparsable length: just close
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            await _respond(writer, 431, b"", None, False)
            return False
        except asyncio.IncompleteReadError:
            return False  # the client closed between requests
        lines = head.decode("latin-1").split("\r\n")
        request = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        if len(request) != 3 or not request[2].startswith("HTTP/1."):
            await _respond(writer, 400, b"400 Bad Request\n", "text/plain; charset=utf-8", False)
            return False
        method, target, version = request
        connection = headers.get("connection", "").lower()
        keep = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await _read_body(reader, headers)
        if body is None:
            await _respond(writer, 413, b"request body too large\n", "text/plain", False)
            return False
        path = target.split("?")[0]
        route = route_of(method, path)
        if route != 200:  # no route: Go's mux answers before any middleware runs
            body_404 = b"404 page not found\n" if route == 404 else b""
            await _respond(writer, route, body_404, TEXT if route == 404 else None, keep)
            return keep
        extra = {"X-Toxiproxy-Request-Id": request_id()}
        if headers.get("user-agent", "").startswith("Mozilla/"):
            # As Toxiproxy: browsers are refused, so a web page cannot drive the API (CSRF).
            await _respond(writer, 403, b"User agent not allowed\n", TEXT, keep, extra)
            return keep
        try:
            status, payload = await self.dispatch(method, path, body)
        except ApiError as e:
            status, payload = e.status, {"error": e.message, "status": e.status}
        if payload is None:
            data, ctype = (b"404 page not found\n", TEXT) if status == 404 else (b"", None)
        elif isinstance(payload, VersionBody):
            data, ctype = (
                f'{{"version": {json.dumps(str(payload))}}}\n'.encode(),
                "application/json",
            )
        else:
            data, ctype = json.dumps(payload, separators=(",", ":")).encode(), "application/json"
            if status >= 400:
                data += b"\n"  # Go's http.Error ends with a newline
        await _respond(writer, status, data, ctype, keep, extra)
        return keep

    def close_connections(self) -> None:
        for writer in list(self._writers):
            writer.close()


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes | None:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts, total = [], 0
        while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
            total += size
            if total > MAX_BODY:
                return None
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        while (await reader.readline()).strip():  # trailers
            pass
        return b"".join(parts)
    length = int(headers.get("content-length", "0") or 0)
    if length > MAX_BODY:
        return None
    return await reader.readexactly(length) if length > 0 else b""


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    data: bytes,
    ctype: str | None,
    keep: bool,
    extra: dict[str, str] | None = None,
) -> None:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Date: {formatdate(usegmt=True)}"]
    lines += [f"{key}: {value}" for key, value in (extra or {}).items()]
    if status >= 400 and data:
        lines.append("X-Content-Type-Options: nosniff")  # as Go's http.Error
    if ctype:
        lines.append(f"Content-Type: {ctype}")
    if status != 204:
        lines.append(f"Content-Length: {len(data)}")
    if not keep:
        lines.append("Connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
    await writer.drain()


class ProxyServer:
    """The API and every proxy on an asyncio loop in a background thread; for tests and runners.

    ``start()`` returns the API's ``host:port``; ``stop()`` closes the API, every proxy and live
    connection and joins the thread. ``seed`` seeds the toxicity draws, jitter and slice sizes.
    """

    def __init__(self, listen: str = DEFAULT_LISTEN, *, seed: int | None = None) -> None:
        self._host, self._port = split_address(listen, "listen address")
        self.seed = seed
        self.address: str | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None

    def start(self) -> str:
        if self._thread is not None:
            raise RuntimeError("the proxy server is already started")
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="chaos-proxy", daemon=True
        )
        self._thread.start()
        started.wait()
        if self._error is not None or self.address is None:
            self._thread.join()
            self._thread = None
            raise self._error or RuntimeError("the proxy server did not start")
        return self.address

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:
                pass  # the loop has already finished
        thread.join()

    def __enter__(self) -> ProxyServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, started: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(started))
        except BaseException as e:  # noqa: BLE001 - handed to the thread that called start()
            self._error = e
        finally:
            started.set()
            loop.close()

    async def _main(self, started: threading.Event) -> None:
        self._stopping = asyncio.Event()
        api = Api(random.Random(self.seed))
        server = await asyncio.start_server(api.handle, self._host or None, self._port)
        self.address = format_address(server.sockets[0].getsockname())
        started.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            api.close_connections()
            api.collection.clear()
            await _settle()


async def _settle() -> None:
    """Let aborted transports close their sockets, then cancel whatever is left."""
    for _ in range(3):
        await asyncio.sleep(0)
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_default_executor()  # getaddrinfo's threads


def serve(
    listen: str = "127.0.0.1:8474",
    *,
    ready: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    seed: int | None = None,
) -> None:
    """Run the proxy server until ``stop`` is set; ``ready(host_port)`` once it listens.

    Raises ValueError for a malformed ``listen`` and OSError when it cannot be bound.
    """
    server = ProxyServer(listen, seed=seed)
    address = server.start()
    try:
        if ready is not None:
            ready(address)
        (stop or threading.Event()).wait()
    finally:
        server.stop()

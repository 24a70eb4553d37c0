"""The Toxiproxy 2.x HTTP API over the proxy engine, and the handles that run it (DESIGN §7).

Routes, status codes and bodies follow Toxiproxy's ``api.go`` so that its clients
(``toxiproxy-python``, the Go and Ruby clients, ``toxiproxy-cli``) work unchanged:

    GET /proxies · POST /proxies · POST /populate · GET|POST|PATCH|DELETE /proxies/{proxy}
    GET|POST /proxies/{proxy}/toxics · GET|POST|PATCH|DELETE /proxies/{proxy}/toxics/{toxic}
    POST /reset · GET /version

Errors are ``{"error": "...", "status": N}``. The HTTP server is a small HTTP/1.1 one on asyncio
(keep-alive, Content-Length or chunked bodies); it shares the loop with every proxy, so API calls
and the data path never race. :class:`ProxyServer` runs that loop in a background thread;
:func:`serve` is ``tether chaos proxy``.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from .proxy import ApiError, Proxy, format_address, split_address

VERSION = "tether-chaos 0.1.0"
DEFAULT_LISTEN = "127.0.0.1:0"  # Toxiproxy binds every interface when listen is empty
MAX_BODY = 1 << 20
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


def _proxy_fields(body: Any, defaults: dict[str, Any], where: str = "") -> dict[str, Any]:
    """name/listen/upstream/enabled from a request body over ``defaults``; unknown keys ignored."""
    if not isinstance(body, dict):
        raise ApiError(f"bad request body: expected a JSON object{where}", 400)
    out = dict(defaults)
    for key, kind in (("name", str), ("listen", str), ("upstream", str), ("enabled", bool)):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, kind):
                raise ApiError(f"bad request body: {key} must be a {kind.__name__}{where}", 400)
            out[key] = value
    for key in ("name", "upstream"):
        if not out[key]:
            raise ApiError(f"missing required field: {key}{where}", 400)
    out["listen"] = out["listen"] or DEFAULT_LISTEN
    try:  # bad addresses are bad input (400), not a failed bind (500): nothing is changed
        split_address(out["listen"], "listen address")
        if split_address(out["upstream"], "upstream address")[1] == 0:
            raise ValueError(f"invalid upstream address {out['upstream']!r}: port 0")
    except ValueError as e:
        raise ApiError(f"bad request body: {e}{where}", 400) from None
    return out


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
        if fields["name"] in self.proxies:
            raise ApiError("proxy already exists", 409)
        proxy = Proxy(fields["name"], fields["listen"], fields["upstream"], self.rng)
        if fields["enabled"]:
            await proxy.start()
        self.proxies[proxy.name] = proxy
        return proxy

    async def update(self, name: str, body: Any) -> Proxy:
        proxy = self.get(name)
        current = {"name": name, "listen": proxy.listen, "upstream": proxy.upstream}
        fields = _proxy_fields(body, {**current, "enabled": proxy.enabled})
        if (
            fields["listen"] == proxy.listen
            and fields["upstream"] != proxy.upstream
            and fields["enabled"] == proxy.enabled
        ):
            # A new upstream only: live connections are dropped, as Toxiproxy does, but the port
            # stays open. (Toxiproxy closes and re-binds it, and in between another socket may
            # take the port; chaos runs re-point links at every shard replacement.)
            proxy.retarget(fields["upstream"])
        elif (fields["listen"], fields["upstream"]) != (proxy.listen, proxy.upstream):
            # As Toxiproxy: a new address restarts the listener and drops live connections.
            was = proxy.listen, proxy.upstream, proxy.enabled
            proxy.stop()
            proxy.listen, proxy.upstream = fields["listen"], fields["upstream"]
            if fields["enabled"]:
                try:
                    await proxy.start()
                except ApiError:
                    proxy.listen, proxy.upstream = was[0], was[1]
                    if was[2]:
                        await proxy.start()
                    raise
        elif fields["enabled"] and not proxy.enabled:
            await proxy.start()
        elif not fields["enabled"] and proxy.enabled:
            proxy.stop()
        return proxy

    def remove(self, name: str) -> None:
        self.get(name).stop()
        del self.proxies[name]

    async def populate(self, body: Any) -> list[Proxy]:
        """Create or replace each proxy; all validated first, and a failed bind undoes them all."""
        if not isinstance(body, list):
            raise ApiError("bad request body: expected a JSON array of proxies", 400)
        wanted: list[dict[str, Any]] = []
        for i, item in enumerate(body):
            default = {"name": "", "listen": "", "upstream": "", "enabled": True}
            wanted.append(_proxy_fields(item, default, f" at proxy {i + 1}"))
            if any(w["name"] == wanted[-1]["name"] for w in wanted[:-1]):
                raise ApiError(f"duplicate proxy name {wanted[-1]['name']!r} at proxy {i + 1}", 400)
        result: list[Proxy] = []
        undo: list[tuple[str, Proxy | None, bool, Proxy]] = []
        try:
            for f in wanted:
                old = self.proxies.get(f["name"])
                if old is not None and (old.listen, old.upstream) == (f["listen"], f["upstream"]):
                    result.append(old)  # unchanged: kept as it is, toxics and connections too
                    continue
                was_enabled = old is not None and old.enabled
                if old is not None:
                    old.stop()
                new = Proxy(f["name"], f["listen"], f["upstream"], self.rng)
                undo.append((f["name"], old, was_enabled, new))
                if f["enabled"]:
                    await new.start()
                self.proxies[new.name] = new
                result.append(new)
        except ApiError:
            for name, old, was_enabled, new in reversed(undo):
                new.stop()
                if old is None:
                    self.proxies.pop(name, None)
                    continue
                self.proxies[name] = old
                if was_enabled:
                    try:
                        await old.start()
                    except ApiError:
                        pass  # its port was taken meanwhile; it stays disabled
            raise
        return result

    async def reset(self) -> None:
        for proxy in list(self.proxies.values()):
            await proxy.start()
            proxy.reset_toxics()

    def clear(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()
        self.proxies.clear()


class Api:
    """Routes requests to the collection; one lock serialises changes, as Toxiproxy's mutexes."""

    def __init__(self, rng: random.Random) -> None:
        self.collection = Collection(rng)
        self._lock = asyncio.Lock()
        self._writers: set[asyncio.StreamWriter] = set()

    async def dispatch(self, method: str, path: str, body: bytes) -> Response:
        parts = [unquote(p) for p in path.split("/")[1:]]
        if not all(parts):
            return 404, None
        c = self.collection
        async with self._lock:
            match parts, method:
                case ["version"], "GET":
                    return 200, {"version": VERSION}
                case ["reset"], "POST":
                    await c.reset()
                    return 204, None
                case ["populate"], "POST":
                    try:
                        proxies = await c.populate(_decode(body))
                    except ApiError as e:
                        return e.status, {"error": e.message, "status": e.status, "proxies": None}
                    return 201, {"proxies": [p.to_json() for p in proxies]}
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
                case ((["version"] | ["reset"] | ["populate"] | ["proxies", *_]), _):
                    known = len(parts) <= 2 or (parts[2] == "toxics" and len(parts) <= 4)
                    return (405 if known else 404), None
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
        if headers.get("user-agent", "").startswith("Mozilla/"):
            # As Toxiproxy: browsers are refused, so a web page cannot drive the API (CSRF).
            await _respond(writer, 403, b"User agent not allowed\n", "text/plain", keep)
            return keep
        try:
            status, payload = await self.dispatch(method, target.split("?")[0], body)
        except ApiError as e:
            status, payload = e.status, {"error": e.message, "status": e.status}
        if payload is None:
            data, ctype = (b"404 page not found\n", "text/plain") if status == 404 else (b"", None)
        else:
            data, ctype = json.dumps(payload, separators=(",", ":")).encode(), "application/json"
            if status >= 400 or method == "GET" and target == "/version":
                data += b"\n"  # Go's http.Error and the version handler end with a newline
        await _respond(writer, status, data, ctype, keep)
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
    writer: asyncio.StreamWriter, status: int, data: bytes, ctype: str | None, keep: bool
) -> None:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Date: {formatdate(usegmt=True)}"]
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

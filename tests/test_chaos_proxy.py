"""The Toxiproxy-compatible fault proxy (DESIGN §7), driven by the real `toxiproxy-python` client.

Every test runs its own ProxyServer on 127.0.0.1:0 in front of small threaded TCP servers and
measures what the toxics do to real sockets. Nothing waits with sleep(): reads carry timeouts.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from toxiproxy import Toxiproxy
from toxiproxy.api import APIConsumer
from toxiproxy.exceptions import InvalidToxic, NotFound, ProxyExists

from tether.chaos.toxiproxy.api import VERSION, ProxyServer, serve

Handler = Callable[[socket.socket], None]


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def source(n: int) -> Handler:
    return lambda conn: conn.sendall(os.urandom(n))


def say_bye(conn: socket.socket) -> None:
    conn.sendall(b"bye")


class Upstream:
    """A threaded TCP server on loopback running ``handler`` per connection, then closing it."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.handler(conn)

    def close(self) -> None:
        _shut(self.sock)
        self.threads[0].join(5)  # no more accepts: every connection is in self.conns now
        for conn in self.conns:
            _shut(conn)
        for t in self.threads[1:]:
            t.join(5)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept() or recv()
    sock.close()


@pytest.fixture
def server() -> Iterator[ProxyServer]:
    srv = ProxyServer("127.0.0.1:0", seed=7)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: ProxyServer) -> Iterator[Toxiproxy]:
    saved = APIConsumer.host, APIConsumer.port  # class attributes: restored after the test
    assert server.address is not None
    host, port = server.address.rsplit(":", 1)
    toxiproxy = Toxiproxy()
    toxiproxy.update_api_consumer(host, int(port))
    yield toxiproxy
    APIConsumer.host, APIConsumer.port = saved


@pytest.fixture
def upstream() -> Iterator[Callable[[Handler], Upstream]]:
    made: list[Upstream] = []

    def make(handler: Handler = echo) -> Upstream:
        made.append(Upstream(handler))
        return made[-1]

    yield make
    for u in made:
        u.close()


@pytest.fixture
def connect() -> Iterator[Callable[[str], socket.socket]]:
    socks: list[socket.socket] = []

    def dial(address: str) -> socket.socket:
        host, port = address.rsplit(":", 1)
        socks.append(socket.create_connection((host, int(port)), timeout=5))
        return socks[-1]

    yield dial
    for s in socks:
        s.close()


def call(server: ProxyServer, method: str, path: str, body: Any = None, raw: bytes | None = None):
    """(status, content type, decoded JSON or text) of one API request, errors included."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{server.address}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, ctype, payload = resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as e:
        status, ctype, payload = e.code, e.headers["Content-Type"], e.read()
        e.close()
    text = payload.decode()
    return status, ctype, json.loads(text) if text.startswith(("{", "[")) else text


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"connection closed after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def read_to_eof(sock: socket.socket) -> list[bytes]:
    reads = []
    while chunk := sock.recv(65536):
        reads.append(chunk)
    return reads


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> float:
    t0 = time.monotonic()
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload
    return time.monotonic() - t0


def dropped(sock: socket.socket) -> bool:
    """True once the proxy has closed (FIN) or reset the connection."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def silent_for(sock: socket.socket, seconds: float) -> bool:
    """True if nothing (data or close) arrives within ``seconds``."""
    sock.settimeout(seconds)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return False
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)


def test_create_list_destroy(client, upstream, connect):
    up = upstream()
    proxy = client.create(upstream=up.address, name="echo")
    assert not proxy.listen.endswith(":0")  # the real port, not the requested one
    assert set(client.proxies()) == {"echo"}
    assert client.get_proxy("echo").listen == proxy.listen
    assert round_trip(connect(proxy.listen)) < 1
    proxy.destroy()
    assert client.proxies() == {}
    with pytest.raises(ConnectionRefusedError):
        connect(proxy.listen)


def test_disable_drops_connections_and_enable_listens_on_the_same_port(client, upstream, connect):
    proxy = client.create(upstream=upstream().address, name="echo")
    live = connect(proxy.listen)
    round_trip(live)
    proxy.disable()
    assert dropped(live)
    with pytest.raises(ConnectionRefusedError):
        connect(proxy.listen)
    assert client.get_proxy("echo").enabled is False
    proxy.enable()
    assert client.get_proxy("echo").listen == proxy.listen
    assert round_trip(connect(proxy.listen)) < 1
    with proxy.down():
        with pytest.raises(ConnectionRefusedError):
            connect(proxy.listen)
    round_trip(connect(proxy.listen))


def test_latency_on_each_stream_and_jitter_within_bounds(client, upstream, connect):
    proxy = client.create(upstream=upstream().address, name="echo")
    sock = connect(proxy.listen)
    assert round_trip(sock) < 0.09
    proxy.add_toxic(type="latency", attributes={"latency": 100})  # on the live connection
    assert all(round_trip(sock) >= 0.1 for _ in range(3))
    proxy.add_toxic(type="latency", stream="upstream", attributes={"latency": 100})
    assert round_trip(sock) >= 0.2
    proxy.destroy_toxic("latency_upstream")
    proxy.destroy_toxic("latency_downstream")
    assert round_trip(sock) < 0.09
    proxy.add_toxic(type="latency", name="jittery", attributes={"latency": 60, "jitter": 40})
    rtts = [round_trip(sock) for _ in range(10)]
    assert all(0.02 <= t < 0.1 + 0.1 for t in rtts), rtts
    assert max(rtts) - min(rtts) > 0.01, rtts  # the jitter is really drawn


def test_bandwidth_caps_throughput(client, upstream, connect):
    proxy = client.create(upstream=upstream(source(150_000)).address, name="src")
    proxy.add_toxic(type="bandwidth", attributes={"rate": 100})  # 100 KB/s
    t0 = time.monotonic()
    data = b"".join(read_to_eof(connect(proxy.listen)))
    elapsed = time.monotonic() - t0
    assert len(data) == 150_000
    assert 1.3 <= elapsed < 3, elapsed


def test_timeout_stalls_then_closes(client, upstream, connect):
    proxy = client.create(upstream=upstream().address, name="echo")
    proxy.add_toxic(type="timeout", attributes={"timeout": 300})
    sock = connect(proxy.listen)
    t0 = time.monotonic()
    sock.sendall(b"ping")
    assert read_to_eof(sock) == []
    assert 0.28 <= time.monotonic() - t0 < 2


def test_timeout_zero_drops_data_and_its_removal_closes_the_connection(client, upstream, connect):
    # As Toxiproxy 2.x pins it (toxics/timeout_test.go, TestTimeoutToxicClosesConnectionOnRemove):
    # the timeout toxic drops what it gets, and removing it closes the connection.
    proxy = client.create(upstream=upstream().address, name="echo")
    proxy.add_toxic(type="timeout", attributes={"timeout": 0})
    sock = connect(proxy.listen)
    payload = os.urandom(200_000)
    sock.sendall(payload)
    assert silent_for(sock, 0.3)
    proxy.destroy_toxic("timeout_downstream")
    assert read_to_eof(sock) == []


def test_removing_latency_forwards_data_in_flight(client, upstream, connect):
    proxy = client.create(upstream=upstream().address, name="echo")
    proxy.add_toxic(type="latency", attributes={"latency": 2000})
    sock = connect(proxy.listen)
    payload = os.urandom(100_000)
    sock.sendall(payload)
    assert silent_for(sock, 0.2)  # held by the latency toxic
    t0 = time.monotonic()
    proxy.destroy_toxic("latency_downstream")
    assert recv_exactly(sock, len(payload)) == payload
    assert time.monotonic() - t0 < 1  # released at once, not after the 2 s


def test_reset_peer_resets_the_connection(client, upstream, connect):
    proxy = client.create(upstream=upstream().address, name="echo")
    proxy.add_toxic(type="reset_peer", attributes={"timeout": 100})
    sock = connect(proxy.listen)
    t0 = time.monotonic()
    sock.sendall(b"ping")
    with pytest.raises(ConnectionResetError):
        sock.recv(10)
    assert time.monotonic() - t0 >= 0.1


def test_slicer_delivers_the_same_bytes_in_smaller_reads(client, upstream, connect):
    proxy = client.create(upstream=upstream().address, name="echo")
    attributes = {"average_size": 100, "size_variation": 20, "delay": 2000}
    proxy.add_toxic(type="slicer", attributes=attributes)
    sock = connect(proxy.listen)
    payload = os.urandom(3000)
    sock.sendall(payload)
    reads = []
    while sum(map(len, reads)) < len(payload):
        reads.append(sock.recv(65536))
        assert reads[-1]
    assert b"".join(reads) == payload
    assert len(reads) >= 5 and max(map(len, reads)) < len(payload)


def test_limit_data_closes_after_exactly_n_bytes(client, upstream, connect):
    proxy = client.create(upstream=upstream().address, name="echo")
    proxy.add_toxic(type="limit_data", attributes={"bytes": 1000})
    sock = connect(proxy.listen)
    payload = os.urandom(5000)
    sock.sendall(payload)
    assert b"".join(read_to_eof(sock)) == payload[:1000]


def test_half_close_is_passed_on(client, upstream, connect):
    proxy = client.create(upstream=upstream().address, name="echo")
    for toxic in (None, "latency"):
        if toxic:
            proxy.add_toxic(type=toxic, attributes={"latency": 50})
        sock = connect(proxy.listen)
        payload = os.urandom(1 << 20)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # the echo server sees the end, replies in full, closes
        assert b"".join(read_to_eof(sock)) == payload


def test_slow_close_delays_the_close(client, upstream, connect):
    proxy = client.create(upstream=upstream(say_bye).address, name="bye")
    t0 = time.monotonic()
    assert read_to_eof(connect(proxy.listen)) == [b"bye"]
    assert time.monotonic() - t0 < 0.25
    proxy.add_toxic(type="slow_close", attributes={"delay": 300})
    t0 = time.monotonic()
    assert b"".join(read_to_eof(connect(proxy.listen))) == b"bye"
    assert 0.3 <= time.monotonic() - t0 < 2


def test_toxicity_is_drawn_per_connection(client, upstream, connect):
    proxy = client.create(upstream=upstream().address, name="echo")
    proxy.add_toxic(type="latency", toxicity=0.0, attributes={"latency": 500})
    assert all(round_trip(connect(proxy.listen)) < 0.25 for _ in range(5))
    proxy.destroy_toxic("latency_downstream")
    proxy.add_toxic(type="latency", toxicity=0.5, attributes={"latency": 150})
    delayed = [round_trip(connect(proxy.listen)) >= 0.15 for _ in range(12)]
    assert any(delayed) and not all(delayed), delayed


def test_client_exceptions_for_409_404_400(client, upstream):
    up = upstream()
    proxy = client.create(upstream=up.address, name="echo")
    with pytest.raises(ProxyExists):  # straight to the API: the client checks names itself
        APIConsumer.post("/proxies", json={"name": "echo", "upstream": up.address})
    with pytest.raises(NotFound):
        APIConsumer.get("/proxies/missing")
    with pytest.raises(InvalidToxic):
        proxy.add_toxic(type="no_such_toxic")
    proxy.add_toxic(type="latency", attributes={"latency": 1})
    with pytest.raises(ProxyExists):
        proxy.add_toxic(type="latency", attributes={"latency": 1})
    with pytest.raises(NotFound):
        proxy.destroy_toxic("missing")
    assert set(proxy.toxics()) == {"latency_downstream"}


def error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": message, "status": status}


def test_http_status_codes_and_bodies(server, upstream):
    up = upstream().address
    status, ctype, body = call(server, "POST", "/proxies", {"name": "a", "upstream": up})
    assert (status, ctype, body["name"], body["enabled"]) == (201, "application/json", "a", True)
    listen = body["listen"]
    status, ctype, body = call(server, "POST", "/proxies", {"name": "a", "upstream": up})
    assert (status, body) == error(409, "proxy already exists") and ctype == "application/json"
    assert call(server, "GET", "/proxies/nope")[::2] == error(404, "proxy not found")
    status, _, body = call(server, "POST", "/proxies", raw=b"{not json")
    assert status == 400 and body["error"].startswith("bad request body")
    missing = call(server, "POST", "/proxies", {"upstream": up})
    assert missing[::2] == error(400, "missing required field: name")
    missing = call(server, "POST", "/proxies", {"name": "b"})
    assert missing[::2] == error(400, "missing required field: upstream")
    taken = {"name": "c", "upstream": up, "listen": listen}
    status, _, body = call(server, "POST", "/proxies", taken)
    assert status == 500 and "address already in use" in body["error"]
    assert set(call(server, "GET", "/proxies")[2]) == {"a"}  # nothing was created

    toxics = "/proxies/a/toxics"
    latency = {"type": "latency", "attributes": {"latency": 10}}
    status, _, body = call(server, "POST", toxics, latency)
    assert status == 200  # Toxiproxy answers a created toxic with 200, not 201
    assert body == {
        "attributes": {"latency": 10, "jitter": 0},
        "name": "latency_downstream",
        "type": "latency",
        "stream": "downstream",
        "toxicity": 1.0,
    }
    assert call(server, "POST", toxics, latency)[::2] == error(409, "toxic already exists")
    assert call(server, "POST", toxics, {"type": "bogus"})[::2] == error(400, "invalid toxic type")
    sideways = call(server, "POST", toxics, {"type": "latency", "stream": "sideways"})
    assert sideways[::2] == error(400, "stream was invalid, can be either upstream or downstream")
    negative = {"type": "latency", "name": "x", "attributes": {"latency": -1}}
    status, _, body = call(server, "POST", toxics, negative)
    assert status == 400 and body["error"].startswith("bad request body")
    assert call(server, "GET", f"{toxics}/latency_downstream")[0] == 200
    assert call(server, "GET", f"{toxics}/nope")[::2] == error(404, "toxic not found")
    update = {"attributes": {"jitter": 5}}
    status, _, body = call(server, "POST", f"{toxics}/latency_downstream", update)
    assert (status, body["attributes"]) == (200, {"latency": 10, "jitter": 5})
    assert [t["name"] for t in call(server, "GET", toxics)[2]] == ["latency_downstream"]
    assert call(server, "DELETE", f"{toxics}/latency_downstream")[:1] == (204,)
    assert call(server, "DELETE", f"{toxics}/latency_downstream")[0] == 404
    assert call(server, "GET", "/nope")[0] == 404
    assert call(server, "DELETE", "/version")[0] == 405
    assert call(server, "DELETE", "/proxies/a")[0] == 204
    assert call(server, "DELETE", "/proxies/a")[0] == 404


def test_update_upstream_keeps_the_port_and_drops_connections(server, upstream, connect):
    first, second = upstream(say_bye), upstream(echo)
    listen = call(server, "POST", "/proxies", {"name": "p", "upstream": first.address})[2]["listen"]
    live = connect(listen)
    assert read_to_eof(live) == [b"bye"]
    status, _, body = call(server, "POST", "/proxies/p", {"upstream": second.address})
    assert (status, body["listen"], body["upstream"]) == (200, listen, second.address)
    round_trip(connect(listen))  # the same port now reaches the echo server


def test_reset_enables_everything_and_removes_toxics(client, server, upstream, connect):
    proxy = client.create(upstream=upstream().address, name="echo")
    proxy.add_toxic(type="latency", attributes={"latency": 1000})
    proxy.add_toxic(type="timeout", stream="upstream", attributes={"timeout": 0})
    proxy.disable()
    assert call(server, "POST", "/reset")[:1] == (204,)
    state = call(server, "GET", "/proxies/echo")[2]
    assert (state["enabled"], state["toxics"]) == (True, [])
    assert round_trip(connect(proxy.listen)) < 0.1
    assert client.reset() is True


def test_populate_creates_replaces_and_validates_first(server, upstream, connect):
    up, other = upstream().address, upstream().address
    both = [{"name": "p1", "upstream": up}, {"name": "p2", "upstream": up}]
    status, _, body = call(server, "POST", "/populate", both)
    assert status == 201 and [p["name"] for p in body["proxies"]] == ["p1", "p2"]
    p1, p2 = (p["listen"] for p in body["proxies"])
    round_trip(connect(p1))
    round_trip(connect(p2))
    call(server, "POST", "/proxies/p1/toxics", {"type": "latency", "attributes": {"latency": 1}})
    # p1 is unchanged (kept with its toxic); p2's upstream differs, so it is replaced.
    again = [
        {"name": "p1", "upstream": up, "listen": p1},
        {"name": "p2", "upstream": other, "listen": p2},
    ]
    status, _, body = call(server, "POST", "/populate", again)
    assert status == 201
    assert [len(p["toxics"]) for p in body["proxies"]] == [1, 0]
    assert call(server, "GET", "/proxies/p2")[2]["upstream"] == other
    bad = [{"name": "p3", "upstream": up}, {"name": "p4"}]
    status, _, body = call(server, "POST", "/populate", bad)
    assert (status, body.pop("proxies")) == (400, None)
    assert (status, body) == error(400, "missing required field: upstream at proxy 2")
    taken = [{"name": "p5", "upstream": up}, {"name": "p6", "upstream": up, "listen": p1}]
    status, _, body = call(server, "POST", "/populate", taken)
    assert (status, [p["name"] for p in body["proxies"]]) == (500, ["p5"])
    # As Toxiproxy (its TestPopulateProxyWithBadDataShouldReturnError): entries before the one
    # that failed stay created.
    assert set(call(server, "GET", "/proxies")[2]) == {"p1", "p2", "p5"}
    assert call(server, "POST", "/populate", {"name": "x"})[0] == 400


def test_version_and_keep_alive(client, server):
    status, ctype, body = call(server, "GET", "/version")
    assert (status, ctype, body) == (200, "application/json", {"version": VERSION})
    assert json.loads(client.version()) == {"version": VERSION}
    assert server.address is not None
    host, port = server.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/proxies")
        first = conn.getresponse()
        assert (first.status, first.read()) == (200, b"{}")
        sock = conn.sock
        conn.request("GET", "/version")
        assert conn.getresponse().status == 200
        assert conn.sock is sock  # the same connection served both
    finally:
        conn.close()


def test_stop_closes_proxies_and_live_connections(upstream, connect):
    up = upstream()
    with ProxyServer() as srv:
        listen = call(srv, "POST", "/proxies", {"name": "p", "upstream": up.address})[2]["listen"]
        live = connect(listen)
        round_trip(live)
    assert dropped(live)
    with pytest.raises(ConnectionRefusedError):
        connect(listen)


def test_serve_runs_until_stopped():
    stop, ready = threading.Event(), queue.Queue[str]()
    kwargs = {"ready": ready.put, "stop": stop}
    thread = threading.Thread(target=serve, args=("127.0.0.1:0",), kwargs=kwargs)
    thread.start()
    try:
        with urllib.request.urlopen(f"http://{ready.get(timeout=10)}/version", timeout=5) as resp:
            assert json.loads(resp.read()) == {"version": VERSION}
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


@pytest.mark.parametrize("listen", ["nope", "127.0.0.1:99999", "::1:80", "host:", ""])
def test_bad_listen_is_a_value_error(listen):
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        ProxyServer(listen)
    with pytest.raises(ValueError):
        serve(listen)

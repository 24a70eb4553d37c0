# ruff: noqa: N802 - each test is named after the Go test it replays (test_TestName)
"""Toxiproxy v2.12.0's own API and proxy tests, replayed against the built-in proxy (DESIGN §7).

Each test is named ``test_<GoTestName>`` after the Go test it replays, from these files of
github.com/Shopify/toxiproxy at tag v2.12.0:

- ``api_test.go``: the HTTP API through the Go client (``tclient``) and ``net/http``;
- ``proxy_test.go``: a proxy's start, stop, update and data path (``Proxy.Start`` and
  ``Proxy.Update`` are reached here through ``POST /proxies`` and ``POST /proxies/{proxy}``);
- ``proxy_collection_test.go``: the proxy collection (``Add``, ``Get``, ``Remove``, reached
  through the API);
- ``toxiproxy_test.go`` holds only the helpers (``NewTestProxy``, ``WithTCPProxy``,
  ``AssertProxyUp``), mirrored below as :func:`assert_proxy_up` and :class:`TCPServer`.

The Go tests bind fixed ports (7070, 3310, ...); here every socket is on loopback and every port
comes from binding port 0: a Go ``localhost:3310`` becomes ``localhost:0`` (or ``localhost:P``
for a port P a proxy already holds) and the assertions follow the port the proxy reports. The
requests are what the Go client sends (``client/client.go``, ``client/proxy.go``); error texts
are checked as the Go client shows them, ``<Caller>: HTTP <status>: <error>``, less the caller.
Nothing sleeps to synchronise: every read and wait carries a generous timeout.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tether.chaos.toxiproxy.api import ProxyServer

TIMEOUT = 10.0


class Api:
    """What the Go client does, as plain HTTP: (status, headers, decoded body)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, Any]:
        host, port = self.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        hdrs = {"User-Agent": "toxiproxy-cli/git linux/amd64", "Content-Type": "application/json"}
        hdrs.update(headers or {})
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        text = payload.decode()
        decoded = json.loads(text) if text.startswith(("{", "[")) else text
        return resp.status, resp.headers, decoded

    # -- the Go client's calls --
    def create_proxy(self, name: str, listen: str, upstream: str, enabled: bool = True):
        body = {"name": name, "listen": listen, "upstream": upstream, "enabled": enabled}
        status, _, out = self.call("POST", "/proxies", {**body, "toxics": None})
        return status, out

    def proxies(self) -> dict[str, Any]:
        status, _, out = self.call("GET", "/proxies")
        assert status == 200, out
        return out

    def proxy(self, name: str) -> tuple[int, Any]:
        status, _, out = self.call("GET", f"/proxies/{name}")
        return status, out

    def save(self, proxy: dict[str, Any]) -> tuple[int, Any]:
        """client.Proxy.Save on a created proxy: POST /proxies/{name} with every field."""
        status, _, out = self.call("POST", f"/proxies/{proxy['name']}", proxy)
        return status, out

    def populate(self, proxies: list[dict[str, Any]]) -> tuple[int, Any]:
        status, _, out = self.call("POST", "/populate", proxies)
        return status, out

    def delete(self, name: str) -> tuple[int, Any]:
        status, _, out = self.call("DELETE", f"/proxies/{name}")
        return status, out

    def add_toxic(
        self,
        proxy: str,
        name: str,
        type_: str,
        stream: str,
        toxicity: float,
        attrs: dict[str, Any] | None,
    ) -> tuple[int, Any]:
        toxic: dict[str, Any] = {"name": name, "type": type_}
        if stream:
            toxic["stream"] = stream  # `json:"stream,omitempty"`
        toxic["toxicity"] = 1 if toxicity == -1 else toxicity
        toxic["attributes"] = attrs
        status, _, out = self.call("POST", f"/proxies/{proxy}/toxics", toxic)
        return status, out

    def update_toxic(
        self, proxy: str, name: str, toxicity: float, attrs: dict[str, Any]
    ) -> tuple[int, Any]:
        toxic: dict[str, Any] = {"attributes": attrs}
        if toxicity != -1:
            toxic["toxicity"] = toxicity
        status, _, out = self.call("PATCH", f"/proxies/{proxy}/toxics/{name}", toxic)
        return status, out

    def toxics(self, proxy: str) -> list[dict[str, Any]]:
        status, _, out = self.call("GET", f"/proxies/{proxy}/toxics")
        assert status == 200, out
        return out


def error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": message, "status": status}


def ok(result: tuple[int, Any], status: int = 200) -> Any:
    assert result[0] == status, result
    return result[1]


def split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def port_of(address: str) -> int:
    return split(address)[1]


def dial(address: str) -> socket.socket:
    return socket.create_connection(split(address), timeout=TIMEOUT)


def assert_proxy_up(address: str, up: bool) -> None:
    """toxiproxy_test.go's AssertProxyUp: a dial succeeds if and only if the proxy is up."""
    try:
        sock = dial(address)
    except OSError as e:
        assert not up, f"expected proxy to be up at {address}: {e}"
        return
    sock.close()
    assert up, f"expected proxy to be down at {address}"


def closed_port() -> int:
    """A loopback port nothing listens on (bound to port 0, then closed): an upstream that is
    down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_toxic(
    toxics: list[dict[str, Any]], name: str, type_: str, stream: str, exists: bool
) -> dict[str, Any] | None:
    """api_test.go's AssertToxicExists."""
    found = [t for t in toxics if t["name"] == name]
    toxic = found[-1] if found else None
    if exists:
        assert toxic is not None, f"expected to see {name} toxic in {toxics}"
        assert (toxic["type"], toxic["stream"]) == (type_, stream), toxic
    elif toxic is not None:
        assert toxic["stream"] != stream, f"expected {name} to be missing from {toxics}"
    return toxic


class TCPServer:
    """testhelper.WithTCPServer: accepts one client and hands what it read, to EOF, to
    ``response``."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.response: queue.Queue[bytes] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                buf = bytearray()
                while chunk := conn.recv(65536):
                    buf += chunk
                self.response.put(bytes(buf))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(TIMEOUT)


@pytest.fixture
def api() -> Iterator[Api]:
    """api_test.go's WithServer: a fresh server per test (Go's clears the collection)."""
    with ProxyServer("127.0.0.1:0", seed=1) as srv:
        assert srv.address is not None
        yield Api(srv.address)


@pytest.fixture
def tcp_server() -> Iterator[TCPServer]:
    server = TCPServer()
    yield server
    server.close()


@pytest.fixture
def tcp_proxy(api: Api, tcp_server: TCPServer) -> Iterator[tuple[socket.socket, dict[str, Any]]]:
    """toxiproxy_test.go's WithTCPProxy: a proxy on localhost:0 before the TCP server, and a
    client connected to it."""
    proxy = ok(api.create_proxy("test", "localhost:0", tcp_server.address), 201)
    conn = dial(proxy["listen"])
    yield conn, proxy
    conn.close()


# ---------------------------------------------------------------------------------------------
# api_test.go


def test_TestRequestId(api: Api) -> None:
    status, headers, _ = api.call("GET", "/version", headers={"User-Agent": "curl"})
    assert status == 200
    assert headers.get("X-Toxiproxy-Request-Id"), dict(headers)


def test_TestBrowserGets403(api: Api) -> None:
    agent = (
        "Mozilla/5.0 (Linux; Android 4.4.2); Nexus 5 Build/KOT49H) AppleWebKit/537.36"
        "(KHTML, like Gecko) Chrome/33.0.1750.117 Mobile Safari/537.36 OPR/20.0.1396.72047"
    )
    assert api.call("GET", "/proxies", headers={"User-Agent": agent})[0] == 403


def test_TestNonBrowserGets200(api: Api) -> None:
    assert api.call("GET", "/proxies", headers={"User-Agent": "Wget/2.1"})[0] != 403


def test_TestIndexWithNoProxies(api: Api) -> None:
    assert api.proxies() == {}


def test_TestCreateProxyBlankName(api: Api) -> None:
    assert api.create_proxy("", "", "") == error(400, "missing required field: name")


def test_TestCreateProxyBlankUpstream(api: Api) -> None:
    assert api.create_proxy("test", "", "") == error(400, "missing required field: upstream")


def test_TestPopulateProxy(api: Api) -> None:
    out = ok(
        api.populate(
            [
                {
                    "name": "one",
                    "listen": "localhost:0",
                    "upstream": "localhost:7171",
                    "enabled": True,
                },
                {
                    "name": "two",
                    "listen": "localhost:0",
                    "upstream": "localhost:7474",
                    "enabled": True,
                },
            ]
        ),
        201,
    )
    proxies = out["proxies"]
    assert [p["name"] for p in proxies] == ["one", "two"]
    for p in proxies:
        assert_proxy_up(p["listen"], True)


def test_TestPopulateDefaultEnabled(api: Api) -> None:
    request = b'[{"name": "test", "listen": "localhost:0", "upstream": "localhost:7171"}]'
    status, _, body = api.call("POST", "/populate", raw=request)
    assert status == 201, body
    proxies = api.proxies()
    assert list(proxies) == ["test"]
    for p in proxies.values():
        assert_proxy_up(p["listen"], True)


def test_TestPopulateDisabledProxy(api: Api) -> None:
    off = 0  # the Go test's fixed port; a disabled proxy binds nothing
    out = ok(
        api.populate(
            [
                {
                    "name": "one",
                    "listen": f"localhost:{off}",
                    "upstream": "localhost:7171",
                    "enabled": False,
                },
                {
                    "name": "two",
                    "listen": "localhost:0",
                    "upstream": "localhost:7474",
                    "enabled": True,
                },
            ]
        ),
        201,
    )
    one, two = out["proxies"]
    assert (one["name"], two["name"]) == ("one", "two")
    assert (one["enabled"], one["listen"]) == (False, f"localhost:{off}")  # never resolved
    assert_proxy_up(f"localhost:{off}", False)
    assert_proxy_up(two["listen"], True)


def test_TestPopulateExistingProxy(api: Api) -> None:
    one = ok(api.create_proxy("one", "localhost:0", "localhost:7171"), 201)
    ok(api.create_proxy("two", "localhost:0", "localhost:7474"), 201)
    # A toxic, to make sure the proxy is not replaced.
    ok(api.add_toxic("one", "", "latency", "downstream", 1, None))
    port = port_of(one["listen"])
    out = ok(
        api.populate(
            [
                # intentional: this should be resolved to 127.0.0.1:PORT
                {
                    "name": "one",
                    "listen": f"localhost:{port}",
                    "upstream": "localhost:7171",
                    "enabled": True,
                },
                {
                    "name": "two",
                    "listen": "127.0.0.1:0",
                    "upstream": "localhost:7676",
                    "enabled": True,
                },
            ]
        ),
        201,
    )
    first, second = out["proxies"]
    assert (first["name"], second["name"]) == ("one", "two")
    assert first["listen"] == f"127.0.0.1:{port}"
    assert second["listen"].startswith("127.0.0.1:") and second["upstream"] == "localhost:7676"
    toxics = api.toxics("one")
    assert [t["type"] for t in toxics] == ["latency"], "populate did not preserve existing proxy"
    for p in out["proxies"]:
        assert_proxy_up(p["listen"], True)


def test_TestPopulateWithBadName(api: Api) -> None:
    status, body = api.populate(
        [
            {"name": "one", "listen": "localhost:0", "upstream": "localhost:7171", "enabled": True},
            {"name": "", "listen": "", "enabled": True},
        ]
    )
    assert (status, body.pop("proxies")) == (400, None)
    assert (status, body) == error(400, "missing required field: name at proxy 2")
    assert api.proxies() == {}


def test_TestPopulateProxyWithBadDataShouldReturnError(api: Api) -> None:
    status, body = api.populate(
        [
            {"name": "one", "listen": "localhost:0", "upstream": "localhost:7171", "enabled": True},
            {"name": "two", "listen": "local373", "upstream": "localhost:7474", "enabled": True},
            {
                "name": "three",
                "listen": "localhost:0",
                "upstream": "localhost:7676",
                "enabled": True,
            },
        ]
    )
    assert status == 500 and "error" in body  # the Go client returns no proxies on an error
    assert body["error"] == "listen tcp: address local373: missing port in address"
    proxies = api.proxies()
    assert list(proxies) == ["one"], "proxy `one' was not created, or a later one was"
    assert [p["name"] for p in body["proxies"]] == ["one"]
    assert_proxy_up(proxies["one"]["listen"], True)


def test_TestPopulateAddToxic(api: Api) -> None:
    out = ok(
        api.populate(
            [
                {
                    "name": "one",
                    "listen": "localhost:0",
                    "upstream": "localhost:7171",
                    "enabled": True,
                }
            ]
        ),
        201,
    )
    assert [p["name"] for p in out["proxies"]] == ["one"]
    ok(api.add_toxic("one", "", "latency", "downstream", 1, None))


def test_TestListingProxies(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    proxies = api.proxies()
    proxy = proxies["mysql_master"]
    assert proxy["name"] == "mysql_master"
    assert proxy["listen"].startswith("127.0.0.1:")  # resolved, as the Go test's 127.0.0.1:3310
    assert proxy["upstream"] == "localhost:20001"  # the upstream is reported as given
    assert_toxic(proxy["toxics"], "latency", "", "", False)


def test_TestCreateAndGetProxy(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    proxy = ok(api.proxy("mysql_master"))
    assert (proxy["name"], proxy["upstream"], proxy["enabled"]) == (
        "mysql_master",
        "localhost:20001",
        True,
    )
    assert proxy["listen"].startswith("127.0.0.1:")
    assert_toxic(proxy["toxics"], "latency", "", "", False)


def test_TestCreateProxyWithSave(api: Api) -> None:
    # client.NewProxy() + Save(): POST /proxies with every field of the client's Proxy.
    body = {
        "name": "mysql_master",
        "listen": "localhost:0",
        "upstream": "localhost:20001",
        "enabled": True,
        "toxics": None,
    }
    status, _, _ = api.call("POST", "/proxies", body)
    assert status == 201
    proxy = ok(api.proxy("mysql_master"))
    assert (proxy["name"], proxy["upstream"], proxy["enabled"]) == (
        "mysql_master",
        "localhost:20001",
        True,
    )
    assert proxy["listen"].startswith("127.0.0.1:")
    assert_proxy_up(proxy["listen"], True)


def test_TestCreateDisabledProxy(api: Api) -> None:
    off = 0  # the Go test's fixed port; a disabled proxy binds nothing
    ok(api.create_proxy("mysql_master", f"localhost:{off}", "localhost:20001", enabled=False), 201)
    proxy = ok(api.proxy("mysql_master"))
    assert (proxy["name"], proxy["listen"], proxy["upstream"], proxy["enabled"]) == (
        "mysql_master",
        f"localhost:{off}",  # a proxy never started keeps its listen address as given
        "localhost:20001",
        False,
    )
    assert_proxy_up(proxy["listen"], False)


def test_TestCreateDisabledProxyAndEnable(api: Api) -> None:
    off = 0  # the Go test's fixed port; a disabled proxy binds nothing
    ok(api.create_proxy("mysql_master", f"localhost:{off}", "localhost:20001", enabled=False), 201)
    proxy = ok(api.proxy("mysql_master"))
    assert (proxy["listen"], proxy["enabled"]) == (f"localhost:{off}", False)
    proxy["enabled"] = True
    proxy = ok(api.save(proxy))
    assert proxy["listen"].startswith("127.0.0.1:") and port_of(proxy["listen"]) != 0
    assert_proxy_up(proxy["listen"], True)
    proxy["enabled"] = False
    proxy = ok(api.save(proxy))
    assert_proxy_up(proxy["listen"], False)


def test_TestDeleteProxy(api: Api) -> None:
    proxy = ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    assert api.proxies()
    assert_proxy_up(proxy["listen"], True)
    assert api.delete("mysql_master")[0] == 204
    assert_proxy_up(proxy["listen"], False)
    assert api.proxies() == {}
    assert api.delete("mysql_master") == error(404, "proxy not found")


def test_TestCreateProxyPortConflict(api: Api) -> None:
    first = ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    port = port_of(first["listen"])
    expected = f"listen tcp 127.0.0.1:{port}: bind: address already in use"
    assert api.create_proxy("test", f"localhost:{port}", "localhost:20001") == error(500, expected)
    assert api.delete("mysql_master")[0] == 204
    ok(api.create_proxy("test", f"localhost:{port}", "localhost:20001"), 201)


def test_TestCreateProxyNameConflict(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    conflict = api.create_proxy("mysql_master", "localhost:0", "localhost:20001")
    assert conflict == error(409, "proxy already exists")
    assert api.delete("mysql_master")[0] == 204
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)


def test_TestResetState(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    latency = ok(
        api.add_toxic(
            "mysql_master", "", "latency", "downstream", 1, {"latency": 100, "jitter": 10}
        )
    )
    assert (latency["attributes"]["latency"], latency["attributes"]["jitter"]) == (100, 10)
    assert api.call("POST", "/reset")[0] == 204
    proxy = api.proxies()["mysql_master"]
    assert proxy["enabled"]
    assert_toxic(api.toxics("mysql_master"), "latency", "", "", False)
    assert_proxy_up(proxy["listen"], True)


def test_TestListingToxics(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    assert_toxic(api.toxics("mysql_master"), "latency", "", "", False)


def test_TestAddToxic(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    attrs = {"latency": 100, "jitter": 10}
    latency = ok(api.add_toxic("mysql_master", "foobar", "latency", "downstream", 1, attrs))
    assert latency["attributes"] == attrs
    toxic = assert_toxic(api.toxics("mysql_master"), "foobar", "latency", "downstream", True)
    assert toxic is not None and (toxic["toxicity"], toxic["attributes"]) == (1.0, attrs)


def test_TestAddMultipleToxics(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    ok(api.add_toxic("mysql_master", "latency1", "latency", "downstream", 1, None))
    ok(api.add_toxic("mysql_master", "latency2", "latency", "downstream", 1, None))
    toxics = api.toxics("mysql_master")
    assert_toxic(toxics, "latency1", "latency", "downstream", True)
    toxic = assert_toxic(toxics, "latency2", "latency", "downstream", True)
    assert toxic is not None and toxic["toxicity"] == 1.0
    assert toxic["attributes"] == {"latency": 0, "jitter": 0}
    assert_toxic(toxics, "latency1", "", "upstream", False)
    assert_toxic(toxics, "latency2", "", "upstream", False)


def test_TestAddConflictingToxic(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    ok(api.add_toxic("mysql_master", "foobar", "latency", "downstream", 1, None))
    conflict = api.add_toxic("mysql_master", "foobar", "slow_close", "downstream", 1, None)
    assert conflict == error(409, "toxic already exists")
    toxics = api.toxics("mysql_master")
    toxic = assert_toxic(toxics, "foobar", "latency", "downstream", True)
    assert toxic is not None and toxic["attributes"] == {"latency": 0, "jitter": 0}
    assert_toxic(toxics, "foobar", "", "upstream", False)


def test_TestAddConflictingToxicsMultistream(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    ok(api.add_toxic("mysql_master", "foobar", "latency", "upstream", 1, None))
    conflict = api.add_toxic("mysql_master", "foobar", "latency", "downstream", 1, None)
    assert conflict == error(409, "toxic already exists")
    toxics = api.toxics("mysql_master")
    toxic = assert_toxic(toxics, "foobar", "latency", "upstream", True)
    assert toxic is not None and toxic["attributes"] == {"latency": 0, "jitter": 0}
    assert_toxic(toxics, "foobar", "", "downstream", False)


def test_TestAddConflictingToxicsMultistreamDefaults(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    ok(api.add_toxic("mysql_master", "", "latency", "upstream", 1, None))
    ok(api.add_toxic("mysql_master", "", "latency", "downstream", 1, None))
    toxics = api.toxics("mysql_master")
    for name, stream in (("latency_upstream", "upstream"), ("latency_downstream", "downstream")):
        toxic = assert_toxic(toxics, name, "latency", stream, True)
        assert toxic is not None and toxic["toxicity"] == 1.0
        assert toxic["attributes"] == {"latency": 0, "jitter": 0}


def test_TestAddToxicWithToxicity(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    attrs = {"latency": 100, "jitter": 10}
    latency = ok(api.add_toxic("mysql_master", "", "latency", "downstream", 0.2, attrs))
    assert (latency["toxicity"], latency["attributes"]) == (0.2, attrs)
    toxics = api.toxics("mysql_master")
    toxic = assert_toxic(toxics, "latency_downstream", "latency", "downstream", True)
    assert toxic is not None and (toxic["toxicity"], toxic["attributes"]) == (0.2, attrs)


def test_TestAddNoop(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    noop = ok(api.add_toxic("mysql_master", "foobar", "noop", "", 1, None))
    assert (noop["toxicity"], noop["name"], noop["type"], noop["stream"]) == (
        1.0,
        "foobar",
        "noop",
        "downstream",
    )
    toxic = assert_toxic(api.toxics("mysql_master"), "foobar", "noop", "downstream", True)
    assert toxic is not None and toxic["toxicity"] == 1.0


def test_TestUpdateToxics(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    attrs = {"latency": 100, "jitter": 10}
    latency = ok(api.add_toxic("mysql_master", "", "latency", "downstream", -1, attrs))
    assert (latency["toxicity"], latency["attributes"]) == (1.0, attrs)
    latency = ok(api.update_toxic("mysql_master", "latency_downstream", 0.5, {"latency": 1000}))
    assert (latency["toxicity"], latency["attributes"]) == (0.5, {"latency": 1000, "jitter": 10})
    latency = ok(api.update_toxic("mysql_master", "latency_downstream", -1, {"latency": 500}))
    assert (latency["toxicity"], latency["attributes"]) == (0.5, {"latency": 500, "jitter": 10})
    toxics = api.toxics("mysql_master")
    toxic = assert_toxic(toxics, "latency_downstream", "latency", "downstream", True)
    assert toxic is not None
    assert (toxic["toxicity"], toxic["attributes"]) == (0.5, {"latency": 500, "jitter": 10})


def test_TestRemoveToxic(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    ok(api.add_toxic("mysql_master", "", "latency", "downstream", 1, None))
    toxics = api.toxics("mysql_master")
    toxic = assert_toxic(toxics, "latency_downstream", "latency", "downstream", True)
    assert toxic is not None and toxic["attributes"] == {"latency": 0, "jitter": 0}
    status, _, _ = api.call("DELETE", "/proxies/mysql_master/toxics/latency_downstream")
    assert status == 204
    assert_toxic(api.toxics("mysql_master"), "latency_downstream", "", "", False)


def test_TestVersionEndpointReturnsVersion(api: Api) -> None:
    host, port = split(api.address)
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/version")
        body = conn.getresponse().read()
    finally:
        conn.close()
    # Byte for byte as Toxiproxy writes it, with its own version in place of "git".
    version = json.loads(body)["version"]
    assert body == b'{"version": ' + json.dumps(version).encode() + b"}\n"


def test_TestInvalidStream(api: Api) -> None:
    ok(api.create_proxy("mysql_master", "localhost:0", "localhost:20001"), 201)
    status, _ = api.add_toxic("mysql_master", "", "latency", "walrustream", 1, None)
    assert status >= 400


# ---------------------------------------------------------------------------------------------
# proxy_test.go


def _send_and_close(conn: socket.socket, *parts: bytes) -> None:
    for part in parts:
        conn.sendall(part)
    conn.close()


def test_TestProxySimpleMessage(tcp_proxy, tcp_server: TCPServer) -> None:
    conn, _ = tcp_proxy
    _send_and_close(conn, b"hello world")
    assert tcp_server.response.get(timeout=TIMEOUT) == b"hello world"


def test_TestProxyToDownUpstream(api: Api) -> None:
    proxy = ok(api.create_proxy("test", "localhost:0", f"localhost:{closed_port()}"), 201)
    conn = dial(proxy["listen"])
    with conn:
        conn.settimeout(TIMEOUT)  # Go waits 500 ms; generous here
        try:
            assert conn.recv(1) == b"", "proxy did not close connection when upstream down"
        except ConnectionResetError:
            pass  # closed all the same


def test_TestProxyBigMessage(tcp_proxy, tcp_server: TCPServer) -> None:
    conn, _ = tcp_proxy
    msg = bytes(32 * 1024).hex().encode()  # hex.Encode of 32 KiB of zeros: 64 KiB
    _send_and_close(conn, msg)
    assert tcp_server.response.get(timeout=TIMEOUT) == msg


def test_TestProxyTwoPartMessage(tcp_proxy, tcp_server: TCPServer) -> None:
    conn, _ = tcp_proxy
    _send_and_close(conn, b"hello world", b"hello world")
    assert tcp_server.response.get(timeout=TIMEOUT) == b"hello worldhello world"


def test_TestClosingProxyMultipleTimes(api: Api, tcp_proxy) -> None:
    _, proxy = tcp_proxy
    for _ in range(3):  # Proxy.Stop three times: disabling a disabled proxy is no error
        assert ok(api.save({**proxy, "enabled": False}))["enabled"] is False


def test_TestStartTwoProxiesOnSameAddress(api: Api, tcp_proxy) -> None:
    _, proxy = tcp_proxy
    status, body = api.create_proxy("proxy_2", proxy["listen"], "localhost:3306")
    assert status == 500 and "address already in use" in body["error"]


def test_TestStopProxyBeforeStarting(api: Api, tcp_server: TCPServer) -> None:
    off = 0  # the Go test's fixed port; a disabled proxy binds nothing
    proxy = ok(api.create_proxy("test", f"localhost:{off}", tcp_server.address, False), 201)
    assert_proxy_up(proxy["listen"], False)
    proxy = ok(api.save({**proxy, "enabled": False}))  # Stop before Start
    proxy = ok(api.save({**proxy, "enabled": True}))  # Start
    assert proxy["enabled"]
    # A second Start: ErrProxyAlreadyStarted inside Toxiproxy, which the API never shows
    # (ProxyUpdate starts only a disabled proxy); the proxy stays up on the same address.
    again = ok(api.save({**proxy, "enabled": True}))
    assert again["listen"] == proxy["listen"]
    assert_proxy_up(proxy["listen"], True)
    ok(api.save({**proxy, "enabled": False}))
    assert_proxy_up(proxy["listen"], False)


def test_TestProxyUpdate(api: Api, tcp_server: TCPServer) -> None:
    proxy = ok(api.create_proxy("test", "localhost:0", tcp_server.address), 201)
    assert_proxy_up(proxy["listen"], True)
    before = proxy["listen"]
    update = {"listen": "localhost:0", "upstream": proxy["upstream"], "enabled": True}
    proxy = ok(api.save({"name": "test", **update}))
    assert proxy["listen"] not in (before, "localhost:0"), "update didn't change listen address"
    assert_proxy_up(proxy["listen"], True)
    update["listen"] = proxy["listen"]
    proxy = ok(api.save({"name": "test", **update}))
    assert proxy["listen"] == update["listen"]
    assert_proxy_up(proxy["listen"], True)
    update["enabled"] = False
    ok(api.save({"name": "test", **update}))
    assert_proxy_up(proxy["listen"], False)


def test_TestProxyUpdateWithHostname(api: Api) -> None:
    echo = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(echo.accept()[0]), daemon=True)
    thread.start()
    try:
        upstream = f"127.0.0.1:{echo.getsockname()[1]}"
        proxy = ok(api.create_proxy("test", "localhost:0", upstream), 201)
        live = dial(proxy["listen"])
        with live:
            thread.join(TIMEOUT)  # the proxy has dialled the upstream for this client
            assert accepted
            port = port_of(proxy["listen"])
            update = {"listen": f"localhost:{port}", "upstream": upstream, "enabled": True}
            after = ok(api.save({"name": "test", **update}))
            assert after["listen"] == proxy["listen"]
            # The connection was not lost: it still carries data both ways.
            live.sendall(b"ping")
            accepted[0].settimeout(TIMEOUT)
            assert accepted[0].recv(4) == b"ping"
            accepted[0].sendall(b"pong")
            assert live.recv(4) == b"pong"
        assert_proxy_up(after["listen"], True)
    finally:
        for sock in accepted:
            sock.close()
        echo.close()


def test_TestRestartFailedToStartProxy(api: Api, tcp_server: TCPServer) -> None:
    conflict = ok(api.create_proxy("test2", "localhost:0", tcp_server.address), 201)
    assert_proxy_up(conflict["listen"], True)
    proxy = ok(api.create_proxy("test", conflict["listen"], tcp_server.address, False), 201)
    status, body = api.save({**proxy, "enabled": True})
    assert status == 500 and "address already in use" in body["error"]
    assert ok(api.proxy("test"))["enabled"] is False
    ok(api.save({**conflict, "enabled": False}))
    assert_proxy_up(conflict["listen"], False)
    proxy = ok(api.save({**proxy, "enabled": True}))
    assert proxy["enabled"]
    assert_proxy_up(proxy["listen"], True)
    ok(api.save({**proxy, "enabled": False}))
    assert_proxy_up(proxy["listen"], False)


def test_TestProxyDiffers(api: Api, tcp_server: TCPServer) -> None:
    # Proxy.Differs is reached through populate: an entry that does not differ keeps the
    # proxy as it is (here: its toxic), one that does replaces it.
    proxy = ok(api.create_proxy("test", "localhost:0", tcp_server.address), 201)
    ok(api.add_toxic("test", "", "latency", "downstream", 1, None))
    port = port_of(proxy["listen"])
    same = {"name": "test", "listen": f"localhost:{port}", "upstream": tcp_server.address}
    out = ok(api.populate([same]), 201)
    assert len(out["proxies"][0]["toxics"]) == 1, "proxy should not differ"
    other = {**same, "upstream": f"localhost:{port_of(tcp_server.address)}"}
    out = ok(api.populate([other]), 201)
    assert out["proxies"][0]["toxics"] == [], "an upstream given differently differs"


# ---------------------------------------------------------------------------------------------
# proxy_collection_test.go


def test_TestAddProxyToCollection(api: Api) -> None:
    assert api.proxy("test") == error(404, "proxy not found")
    ok(api.create_proxy("test", "localhost:0", "localhost:20000", enabled=False), 201)
    assert ok(api.proxy("test"))["name"] == "test"


def test_TestAddTwoProxiesToCollection(api: Api) -> None:
    ok(api.create_proxy("test", "localhost:0", "localhost:20000", enabled=False), 201)
    again = api.create_proxy("test", "localhost:0", "localhost:20000", enabled=False)
    assert again == error(409, "proxy already exists")


def test_TestListProxies(api: Api) -> None:
    ok(api.create_proxy("test", "localhost:0", "localhost:20000", enabled=False), 201)
    assert api.proxies()["test"]["enabled"] is False


def test_TestAddProxyAndStart(api: Api) -> None:
    ok(api.create_proxy("test", "localhost:0", "localhost:20000"), 201)
    assert api.proxies()["test"]["enabled"] is True


def test_TestAddAndRemoveProxyFromCollection(api: Api, tcp_proxy, tcp_server) -> None:
    conn, _ = tcp_proxy
    _send_and_close(conn, b"go away")
    assert tcp_server.response.get(timeout=TIMEOUT) == b"go away"
    assert api.delete("test")[0] == 204
    assert api.proxy("test") == error(404, "proxy not found")


# ---------------------------------------------------------------------------------------------
# What the Go tests imply beyond their assertions (api.go, proxy.go, proxy_collection.go)


def test_update_ignores_name_and_matches_keys_case_insensitively(api: Api) -> None:
    """encoding/json matches keys case-insensitively; ProxyUpdate never reads the name."""
    proxy = ok(api.create_proxy("p", "localhost:0", "localhost:1"), 201)
    body = {"name": "", "Upstream": "localhost:2", "ENABLED": False}
    status, _, out = api.call("POST", "/proxies/p", body)
    assert status == 200, out
    assert (out["name"], out["upstream"], out["enabled"]) == ("p", "localhost:2", False)
    assert out["listen"] == proxy["listen"]


def test_populate_null_and_duplicates_as_toxiproxy(api: Api) -> None:
    """A null body is an empty list; a name given twice is created, then kept or replaced."""
    status, _, body = api.call("POST", "/populate", raw=b"null")
    assert (status, body) == (201, {"proxies": None})
    entry = {"name": "d", "listen": "127.0.0.1:0", "upstream": "localhost:1"}
    out = ok(api.populate([entry, {**entry, "upstream": "localhost:2"}]), 201)
    assert [p["upstream"] for p in out["proxies"]] == ["localhost:1", "localhost:2"]
    assert api.proxies()["d"]["upstream"] == "localhost:2"


def test_listen_parsed_as_go_does(api: Api) -> None:
    """Go's net.Listen: an empty port is port 0; bad addresses are 500s worded as Go's."""
    assert ok(api.create_proxy("a", "localhost:", "localhost:1"), 201)["listen"].startswith(
        "127.0.0.1:"
    )
    bad = {
        "b": ("nope", "listen tcp: address nope: missing port in address"),
        "c": ("::1:80", "listen tcp: address ::1:80: too many colons in address"),
        "d": ("127.0.0.1:99999", "listen tcp: address 99999: invalid port"),
    }
    for name, (listen, message) in bad.items():
        assert api.create_proxy(name, listen, "localhost:1") == error(500, message)
    assert set(api.proxies()) == {"a"}


def test_request_id_is_on_every_routed_response(api: Api) -> None:
    ids = set()
    for method, path in (("GET", "/proxies"), ("GET", "/proxies/nope"), ("POST", "/reset")):
        status, headers, _ = api.call(method, path)
        assert status in (200, 204, 404)
        ids.add(headers["X-Toxiproxy-Request-Id"])
    assert len(ids) == 3
    # An unrouted request is answered by the router before any middleware, as in Go.
    assert api.call("GET", "/nope")[1].get("X-Toxiproxy-Request-Id") is None


def test_upstream_host_name_is_resolved_per_client(api: Api, tcp_server: TCPServer) -> None:
    """The upstream is stored as given and resolved when a client connects (Go's net.Dial)."""
    upstream = f"localhost:{port_of(tcp_server.address)}"
    proxy = ok(api.create_proxy("h", "localhost:0", upstream), 201)
    assert proxy["upstream"] == upstream
    _send_and_close(dial(proxy["listen"]), b"via localhost")
    assert tcp_server.response.get(timeout=TIMEOUT) == b"via localhost"

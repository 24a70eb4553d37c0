"""Worker->shard links behind the fault proxy, as a chaos run sets them up (DESIGN §7)."""

from __future__ import annotations

import socket

import pytest

from tether.chaos.links import UNROUTED, LinkPlan, ProxyAPIError, ToxiproxyAPI, link_name
from tether.chaos.toxiproxy.api import ProxyServer
from tether.store import Member


def shard(i: int, address: str) -> Member:
    return Member("r", "server", i, 1, address, 1, "h", 0.0, 0.0, "running", {})


class Flaky(ToxiproxyAPI):
    """The API, refusing the first `fail` updates (a busy or restarting proxy)."""

    def __init__(self, address: str, fail: int) -> None:
        super().__init__(address)
        self.fail = fail

    def update(self, name, **fields):
        if self.fail:
            self.fail -= 1
            raise ProxyAPIError(f"POST /proxies/{name}: HTTP 500: busy")
        return super().update(name, **fields)


@pytest.fixture
def server():
    with ProxyServer("127.0.0.1:0", seed=0) as s:
        yield s.start() if s.address is None else s.address


def echo_once(listener: socket.socket, client: socket.socket, data: bytes) -> bytes:
    client.sendall(data)
    conn, _ = listener.accept()
    with conn:
        got = conn.recv(100)
        conn.sendall(got.upper())
    return client.recv(100)


def test_links_route_workers_to_the_current_shard_and_survive_a_failed_update(server):
    api = Flaky(server, fail=1)
    plan = LinkPlan(api, workers=2, shards=1)
    plan.create()
    routes = plan.routes()
    assert set(routes) == {0, 1} and routes[0][0] != routes[1][0]
    assert all(api.request("GET", f"/proxies/{link_name(w, 0)}")["upstream"] == UNROUTED
               for w in range(2))  # fmt: skip
    with socket.socket() as old, socket.socket() as new:
        for s in (old, new):
            s.bind(("127.0.0.1", 0))
            s.listen()
        old_addr = f"127.0.0.1:{old.getsockname()[1]}"
        new_addr = f"127.0.0.1:{new.getsockname()[1]}"
        # The first update is refused: nothing is recorded, so the next poll tries again.
        with pytest.raises(ProxyAPIError):
            plan.point_all([shard(0, old_addr)])
        assert plan.upstreams == {}
        plan.point_all([shard(0, old_addr)])
        assert plan.upstreams == {0: old_addr}
        host, port = routes[1][0].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as client:
            assert echo_once(old, client, b"ping") == b"PING"
            # A replacement shard: the link follows it, on the same proxy port.
            plan.point_all([shard(0, new_addr)])
            try:  # the live connection to the old shard is dropped (closed or reset)
                dropped = client.recv(100) == b""
            except ConnectionResetError:
                dropped = True
            assert dropped
        with socket.create_connection((host, int(port)), timeout=5) as client:
            assert echo_once(new, client, b"pong") == b"PONG"
        proxy = api.request("GET", f"/proxies/{link_name(1, 0)}")
        assert proxy["upstream"] == new_addr and proxy["listen"] == routes[1][0]
    plan.close()
    assert api.request("GET", "/proxies") == {}

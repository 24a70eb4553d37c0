"""Worker->shard links behind fault proxies, driven through the Toxiproxy HTTP API (DESIGN §7).

Every link of a run (worker w -> shard s) gets its own proxy, named ``worker{w}-shard{s}``, so a
fault can target one link, one worker's links (a partition) or one shard's. Workers dial the
proxy instead of the shard (``tether worker --route``); the proxies' upstreams follow the shards
as they are replaced, from the addresses the shards register in the store.

The proxy is a real ``toxiproxy-server`` when one is on PATH, else ``tether chaos proxy``'s
engine in this process; both are driven through the same HTTP API.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from tether.retry import PollTimeout, poll_until
from tether.store import Member, StoreError, open_store

BINARY_START_S = 10.0  # how long a toxiproxy-server is given to answer its API
# A proxy needs an upstream before its shard exists; connections to it are refused until the
# shard registers and the follower points the proxy at it.
UNROUTED = "127.0.0.1:9"


class ProxyAPIError(RuntimeError):
    pass


class ToxiproxyAPI:
    """A small client of the Toxiproxy HTTP API (no global state, unlike `toxiproxy-python`)."""

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        self.base = f"http://{address}"
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace").strip()
            raise ProxyAPIError(f"{method} {path}: HTTP {e.code}: {detail}") from None
        except OSError as e:
            raise ProxyAPIError(f"{method} {path}: fault proxy unreachable: {e}") from None
        return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode()

    def version(self) -> str:
        got = self.request("GET", "/version")  # JSON in Toxiproxy >= 2.6, plain text before
        return str(got.get("version", got) if isinstance(got, dict) else got).strip()

    def create(self, name: str, listen: str, upstream: str) -> dict[str, Any]:
        body = {"name": name, "listen": listen, "upstream": upstream, "enabled": True}
        return dict(self.request("POST", "/proxies", body))

    def update(self, name: str, **fields: Any) -> dict[str, Any]:
        return dict(self.request("POST", f"/proxies/{name}", fields))

    def delete(self, name: str) -> None:
        self.request("DELETE", f"/proxies/{name}")

    def add_toxic(self, proxy: str, toxic: dict[str, Any]) -> None:
        self.request("POST", f"/proxies/{proxy}/toxics", toxic)

    def remove_toxic(self, proxy: str, name: str) -> None:
        self.request("DELETE", f"/proxies/{proxy}/toxics/{name}")

    def reset(self) -> None:
        self.request("POST", "/reset")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _started(api: ToxiproxyAPI, proc: subprocess.Popen[bytes], binary: str, port: int) -> str:
    """Wait for a toxiproxy-server just started to answer its API; what it is, with its version.

    ProxyAPIError if it exits first or does not answer within BINARY_START_S.
    """

    def version() -> str | None:
        try:
            return f"toxiproxy-server {api.version()}".strip()  # never empty
        except ProxyAPIError:
            if proc.poll() is not None:
                raise ProxyAPIError(f"{binary} did not start on port {port}") from None
            return None

    try:
        kind = poll_until(version, BINARY_START_S, f"{binary} on port {port}", 0.05)
    except PollTimeout:
        raise ProxyAPIError(f"{binary} did not start on port {port}") from None
    assert kind is not None  # no stop event: a value or PollTimeout
    return kind


@contextlib.contextmanager
def fault_proxy(seed: int, prefer_binary: bool = True) -> Iterator[tuple[ToxiproxyAPI, str]]:
    """A running fault proxy on loopback: (API client, what it is)."""
    binary = shutil.which("toxiproxy-server") if prefer_binary else None
    if binary is not None:
        port = _free_port()
        proc = subprocess.Popen(
            [binary, "-host", "127.0.0.1", "-port", str(port), "-seed", str(seed)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            api = ToxiproxyAPI(f"127.0.0.1:{port}")
            yield api, _started(api, proc, binary, port)
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return
    from tether.chaos.toxiproxy.api import ProxyServer

    server = ProxyServer("127.0.0.1:0", seed=seed)
    address = server.start()
    try:
        yield ToxiproxyAPI(address), "tether chaos proxy (in process)"
    finally:
        server.stop()


def link_name(worker: int, shard: int) -> str:
    return f"worker{worker}-shard{shard}"


class LinkPlan:
    """The run's proxied links: creates them, routes workers through them, follows the shards."""

    def __init__(self, api: ToxiproxyAPI, workers: int, shards: int) -> None:
        self.api = api
        self.workers, self.shards = workers, shards
        self.listen: dict[tuple[int, int], str] = {}
        self.upstreams: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def create(self) -> None:
        """Create every link's proxy, on a free loopback port, leading nowhere yet."""
        for w in range(self.workers):
            for s in range(self.shards):
                proxy = self.api.create(link_name(w, s), "127.0.0.1:0", UNROUTED)
                self.listen[(w, s)] = str(proxy["listen"])

    def routes(self) -> dict[int, dict[int, str]]:
        """worker -> shard -> the proxy address the worker dials for that shard."""
        return {
            w: {s: self.listen[(w, s)] for s in range(self.shards)} for w in range(self.workers)
        }

    def point(self, shard: int, address: str) -> None:
        """Send every link to `shard` to `address` (a replacement shard's)."""
        for w in range(self.workers):
            # The listen address is given explicitly so the proxy stays on its port should the
            # server restart its listener for the new upstream (Toxiproxy does).
            self.api.update(link_name(w, shard), upstream=address, listen=self.listen[(w, shard)])
        self.upstreams[shard] = address  # only once every link to it was updated

    def point_all(self, shards: list[Member]) -> None:
        """Point every link at its shard's registered address where it changed."""
        for m in shards:
            if m.address and self.upstreams.get(m.member_id) != m.address:
                self.point(m.member_id, m.address)

    def follow(self, store_uri: str, run_id: str, interval_s: float = 0.02) -> None:
        """In a thread: point the links at each shard's registered address as it changes.

        A failed update (the proxy's API refused or was busy) is retried at the next poll: a
        link left pointing at a dead shard would cut its worker off for good.
        """

        def loop() -> None:
            store = open_store(store_uri)
            try:
                while not self._stop.wait(interval_s):
                    try:
                        self.point_all(store.members(run_id, "server"))
                    except StoreError:
                        continue  # the run may not exist yet; poll again
                    except ProxyAPIError as e:
                        print(f"chaos: re-pointing a link failed, retrying: {e}", file=sys.stderr)
            finally:
                store.close()

        self._thread = threading.Thread(target=loop, name="link-follower", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for w, s in self.listen:
            with contextlib.suppress(ProxyAPIError):
                self.api.delete(link_name(w, s))

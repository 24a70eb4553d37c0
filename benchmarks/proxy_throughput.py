"""Loopback TCP throughput: a direct connection vs the same transfer through the chaos proxy.

DESIGN §7 asks that the fault proxy not be the bottleneck of a chaos run. This sends ``--size-mb``
MiB over one TCP connection to a sink on 127.0.0.1, timed from connect until the sink has
acknowledged the last byte, along three paths:

- ``direct``: client -> sink;
- ``proxy``: client -> ``tether chaos proxy`` (no toxics: the straight-copy path) -> sink;
- ``proxy_toxic``: the same through a proxy with a latency toxic of toxicity 0 on both streams,
  so every chunk goes through the toxic pipeline but is not delayed.

The proxy runs in its own process (as ``tether chaos proxy`` does), so it does not share the GIL
with the client and the sink. The paths alternate round by round so they see the same machine
noise; rates are medians in Gbit/s and ``proxy_ratio`` is proxy / direct.

    python benchmarks/proxy_throughput.py [--size-mb 256] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

BLOCK = 4 << 20


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=256, help="MiB per transfer (default 256)")
    ap.add_argument("--rounds", type=int, default=5, help="transfers per path (default 5)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    if args.size_mb < 1 or args.rounds < 1:
        ap.error("--size-mb and --rounds must be >= 1")
    return args


class Sink:
    """Accepts connections; reads an 8-byte length, then that many bytes, then acknowledges."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        buf = memoryview(bytearray(BLOCK))
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while len(head) < 8:
                    head += conn.recv(8 - len(head))
                left = struct.unpack("!Q", head)[0]
                while left > 0:
                    n = conn.recv_into(buf, min(left, BLOCK))
                    if n == 0:
                        break
                    left -= n
                conn.sendall(b"k")

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def transfer(address: str, size: int) -> float:
    """Seconds to send ``size`` bytes to the sink at ``address`` and get its acknowledgement."""
    host, port = address.rsplit(":", 1)
    block = memoryview(os.urandom(BLOCK))
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(struct.pack("!Q", size))
        left = size
        while left > 0:
            n = min(left, BLOCK)
            s.sendall(block[:n])
            left -= n
        if s.recv(1) != b"k":
            raise RuntimeError(f"transfer through {address} was cut short")
    return time.perf_counter() - t0


def api(base: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def start_proxy() -> tuple[subprocess.Popen[str], str]:
    code = (
        "import sys\n"
        "from tether.chaos.toxiproxy.api import serve\n"
        "serve('127.0.0.1:0', ready=lambda a: print(a, flush=True))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    if not address:
        proc.kill()
        raise RuntimeError("the chaos proxy did not start")
    return proc, address


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    size = args.size_mb << 20
    sink = Sink()
    proc, api_address = start_proxy()
    base = f"http://{api_address}"
    try:
        plain = api(base, "POST", "/proxies", {"name": "plain", "upstream": sink.address})
        staged = api(base, "POST", "/proxies", {"name": "staged", "upstream": sink.address})
        for stream in ("upstream", "downstream"):
            toxic = {"type": "latency", "stream": stream, "toxicity": 0.0}
            api(base, "POST", "/proxies/staged/toxics", {**toxic, "attributes": {"latency": 1000}})
        paths = {"direct": sink.address, "proxy": plain["listen"], "proxy_toxic": staged["listen"]}
        transfer(plain["listen"], 16 << 20)  # warm up
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(args.rounds):
            for name, address in paths.items():
                rates[name].append(size * 8 / transfer(address, size) / 1e9)
            line = "  ".join(f"{name} {rates[name][-1]:.2f}" for name in paths)
            print(f"round {r + 1}: {line} Gbit/s", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        sink.close()
    med = {name: statistics.median(v) for name, v in rates.items()}
    report = {
        "size_mb": args.size_mb,
        "rounds": args.rounds,
        "direct_gbps": round(med["direct"], 3),
        "proxy_gbps": round(med["proxy"], 3),
        "proxy_toxic_gbps": round(med["proxy_toxic"], 3),
        "proxy_ratio": round(med["proxy"] / med["direct"], 3),
        "proxy_toxic_ratio": round(med["proxy_toxic"] / med["direct"], 3),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    print(
        f"direct {med['direct']:.2f} Gbit/s, proxy {med['proxy']:.2f} Gbit/s "
        f"(ratio {report['proxy_ratio']}), proxy with a toxicity-0 toxic "
        f"{med['proxy_toxic']:.2f} Gbit/s (ratio {report['proxy_toxic_ratio']})",
        file=sys.stderr if args.json else sys.stdout,
    )
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

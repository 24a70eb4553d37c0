"""Free TCP ports for the loopback clusters of the dev tools (a replica set, Slurm)."""

from __future__ import annotations

import socket


def free_ports(n: int, host: str = "127.0.0.1") -> tuple[int, ...]:
    """``n`` distinct ports free on ``host`` a moment ago (bound together, then closed); host ""
    asks for ports free on every address, for daemons that bind other loopback addresses."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return tuple(int(s.getsockname()[1]) for s in socks)
    finally:
        for s in socks:
            s.close()

"""The health server a member that serves nothing else (a worker) runs for liveness probes.

A shard answers health checks on its own gRPC server; a worker starts this one and registers its
address in the store, so the driver's probes (tether/driver/probe.py) can tell a busy worker,
which answers, from a frozen one, which does not (DESIGN §5).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tether.transport import Security


def serve_health(listen: str, security: Security) -> tuple[grpc.Server, int]:
    """A health server for a process that serves nothing else (a worker); returns it, started,
    and the port it bound (`listen` is ``HOST:PORT``, port 0 for a free one). It speaks TLS as
    the run does; the health service needs no token (DESIGN §13)."""
    try:
        server, port = security.server(listen, max_workers=2, name="health")
    except OSError:
        raise OSError(f"cannot listen on {listen} for the liveness probe") from None
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server.start()
    return server, port

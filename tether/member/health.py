"""The health server a member that serves nothing else (a worker) runs for liveness probes.

A shard answers health checks on its own gRPC server; a worker starts this one and registers its
address in the store, so the driver's probes (tether/driver/probe.py) can tell a busy worker,
which answers, from a frozen one, which does not (DESIGN §5).
"""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def serve_health(listen: str = "127.0.0.1:0") -> tuple[grpc.Server, int]:
    """A health server for a process that serves nothing else (a worker); returns it, started,
    and the port it bound (`listen` is ``HOST:PORT``, port 0 for a free one)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen} for the liveness probe")
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server.start()
    return server, port

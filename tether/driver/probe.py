"""Direct liveness probes of the gRPC health service every member serves (DESIGN §5).

A shard answers on its own gRPC server; a worker runs a small health server of its own whose
address it registers in the store. The probe asks whether the *process* is alive and not frozen:
any answer counts (NOT_SERVING is a shard that is stopping, which is alive), no answer within
the attempt's deadline does not. A SIGSTOPped process accepts the TCP connection (the kernel
does that) but never answers; a busy one answers, late but within the deadline.
"""

from __future__ import annotations

import queue
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tether.driver.liveness import Key
from tether.transport import Security


def probe(address: str, timeout_s: float, security: Security) -> tuple[bool, str]:
    """(answered, what went wrong) for one health check of the member at ``address``."""
    if not address:
        return False, "the member registered no address to probe"
    channel = security.channel(address)
    try:
        health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
        )
        return True, ""
    except grpc.RpcError as e:
        return False, f"{e.code().name}: {e.details()}"
    finally:
        channel.close()


class Prober:
    """Runs probes on a few threads so the caller's loop never waits on one; results queue up."""

    def __init__(self, attempt_timeout_s: float, security: Security, threads: int = 4) -> None:
        self.attempt_timeout_s = attempt_timeout_s
        self.security = security
        self._pool = futures.ThreadPoolExecutor(threads, thread_name_prefix="probe")
        self.results: queue.Queue[tuple[Key, int, bool, str]] = queue.Queue()

    def submit(self, key: Key, number: int, address: str) -> None:
        def run() -> None:
            ok, error = probe(address, self.attempt_timeout_s, self.security)
            self.results.put((key, number, ok, error))

        self._pool.submit(run)

    def drain(self) -> list[tuple[Key, int, bool, str]]:
        out = []
        while True:
            try:
                out.append(self.results.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

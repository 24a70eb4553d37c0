"""A Ray cluster of several nodes on this machine, one loopback address per node (DESIGN §12).

For the tests and the benchmark of `tether launch --engine ray`: a head node that runs no members
(no CPUs to offer) and N member nodes on 127.0.0.2, 127.0.0.3, ... (Ray rewrites 127.0.0.1 to
the machine's outward address, so that one is never used), small object stores, usage statistics
off. `remove(ip)` takes a node away with every process on it (Ray's `Cluster.remove_node`);
`kill_raylet(ip)` SIGKILLs only its raylet, as a crashed node manager. `tuned=True` sets Ray's
node health checks to a 0.5 s period and 3 misses, instead of Ray's defaults (a 3 s period and
5 misses, about 15 s before a lost node is declared dead).
"""

from __future__ import annotations

import os
import signal
from typing import Any

HEAD_ADDRESS = "127.0.0.10"
OBJECT_STORE_BYTES = 80 * 1024 * 1024
TUNED_HEALTH_CHECKS = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_timeout_ms": 500,
    "health_check_initial_delay_ms": 0,
}


def node_address(index: int) -> str:
    """The loopback address of member node `index` (0-based): 127.0.0.2, 127.0.0.3, ..."""
    return f"127.0.0.{index + 2}"


class LoopbackRayCluster:
    def __init__(self, nodes: int = 3, cpus_per_node: int = 2, *, tuned: bool = True) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        from ray.cluster_utils import Cluster

        self.cpus_per_node = cpus_per_node
        head: dict[str, Any] = {
            "num_cpus": 0,
            "node_ip_address": HEAD_ADDRESS,
            "object_store_memory": OBJECT_STORE_BYTES,
            "include_dashboard": False,
        }
        if tuned:
            head["_system_config"] = TUNED_HEALTH_CHECKS
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        self.nodes: dict[str, Any] = {}
        self._next = 0
        try:
            for _ in range(nodes):
                self.add()
            self.cluster.wait_for_nodes()
        except BaseException:
            self.cluster.shutdown()
            raise

    @property
    def address(self) -> str:
        """What `tether launch --engine ray --address` takes (the head's GCS address)."""
        return str(self.cluster.address)

    def add(self) -> str:
        """Add a member node on the next loopback address; returns that address."""
        ip = node_address(self._next)
        self._next += 1
        self.nodes[ip] = self.cluster.add_node(
            num_cpus=self.cpus_per_node, node_ip_address=ip,
            object_store_memory=OBJECT_STORE_BYTES,
        )  # fmt: skip
        return ip

    def remove(self, ip: str) -> None:
        """The node is lost: every process on it is killed at once."""
        self.cluster.remove_node(self.nodes.pop(ip), allow_graceful=False)

    def kill_raylet(self, ip: str) -> int:
        """SIGKILL the node's raylet only; returns its pid (the node stays listed for cleanup)."""
        pid = int(self.nodes[ip].all_processes["raylet"][0].process.pid)
        os.kill(pid, signal.SIGKILL)
        return pid

    def shutdown(self) -> None:
        self.cluster.shutdown()

    def __enter__(self) -> LoopbackRayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

"""`tether launch --engine ray`: members as Ray actors on the nodes of a Ray cluster (DESIGN §12).

Each member is one actor that runs the unchanged `tether server|worker` command line as its child
process, so a member behaves exactly as under any other engine. The child is tied to its actor:
it is started with a parent-death signal (SIGKILL), so an actor killed by Ray, by its node's loss
or by the driver takes its member with it and never leaves an orphan serving stale state.

Placement is Ray's soft SPREAD: members go to different nodes while there are nodes to spare, and
a member whose node was lost can be placed again on any node that is left (hard placement would
leave it unplaceable). Restarts are the driver's, as under every engine: the actors themselves are
never restarted by Ray (`max_restarts=0`), so one restart budget (`--max-restarts`) and one record
of causes covers crashes, liveness kills and lost nodes alike; a lost node shows up as the actor's
death, with Ray's word for why, and the replacement is a new actor that rebuilds its state from
the store. Each shard listens on its node's address (the one Ray knows the node by).

A handle never blocks the driver: its `poll` keeps one status call to the actor in flight and
looks at it without waiting.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tether.driver.spawner import MemberSpec, member_command, tail

# Replaced in the command line by the node's address, inside the actor (`--listen NODE:0`).
NODE_ADDRESS = "{node}"
_PR_SET_PDEATHSIG = 1
# The exit code a handle reports for a member whose actor is gone (its node was lost).
LOST_EXIT = -signal.SIGKILL


def ray_available() -> str | None:
    """None when Ray can be imported, else the sentence a usage error prints."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "--engine ray needs Ray: pip install 'tether-ps[ray]'"
    return None


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the actor's process (its parent) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl: do not outlive it
        os._exit(1)


class MemberActor:
    """Runs one member's command as a child process on the actor's node."""

    def __init__(self, cmd: list[str], env: dict[str, str], name: str) -> None:
        import ray

        self.node = ray.util.get_node_ip_address()
        # This node's own interpreter, and its address to listen on.
        cmd = [sys.executable, *(part.replace(NODE_ADDRESS, self.node) for part in cmd[1:])]
        logs = Path(tempfile.gettempdir()) / "tether-ray-logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{name}.log"
        with open(self.log_path, "ab") as log:
            # A sync actor runs its methods on its main thread, the one that forks here: the
            # parent-death signal is tied to that thread, which lives as long as the actor.
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, **env}, preexec_fn=_die_with_parent,
            )  # fmt: skip

    def where(self) -> tuple[int, str, str]:
        """(the member's pid, the node's address, its log's path on that node)."""
        return self.proc.pid, self.node, str(self.log_path)

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()

    def log_tail(self, lines: int) -> str:
        return tail(self.log_path, lines)


class RayHandle:
    """A member started as a `MemberActor`, seen from the driver."""

    def __init__(self, actor: Any, name: str, timeout_s: float) -> None:
        import ray

        self._ray = ray
        self.actor = actor
        self.name = name
        self.timeout_s = timeout_s
        self._pid, self._node, self._log = 0, "", ""
        self._exit: int | None = None
        self._lost: str | None = None
        self._status: Any = None  # the poll call in flight
        self._where: Any = actor.where.remote()

    def _settle_where(self, timeout_s: float | None) -> None:
        if self._where is None:
            return
        ready, _ = self._ray.wait([self._where], timeout=timeout_s)
        if ready:
            try:
                self._pid, self._node, self._log = self._ray.get(self._where)
            except self._ray.exceptions.RayError as e:
                self._gone(e)
            self._where = None

    @property
    def pid(self) -> int:
        self._settle_where(0)
        return self._pid or -id(self)  # before the actor has started: a placeholder key

    @property
    def log_where(self) -> str:
        self._settle_where(0)
        if not self._node:
            return f"ray actor {self.name} (not placed yet)"
        return f"{self._log} on node {self._node} (ray actor {self.name})"

    def _gone(self, error: BaseException) -> None:
        """The actor died: its member is gone with it, whatever it was doing."""
        if self._exit is None:
            self._exit = LOST_EXIT
            self._lost = _reason(error)

    def poll(self) -> int | None:
        if self._exit is not None:
            return self._exit
        self._settle_where(0)
        if self._status is None:
            self._status = self.actor.poll.remote()
        ready, _ = self._ray.wait([self._status], timeout=0)
        if not ready:
            return None
        ref, self._status = self._status, None
        try:
            code = self._ray.get(ref)
        except self._ray.exceptions.ActorUnavailableError:
            # Unreachable for now (a network blip, or a node not yet declared dead): ask again.
            # Ray's health checks declare a lost node dead, and the driver's liveness probes
            # kill a member that stays unreachable.
            return None
        except self._ray.exceptions.RayError as e:
            self._gone(e)
            return self._exit
        if code is not None:
            self._exit = int(code)
        return self._exit

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            self.actor.send_signal.remote(sig)

    def kill(self) -> None:
        """SIGKILL the member, then end its actor (its child's parent-death signal too)."""
        if self._exit is None:
            try:
                self._exit = int(self._ray.get(self.actor.kill.remote(), timeout=self.timeout_s))
            except self._ray.exceptions.RayError as e:
                self._gone(e)
        self._ray.kill(self.actor, no_restart=True)

    def wait(self, timeout_s: float | None = None) -> int:
        from tether.retry import PollTimeout, poll_until

        try:
            poll_until(lambda: self.poll() is not None, timeout_s, f"ray actor {self.name}")
        except PollTimeout:
            raise subprocess.TimeoutExpired(self.name, timeout_s or 0) from None
        assert self._exit is not None
        self._ray.kill(self.actor, no_restart=True)  # the member is done; so is its actor
        return self._exit

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self._ray.get(self.actor.log_tail.remote(lines), timeout=self.timeout_s)
        except self._ray.exceptions.RayError:
            return f"    (the log is on node {self._node or '?'}, which cannot be reached)"
        return str(text)

    def lost(self) -> str | None:
        return self._lost


def _reason(error: BaseException) -> str:
    """Ray's one-line word for why an actor died (e.g. its node died)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "node" in line.lower() and ("died" in line.lower() or "dead" in line.lower()):
            return line
    return lines[-1] if lines else type(error).__name__


class RaySpawner:
    """Starts each member as a `MemberActor` on the Ray cluster at `address`.

    `address` is what `ray.init` takes: None joins the cluster named by RAY_ADDRESS or running
    on this machine, else starts a local one; `HOST:6379` or `ray://HOST:10001` names one.
    """

    def __init__(self, address: str | None, *, gpu_workers: bool, call_timeout_s: float = 30.0):
        import ray

        self._ray = ray
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            ray.init(
                address=address, namespace="tether", log_to_driver=False,
                configure_logging=False,
            )  # fmt: skip
        self.gpu_workers = gpu_workers
        self.call_timeout_s = call_timeout_s
        self._actor_class = ray.remote(MemberActor)
        self._closed = False

    def start(self, spec: MemberSpec) -> RayHandle:
        name = f"{spec.run_id}-{spec.role}-{spec.member_id}-{spec.spawn or os.getpid()}"
        listen = f"{NODE_ADDRESS}:0"
        spec_here = MemberSpec(
            spec.role, spec.member_id, spec.store_uri, spec.run_id, spec.routes,
            spawn=spec.spawn, listen=listen, advertise=spec.advertise,
            metrics_port=spec.metrics_port,
        )  # fmt: skip
        resources: dict[str, Any] = {"num_cpus": 1}
        if spec.role == "worker" and self.gpu_workers:
            resources["num_gpus"] = 1
        actor = self._actor_class.options(
            name=name, max_restarts=0, scheduling_strategy="SPREAD", **resources
        ).remote(member_command(spec_here), spec.env(), name)
        return RayHandle(actor, name, self.call_timeout_s)

    def close(self) -> None:
        if not self._closed and self._owns_connection:
            self._ray.shutdown()
        self._closed = True

"""How the driver starts members: the `Spawner` interface and the local subprocess spawner.

The driver decides *what* runs (which member, when to restart it, when to kill it); a spawner
only knows *how* to start one member's process and hands back a `Handle` at once — waiting for it
to register is the driver's job, with a deadline (DESIGN §12). Every member runs the exact command
line a cluster scheduler would run (`member_command`, DESIGN §1), so the local spawner is one
implementation among those a scheduler provides; `tether.driver.ray_engine` and
`tether.driver.slurm_engine` are the others.

Every start gets a spawn token (`MemberSpec.spawn`), passed to the member as `TETHER_SPAWN` and
reported in its heartbeats: that is how the driver tells which of its starts a record in the
store belongs to when the process it holds (`srun`, a Ray actor) is not the member itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tether.roles import Role

DEFAULT_LISTEN = "127.0.0.1:0"
SPAWN_VARIABLE = "TETHER_SPAWN"


@dataclass(frozen=True, slots=True)
class MemberSpec:
    """One member process to start: its role and id in a run, and where its store is."""

    role: Role
    member_id: int
    store_uri: str
    run_id: str
    # shard id -> address this worker dials for it (a fault proxy in chaos runs, DESIGN §7)
    routes: dict[int, str] = field(default_factory=dict)
    spawn: str = ""  # this start's token (TETHER_SPAWN), unique within the driver
    listen: str = DEFAULT_LISTEN  # `--listen`: where the member serves (its health probe)
    advertise: str | None = None  # `--advertise`, when the listen host cannot be dialled
    metrics_port: int | None = None  # `--metrics-port` (DESIGN §13); None: no metrics

    def env(self) -> dict[str, str]:
        """The member's environment beyond the spawner's own."""
        return {SPAWN_VARIABLE: self.spawn} if self.spawn else {}


class Handle(Protocol):
    """A started member process, as the driver sees it."""

    @property
    def pid(self) -> int: ...

    @property
    def log_where(self) -> str:
        """Where the member's log is, for a message (a path, or a node and a path)."""
        ...

    def poll(self) -> int | None:
        """The exit code once the process ended (negative: killed by that signal), else None."""
        ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...

    def wait(self, timeout_s: float | None = None) -> int:
        """Reap the process; raises `subprocess.TimeoutExpired` after `timeout_s`."""
        ...

    def log_tail(self, lines: int = 8) -> str: ...

    def lost(self) -> str | None:
        """Why the process ended without an exit of its own (its node was lost), if it did."""
        ...


class Spawner(Protocol):
    def start(self, spec: MemberSpec) -> Handle:
        """Start one member and return at once."""
        ...

    def close(self) -> None:
        """Release what the spawner holds (after every handle was stopped)."""
        ...


def member_command(spec: MemberSpec) -> list[str]:
    """The exact command line a cluster scheduler would run for this member (DESIGN §1)."""
    flag = "--shard-id" if spec.role == "server" else "--worker-id"
    cmd = [
        sys.executable, "-m", "tether", spec.role,
        "--store", spec.store_uri, "--run", spec.run_id, flag, str(spec.member_id),
    ]  # fmt: skip
    if spec.listen != DEFAULT_LISTEN:
        cmd += ["--listen", spec.listen]
    if spec.advertise:
        cmd += ["--advertise", spec.advertise]
    if spec.metrics_port is not None:
        cmd += ["--metrics-port", str(spec.metrics_port)]
    for shard, address in sorted(spec.routes.items()):
        cmd += ["--route", f"{shard}={address}"]
    return cmd


def member_env(spec: MemberSpec) -> dict[str, str]:
    """This process's environment plus the member's own (`MemberSpec.env`)."""
    return {**os.environ, **spec.env()}


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a log file, indented for an error message ("" if unreadable)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


@dataclass(slots=True)
class LocalHandle:
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.kill()

    def wait(self, timeout_s: float | None = None) -> int:
        return self.proc.wait(timeout=timeout_s)

    @property
    def log_where(self) -> str:
        return str(self.log_path)

    def log_tail(self, lines: int = 8) -> str:
        return tail(self.log_path, lines)

    def lost(self) -> str | None:
        return None


class LocalSpawner:
    """Members as child processes of this one, with their logs in `<run-dir>/logs`."""

    def __init__(self, run_dir: Path) -> None:
        self.logs = run_dir / "logs"

    def start(self, spec: MemberSpec) -> LocalHandle:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{spec.role}-{spec.member_id}.log"
        with open(log_path, "ab") as log:
            # stdin closed; children share the driver's process group so one signal to the
            # group (Ctrl-C, a test's teardown) reaches all of them.
            proc = subprocess.Popen(
                member_command(spec), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=member_env(spec),
            )  # fmt: skip
        return LocalHandle(proc, log_path)

    def close(self) -> None:
        pass


def stop_all(handles: Iterable[Handle], grace_s: float = 5.0) -> None:
    """SIGTERM every live process, then SIGKILL what is left after the grace period; reap all."""
    handles = list(handles)
    for h in handles:
        if h.poll() is None:
            h.send_signal(signal.SIGTERM)
            h.send_signal(signal.SIGCONT)  # a paused member handles it too
    deadline = time.monotonic() + grace_s
    for h in handles:
        try:
            h.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            h.kill()
            h.wait()

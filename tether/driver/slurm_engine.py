"""`tether launch --engine slurm`: members as job steps of the Slurm allocation the driver runs in
(DESIGN §12).

The driver runs inside an allocation (`sbatch` or `salloc`, see examples/slurm/tether.sbatch).
Each member is one job step: `srun --nodes=1 --ntasks=1 --overlap ...` started by the driver,
which runs `python -m tether.driver.slurm_engine step ...` on a node the driver picks: the
allocation's node with the fewest running members (`--nodelist`; left to itself, Slurm piles
overlapping steps onto the first node once each node has one). That shim
names the node and the step in the member's log, finds the address the node is known by to
Slurm (its NodeAddr) and replaces itself with the unchanged `tether server|worker` command,
listening on that address. Slurm does not restart a step, so the driver does, as under every
engine: a member whose step failed because its node went down is a lost node, that node is
left out of later placements, and the replacement step lands on another node of the allocation.

A handle is the local `srun` process; signals go to the step through `scancel`, which reaches
the member on its node (srun itself forwards only some signals, and killing srun does not kill
the remote task).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tether.driver.spawner import MemberSpec, member_command, member_env, tail

# Replaced in the command line by the node's address, on the node (`--listen ADDR:0`).
NODE_ADDRESS = "{node}"
_STEP_LINE = re.compile(r"^tether slurm step: node=(\S+) address=(\S+) step=(\S+)$", re.M)
# Node states in which a failed step means its node was lost, not that the member crashed.
_LOST_STATES = ("DOWN", "FAIL", "NOT_RESPONDING", "DRAIN", "POWER", "UNKNOWN")
SCONTROL_TIMEOUT_S = 10.0
# The exit code a handle reports for a member whose node was lost.
LOST_EXIT = -signal.SIGKILL


def slurm_refusal(env: dict[str, str] | None = None) -> str | None:
    """None when this process can start job steps, else the sentence a usage error prints."""
    env = dict(os.environ) if env is None else env
    if shutil.which("srun") is None:
        return "--engine slurm needs Slurm's srun on PATH"
    if not env.get("SLURM_JOB_ID"):
        return (
            "--engine slurm starts members as job steps of an allocation: run it inside "
            "sbatch or salloc (SLURM_JOB_ID is not set)"
        )
    return None


def show_node(node: str, field: str) -> str:
    """One field of `scontrol show node NODE` (State, NodeAddr, ...), "" if unknown."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", node], capture_output=True, text=True,
            timeout=SCONTROL_TIMEOUT_S,
        ).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def allocation_nodes() -> list[str]:
    """The allocation's node names, in Slurm's order (`SLURM_JOB_NODELIST` expanded)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return []
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
            timeout=SCONTROL_TIMEOUT_S, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return out.split()


def node_lost(state: str) -> bool:
    return state.endswith("*") or any(word in state.upper() for word in _LOST_STATES)


class SlurmHandle:
    """One member's job step, through the local `srun` that started it."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        node: str | None,
        log_path: Path,
        log_offset: int,
        spawner: SlurmSpawner,
    ) -> None:
        self.proc = proc
        self.node = node  # where the step was placed (None: wherever Slurm put it)
        self.log_path = log_path
        self.log_offset = log_offset  # where this step's part of the log begins
        self.spawner = spawner
        self._lost: str | None = None
        self._exit: int | None = None

    def _step(self) -> tuple[str, str, str] | None:
        """(node, address, job.step) as the shim wrote them in the log, once it ran."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)  # the log is appended to by every step of the member
                match = _STEP_LINE.search(log.read().decode(errors="replace"))
        except OSError:
            return None
        return None if match is None else (match.group(1), match.group(2), match.group(3))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log_where(self) -> str:
        step = self._step()
        return str(self.log_path) + (f" (step {step[2]} on node {step[0]})" if step else "")

    def poll(self) -> int | None:
        if self._exit is not None:
            return self._exit
        rc = self.proc.poll()
        if rc is None:
            return None
        # srun may exit 0 when its node failed: whatever the code, a step whose node is down
        # was lost with it (and never finished its work); so was one refused a node that went
        # down before the step started.
        step = self._step()
        node = step[0] if step is not None else self.node
        if node and node_lost(state := show_node(node, "State")):
            self._lost = f"node {node} is {state} in Slurm"
            self.spawner.exclude(node)
            rc = LOST_EXIT
        self._exit = rc
        return rc

    def send_signal(self, sig: int) -> None:
        step = self._step()
        if step is None:  # not running on its node yet: srun passes it on or dies of it
            self.proc.send_signal(sig)
            return
        subprocess.run(
            ["scancel", "--quiet", f"--signal={int(sig)}", step[2]],
            capture_output=True, timeout=SCONTROL_TIMEOUT_S,
        )  # fmt: skip

    def kill(self) -> None:
        step = self._step()
        if step is not None:
            subprocess.run(
                ["scancel", "--quiet", "--signal=KILL", step[2]],
                capture_output=True, timeout=SCONTROL_TIMEOUT_S,
            )  # fmt: skip
        self.proc.kill()

    def wait(self, timeout_s: float | None = None) -> int:
        self.proc.wait(timeout=timeout_s)
        code = self.poll()
        assert code is not None
        return code

    def log_tail(self, lines: int = 8) -> str:
        return tail(self.log_path, lines)

    def lost(self) -> str | None:
        return self._lost


class SlurmSpawner:
    """Starts each member as a one-task job step of the current allocation."""

    def __init__(self, run_dir: Path, *, gpu_workers: bool, nodes: list[str] | None = None) -> None:
        self.logs = run_dir / "logs"
        self.gpu_workers = gpu_workers
        self.nodes = allocation_nodes() if nodes is None else nodes
        self.excluded: set[str] = set()  # nodes lost during the run
        self.handles: list[SlurmHandle] = []

    def exclude(self, node: str) -> None:
        self.excluded.add(node)

    def place(self) -> str | None:
        """The allocation's live node with the fewest running steps (the first such in order);
        None when the allocation's nodes are unknown or all lost (then Slurm chooses)."""
        live = [n for n in self.nodes if n not in self.excluded]
        if not live:
            return None
        running = Counter(h.node for h in self.handles if h.proc.poll() is None)
        return min(live, key=lambda n: running[n])

    def srun_command(self, spec: MemberSpec, node: str | None = None) -> list[str]:
        listen = f"{NODE_ADDRESS}:0"
        on_node = MemberSpec(
            spec.role, spec.member_id, spec.store_uri, spec.run_id, spec.routes,
            spawn=spec.spawn, listen=listen, advertise=spec.advertise,
            metrics_port=spec.metrics_port,
        )  # fmt: skip
        cmd = [
            "srun", "--nodes=1", "--ntasks=1", "--overlap", "--kill-on-bad-exit=1",
            "--quiet", f"--job-name=tether-{spec.role}-{spec.member_id}",
        ]  # fmt: skip
        if node is not None:
            cmd.append(f"--nodelist={node}")
        elif self.excluded:
            cmd.append(f"--exclude={','.join(sorted(self.excluded))}")
        if spec.role == "worker" and self.gpu_workers:
            cmd.append("--gpus-per-task=1")
        return [*cmd, sys.executable, "-m", "tether.driver.slurm_engine", "step",
                *member_command(on_node)[1:]]  # fmt: skip

    def start(self, spec: MemberSpec) -> SlurmHandle:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{spec.role}-{spec.member_id}.log"
        node = self.place()
        with open(log_path, "ab") as log:
            offset = log.tell()
            proc = subprocess.Popen(
                self.srun_command(spec, node), stdin=subprocess.DEVNULL, stdout=log,
                stderr=log, env=member_env(spec),
            )  # fmt: skip
        handle = SlurmHandle(proc, node, log_path, offset, self)
        self.handles = [h for h in self.handles if h.proc.poll() is None] + [handle]
        return handle

    def close(self) -> None:
        pass


def step_main(argv: list[str]) -> None:
    """On the node: name the node and the step in the log, then become the member."""
    node = os.environ.get("SLURMD_NODENAME", "")
    # The address Slurm knows the node by, else its name.
    address = (show_node(node, "NodeAddr") or node) if node else "127.0.0.1"
    step = f"{os.environ.get('SLURM_JOB_ID', '?')}.{os.environ.get('SLURM_STEP_ID', '?')}"
    print(f"tether slurm step: node={node} address={address} step={step}", file=sys.stderr,
          flush=True)  # fmt: skip
    cmd = [sys.executable, *(part.replace(NODE_ADDRESS, address) for part in argv)]
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    if sys.argv[1:2] != ["step"]:
        sys.exit("usage: python -m tether.driver.slurm_engine step -m tether server|worker ...")
    step_main(sys.argv[2:])

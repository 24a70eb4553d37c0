"""A Slurm cluster of several nodes on this machine, one loopback address per node (DESIGN §12).

For the tests of `tether launch --engine slurm`: Debian's `slurm-wlm` (`.ci/install-slurm`) runs
one `slurmctld` on 127.0.0.1 and one `slurmd -N nI` per node on 127.0.0.2, 127.0.0.3, ..., each
a child of this process in its own process group, with a `munged` of their own (its socket, key
and state in the cluster's folder) for authentication. Every file the daemons use is in that
folder; nothing under /etc is touched. The nodes declare more CPUs than the machine has
(`config_overrides`), so several steps run on a node at once, as on a real node.

`kill_node(name)` is a node's loss: its slurmd, the step daemons of its steps and everything
they started are SIGKILLed at once; with `SlurmdTimeout=2` the controller declares the node DOWN
a few seconds later, and the `srun` of each step that ran there exits non-zero.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from tether.retry import PollTimeout, poll_until

DAEMONS = ("slurmctld", "slurmd", "munged", "srun", "salloc", "scontrol", "sinfo", "squeue")
NODE_CPUS = 8
START_TIMEOUT_S = 60.0


def available() -> str | None:
    """None when a loopback Slurm can run here, else why not (a skip reason)."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing; run .ci/install-slurm)"
    if not Path("/etc/munge/munge.key").exists() and shutil.which("mungekey") is None:
        return "munge has no key and no mungekey to make one"
    if os.geteuid() != 0:
        return "a loopback Slurm runs its daemons as root (SlurmdUser=root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_address(index: int) -> str:
    """The loopback address of node `index` (0-based): 127.0.0.2, 127.0.0.3, ..."""
    return f"127.0.0.{index + 2}"


class LoopbackSlurm:
    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        self.dir = workdir
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.conf = workdir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    # -- start ---------------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / f"{name}.out", "ab")  # noqa: SIM115 (the daemon holds it)
        with log:
            self.procs[name] = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                start_new_session=True,
            )  # fmt: skip

    def _start(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "munge"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        key = d / "munge" / "munge.key"
        if Path("/etc/munge/munge.key").exists():
            shutil.copyfile("/etc/munge/munge.key", key)
        else:
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        key.chmod(0o600)
        sock = d / "munge" / "munge.sock"
        self._spawn(
            "munged",
            ["munged", "-f", "-F", f"--socket={sock}", f"--key-file={key}",
             f"--pid-file={d / 'munge' / 'munged.pid'}", f"--log-file={d / 'munge' / 'munged.log'}",
             f"--seed-file={d / 'munge' / 'munge.seed'}"],
        )  # fmt: skip
        poll_until(sock.exists, START_TIMEOUT_S, "munged's socket", interval_s=0.05)
        self.conf.write_text(self._config(sock))
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for name in self.node_names:
            (d / "spool" / name).mkdir(exist_ok=True)
            self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
        self.wait_idle(self.node_names)

    def _config(self, munge_socket: Path) -> str:
        d, host = self.dir, socket.gethostname()
        nodes = "\n".join(
            f"NodeName={name} NodeAddr={node_address(i)} NodeHostname={host} "
            f"Port={_free_port()} CPUs={NODE_CPUS} RealMemory=2000"
            for i, name in enumerate(self.node_names)
        )
        return f"""\
ClusterName=tether-loopback
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool"}/%n
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "spool"}/slurmd-%n.pid
SlurmctldLogFile={d / "slurmctld.log"}
SlurmdLogFile={d / "spool"}/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdTimeout=2
InactiveLimit=0
KillWait=2
MessageTimeout=3
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{nodes}
PartitionName=main Nodes={",".join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
"""

    # -- queries -------------------------------------------------------------------------------

    def run(self, *cmd: str, timeout_s: float = 30.0) -> str:
        """A Slurm client command against this cluster; its stdout."""
        return subprocess.run(
            cmd, capture_output=True, text=True, env=self.env, timeout=timeout_s, check=True
        ).stdout

    def node_state(self, name: str) -> str:
        out = self.run("scontrol", "show", "node", name)
        match = re.search(r"\bState=(\S+)", out)
        return match.group(1) if match else ""

    def wait_idle(self, names: list[str], timeout_s: float = START_TIMEOUT_S) -> None:
        def idle() -> bool:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}: see {self.dir}")
            try:
                return all(self.node_state(n).startswith("IDLE") for n in names)
            except subprocess.SubprocessError:
                return False  # the controller is not answering yet

        try:
            poll_until(idle, timeout_s, f"Slurm nodes {', '.join(names)} idle", interval_s=0.2)
        except PollTimeout as e:
            raise RuntimeError(f"{e}; logs in {self.dir}") from None

    def steps_on(self, name: str) -> list[str]:
        """The ids (JOB.STEP) of the job steps running on node `name`."""
        out = self.run("squeue", "--steps", "--noheader", "--format=%i %N")
        return [line.split()[0] for line in out.splitlines() if line.split()[1:] == [name]]

    # -- faults --------------------------------------------------------------------------------

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL node `name`'s slurmd and every process of its steps; returns their pids."""
        steps = set(self.steps_on(name))
        victims = [self.procs[f"slurmd-{name}"].pid]
        for pid in _pids():
            if _step_of(pid) in steps or _environ(pid).get("SLURMD_NODENAME") == name:
                victims.append(pid)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs[f"slurmd-{name}"].wait()
        return victims

    # -- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Kill and reap every daemon this cluster started, and the step processes left."""
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            proc.wait(timeout=30)
        # Step daemons detach from slurmd; those of this cluster name its spool in their env.
        for pid in _pids():
            if _environ(pid).get("SLURM_CONF") == str(self.conf):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        with contextlib.suppress(PollTimeout):
            poll_until(
                lambda: not any(_environ(p).get("SLURM_CONF") == str(self.conf) for p in _pids()),
                10, "the step processes to end", interval_s=0.05,
            )  # fmt: skip
        self.procs.clear()

    def __enter__(self) -> LoopbackSlurm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _step_of(pid: int) -> str:
    """JOB.STEP of a `slurmstepd: [JOB.STEP]` process, else ""."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
    match = re.match(r"slurmstepd: \[(\d+\.\d+)\]", cmdline)
    return match.group(1) if match else ""

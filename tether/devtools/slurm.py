"""A real multi-node Slurm cluster on this machine's loopback addresses, for tests.

`LoopbackSlurm(workdir, nodes=3)` runs Debian's `slurm-wlm` (`.ci/install-slurm`): one
`slurmctld` on 127.0.0.1 and one `slurmd -N nI` per node on 127.0.0.2, 127.0.0.3, ..., each a
child of this process in its own process group, in the foreground (`-D`), as root, with a
`munged` of their own (key, socket and seed in `workdir/munge`) for authentication. Every file
they use is under `workdir` (`etc/slurm.conf`, `state/`, `spool/nI/`, `log/`); nothing under
/etc is read or written. Processes are tracked with `ProctrackType=proctrack/linuxproc` and
`TaskPlugin=task/none`: no cgroups, no systemd. Run client commands with `env=cluster.env`.

Facts about Slurm 22.05 (Debian 12) that an engine starting job steps needs, each checked on
this cluster (three nodes of two CPUs, `salloc --nodes=3 [--exclusive] [--no-kill]`):

- ONE task on ONE node as its own step, never waiting for CPUs held by other steps:
  `srun --nodes=1 --ntasks=1 --overlap [--nodelist=NODE | --exclude=DEAD,...] CMD`.
  `--overlap` shares all of the allocation's resources (CPUs, memory, GRES) with every other
  step, so eight such steps run at once on three 2-CPU nodes. Without it, a step takes every
  CPU of the allocation on its node (`--exact`/`--cpus-per-task=1` take one) and any step
  beyond that prints "step creation temporarily disabled, retrying (Requested nodes are busy)"
  and waits. No `--mem` is needed (memory is overlapped too, and this cluster does not count
  it). Declaring more CPUs than the machine has (`cpus_per_node=8`) also works
  (`SlurmdParameters=config_overrides`), but only `--overlap` also holds on a real cluster.
- Placement: without `--nodelist`, overlapping steps go one per node while a node of the
  allocation has no step, then all pile onto the first node; pin each step with
  `--nodelist=NODE` for an even spread.
- A lost node (`kill_node`: slurmd, its `slurmstepd`s and their tasks stopped, then SIGKILLed,
  as at a power cut): the `srun` of a step there ends when the controller declares the node
  DOWN, after printing `srun: error: Node failure on NODE`, and it EXITS 0 (22.05 marks the
  lost node's tasks ended with no exit status). Tell a lost step by that line or by the node's
  state (`scontrol show node NODE`: `State=DOWN...`), not by the exit code. (A node lost while
  srun is still launching the task gives a non-zero exit instead, e.g. 141, with "Task launch
  ... failed".) Marked DOWN at once (`kill_node(mark_down=True)`, as an admin would), srun
  ends within 0.1 s. Left to the controller's pings (`mark_down=False`), DOWN comes after
  18-20 s with `slurmd_timeout_s=10` and `MessageTimeout=5` (the defaults here), 10-15 s with
  `slurmd_timeout_s=2`, 5-9 s with 1-2 s and `MessageTimeout=2`, and minutes with Slurm's own
  defaults (300 s, 10 s). Short timeouts risk a node of a busy machine declared DOWN falsely.
- After the loss, the job goes on without the node when it was allocated with
  `salloc/sbatch --no-kill`; without `--no-kill` the whole job is ended ("Job allocation N has
  been revoked"). `srun ... --exclude=NODE` then starts a new step on another node within
  0.1 s (so does a step without `--exclude`: the job no longer holds the node), and
  `--nodelist=NODE` fails at once, exit 1, "Requested node configuration is not available".
- `salloc CMD` runs CMD in a process group of its own: killing salloc's group, or cancelling
  the job, leaves CMD running (still 30 s later). Kill CMD's group too; `stop()` kills every
  job process left.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tether.devtools.ports import free_ports
from tether.retry import PollTimeout, poll_until

CLIENTS = ("sinfo", "scontrol", "squeue", "srun", "salloc", "sbatch", "scancel")
DAEMONS = ("slurmctld", "slurmd", "slurmstepd", "munged")
# Put in each slurmd's environment, which its slurmstepd processes inherit: how a step daemon
# is told apart from other clusters' and mapped to its node.
CLUSTER_VAR = "TETHER_LOOPBACK_SLURM"
NODE_VAR = "TETHER_LOOPBACK_SLURM_NODE"
# A node's address: 127.0.0.2 for the first; the controller is on 127.0.0.1.
CONTROLLER_ADDRESS = "127.0.0.1"
# The variables of a job this process may itself run in, which would point clients at it.
_SLURM_PREFIXES = ("SLURM_", "SALLOC_", "SBATCH_", "SRUN_", "SQUEUE_", "SINFO_", "SCONTROL_")


@functools.cache
def available() -> str | None:
    """None when a loopback Slurm can run here, else a one-sentence reason to skip."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): run .ci/install-slurm"
    if os.geteuid() != 0:
        return "a loopback Slurm runs its daemons as root (SlurmdUser=root), and this is not root"
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
    except OSError as e:
        return f"no loopback alias 127.0.0.2 to give a node its own address ({e})"
    for name in ("slurmd", "slurmctld"):
        try:
            subprocess.run([name, "-V"], capture_output=True, check=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            return f"{name} does not run here ({e})"
    return None


def version() -> str:
    """The installed Slurm's version, e.g. '22.05.8' (clients need a config even for -V)."""
    out = subprocess.run(["slurmd", "-V"], capture_output=True, text=True, check=True).stdout
    return out.split()[-1]


def node_address(index: int) -> str:
    """The loopback address of node `index` (0-based): 127.0.0.2, 127.0.0.3, ..."""
    return f"127.0.0.{index + 2}"


class LoopbackSlurm:
    """A controller and `nodes` slurmd daemons on loopback; a context manager.

    `start()` (or `with`) writes the configuration, starts the daemons and returns once every
    node is idle; `stop()` kills and reaps all of it, also after a failed start.
    """

    def __init__(
        self,
        workdir: Path,
        nodes: int = 3,
        cpus_per_node: int = 2,
        *,
        slurmd_timeout_s: int = 10,
        message_timeout_s: int = 5,
        start_timeout_s: float = 120.0,
    ) -> None:
        if not 1 <= nodes <= 250:
            raise ValueError(f"nodes must be in 1..250, not {nodes}")
        self.workdir = workdir.resolve()
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.addresses = {name: node_address(i) for i, name in enumerate(self.node_names)}
        self.cpus_per_node = cpus_per_node
        self.slurmd_timeout_s = slurmd_timeout_s
        self.message_timeout_s = message_timeout_s
        self.start_timeout_s = start_timeout_s
        self.conf = self.workdir / "etc" / "slurm.conf"
        self.logs = self.workdir / "log"
        # What a client (sbatch, salloc, srun, squeue, scontrol) needs: this cluster's config
        # and none of the Slurm variables of a job this process may itself be running in.
        self.env: dict[str, str] = {
            k: v for k, v in os.environ.items() if not k.startswith(_SLURM_PREFIXES)
        }
        self.env["SLURM_CONF"] = str(self.conf)
        self._daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.start_s: float | None = None

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> LoopbackSlurm:
        """Start munged, slurmctld and the slurmds; return once all nodes are idle."""
        if self._daemons:
            raise RuntimeError("this cluster is already running")
        t0 = time.monotonic()
        try:
            for sub in ("etc", "state", "log", "munge", *(f"spool/{n}" for n in self.node_names)):
                (self.workdir / sub).mkdir(parents=True, exist_ok=True)
            (self.workdir / "munge").chmod(0o700)
            socket_path = self._start_munged()
            ports = free_ports(1 + len(self.node_names), host="")
            self.conf.write_text(self._config(socket_path, ports[0], list(ports[1:])))
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            for name in self.node_names:
                self._start_slurmd(name)
            self.wait_nodes(self.node_names, "IDLE")
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - t0
        return self

    def _start_munged(self) -> Path:
        d = self.workdir / "munge"
        key = d / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))  # a munge key is random bytes; mungekey makes 1024
        sock = d / "munge.sock"
        self._spawn(
            "munged",
            ["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
             f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munged.seed'}"],
        )  # fmt: skip
        self._poll(sock.exists, "munged's socket")
        return sock

    def _start_slurmd(self, name: str) -> None:
        env = {**self.env, CLUSTER_VAR: str(self.workdir), NODE_VAR: name}
        cmd = ["slurmd", "-D", "-N", name, "-f", str(self.conf)]
        self._spawn(f"slurmd-{name}", cmd, env)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.logs / f"{name}.out", "ab") as out:
            self._daemons[name] = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env or self.env, cwd=self.workdir, process_group=0,
            )  # fmt: skip

    def _config(self, munge_socket: Path, controller_port: int, node_ports: list[int]) -> str:
        d, host = self.workdir, socket.gethostname()
        nodes = "\n".join(
            f"NodeName={name} NodeAddr={self.addresses[name]} NodeHostname={host} Port={port} "
            f"CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN"
            for name, port in zip(self.node_names, node_ports, strict=True)
        )
        return f"""\
ClusterName=loopback
SlurmctldHost={host}({CONTROLLER_ADDRESS})
SlurmctldPort={controller_port}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool"}/%n
SlurmctldPidFile={d / "state" / "slurmctld.pid"}
SlurmdPidFile={d / "spool"}/%n/slurmd.pid
SlurmctldLogFile={self.logs / "slurmctld.log"}
SlurmdLogFile={self.logs}/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
PropagateResourceLimits=NONE
ReturnToService=2
SlurmdTimeout={self.slurmd_timeout_s}
MessageTimeout={self.message_timeout_s}
InactiveLimit=0
KillWait=2
{nodes}
PartitionName=main Nodes={",".join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
"""

    # -- queries -------------------------------------------------------------------------------

    def run(self, *cmd: str, timeout_s: float = 60.0) -> str:
        """Run a Slurm client command against this cluster; its stdout (raises on failure)."""
        return subprocess.run(
            cmd, capture_output=True, text=True, env=self.env, timeout=timeout_s, check=True
        ).stdout

    def node_states(self) -> dict[str, str]:
        """Each node's state as `scontrol` shows it, e.g. 'IDLE', 'MIXED', 'DOWN+NOT_RESPONDING'."""
        out = self.run("scontrol", "show", "node", "--oneliner")
        states = {}
        for line in out.splitlines():
            name, state = re.search(r"NodeName=(\S+)", line), re.search(r"\bState=(\S+)", line)
            if name and state:
                states[name.group(1)] = state.group(1)
        return states

    def wait_nodes(self, names: Iterable[str], state: str, timeout_s: float | None = None) -> None:
        """Wait until each of `names` is in `state` (e.g. 'IDLE', 'DOWN'), daemons all alive."""
        wanted = list(names)

        def reached() -> bool:
            try:
                states = self.node_states()
            except subprocess.SubprocessError:
                return False  # the controller is not answering yet
            return all(state in states.get(n, "").split("+") for n in wanted)

        self._poll(reached, f"nodes {','.join(wanted)} {state}", timeout_s)

    def processes(self) -> set[tuple[int, int]]:
        """(pid, start time) of every live process of this cluster: daemons and jobs' processes."""
        table = _proc_table()
        pids = _descendants(table, {p.pid for p in self._daemons.values() if p.pid in table})
        pids |= self._job_pids(table, None)
        return {(pid, table[pid].start) for pid in pids if table[pid].state not in "ZX"}

    # -- faults --------------------------------------------------------------------------------

    def kill_node(self, name: str, *, mark_down: bool = True, wait_down: bool = True) -> int:
        """Lose node `name`: SIGKILL its slurmd, its step daemons and all their processes.

        Everything is stopped (SIGSTOP) before anything is killed, so no step reports an exit
        first: to the controller the node just falls silent, as at a power cut. `mark_down`
        then sets it DOWN at once (`scontrol update ... state=DOWN`, as an admin would) rather
        than after `SlurmdTimeout`; `wait_down` returns only once the controller shows it DOWN.
        Returns the number of processes killed.
        """
        daemon = self._daemons.pop(f"slurmd-{name}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon.pid, signal.SIGSTOP)
        killed = self._kill(lambda table: self._job_pids(table, name), extra=[daemon.pid])
        daemon.wait(timeout=30)
        if mark_down:
            self.run("scontrol", "update", f"nodename={name}", "state=DOWN", "reason=kill_node")
        if wait_down:
            self.wait_nodes([name], "DOWN")
        return killed

    def restart_node(self, name: str) -> None:
        """Start a lost node's slurmd again; return once the controller shows it idle.

        `ReturnToService=2` puts a DOWN node back in service when its slurmd registers.
        """
        if f"slurmd-{name}" in self._daemons:
            raise RuntimeError(f"node {name} is running")
        self._start_slurmd(name)
        self.wait_nodes([name], "IDLE")

    def kill_jobs(self) -> int:
        """SIGKILL every process of this cluster's jobs (step daemons, tasks, the commands of
        `salloc`, which outlive a killed salloc); the daemons stay. Returns how many."""
        return self._kill(lambda table: self._job_pids(table, None), extra=[])

    # -- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Kill and reap every process of this cluster; remove its sockets, keys and state.

        That is the daemons and every process of this cluster's jobs (step daemons, tasks and
        what they left running, commands of `salloc`), not the clients (`srun`, `salloc`)
        themselves. Safe to call more than once and after a failed start; the logs stay in
        `workdir/log`.
        """
        daemons, self._daemons = self._daemons, {}
        for proc in daemons.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGSTOP)
        self.kill_jobs()
        for proc in daemons.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in daemons.values():
            proc.wait(timeout=60)
        for sub in ("munge", "state", "spool"):
            shutil.rmtree(self.workdir / sub, ignore_errors=True)

    def __enter__(self) -> LoopbackSlurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------------

    def _job_pids(self, table: dict[int, _Stat], node: str | None) -> set[int]:
        """Pids of the processes of this cluster's jobs on `node`, and of all they started.

        On a node: its step daemons, and tasks (or what they left behind), whose job
        environment names the node. With `node` None, also the job processes off the nodes:
        the commands `salloc` started, which name the job but no node, and which `salloc`
        leaves running in their own process group when it is killed or its job is cancelled.
        """
        conf, me = str(self.conf), _ancestors(table, os.getpid())
        roots = set()
        for pid in table:
            if pid in me:
                continue
            env = _environ(pid)
            if env.get(CLUSTER_VAR) == str(self.workdir) and "slurmstepd" in table[pid].comm:
                if node is None or env.get(NODE_VAR) == node:
                    roots.add(pid)
            elif env.get("SLURM_CONF") == conf:
                if "SLURMD_NODENAME" in env:
                    if node is None or env["SLURMD_NODENAME"] == node:
                        roots.add(pid)
                elif node is None and "SLURM_JOB_ID" in env:
                    roots.add(pid)
        return _descendants(table, roots) - me

    def _kill(self, find: Callable[[dict[int, _Stat]], set[int]], extra: list[int]) -> int:
        """SIGSTOP what `find` returns until nothing new turns up, then SIGKILL all of it.

        Waits until every killed process is gone (or a zombie of a parent other than this one).
        """
        victims: dict[int, int] = {}
        table = _proc_table()
        for pid in extra:
            if pid in table:
                victims[pid] = table[pid].start
        while True:
            table = _proc_table()
            new = {pid for pid in find(table) | _descendants(table, set(victims)) if pid in table}
            new -= set(victims)
            if not new:
                break
            for pid in new:
                victims[pid] = table[pid].start
                _signal(pid, table[pid].start, signal.SIGSTOP)
        for pid, start in victims.items():
            _signal(pid, start, signal.SIGKILL)

        def gone() -> bool:
            table = _proc_table()
            return not any(
                pid in table and table[pid].start == start and table[pid].state not in "ZX"
                for pid, start in victims.items()
            )

        self._poll(gone, "the killed processes to end", check_daemons=False)
        return len(victims)

    def _check_daemons(self) -> None:
        for name, proc in self._daemons.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {proc.returncode}:\n{self._log_tail(name)}"
                )

    def _log_tail(self, name: str, lines: int = 20) -> str:
        text = ""
        for path in (self.logs / f"{name}.out", self.logs / f"{name}.log"):
            with contextlib.suppress(OSError):
                text += "".join(path.read_text(errors="replace").splitlines(True)[-lines:])
        return text or f"(no log in {self.logs})"

    def _poll(
        self,
        predicate: Callable[[], object],
        what: str,
        timeout_s: float | None = None,
        check_daemons: bool = True,
    ) -> None:
        """Wait for `predicate`; fail at once, with its log, if a daemon has exited."""

        def check() -> object:
            if check_daemons:
                self._check_daemons()
            return predicate()

        try:
            poll_until(check, timeout_s or self.start_timeout_s, what, interval_s=0.05)
        except PollTimeout as e:
            raise RuntimeError(f"{e}; logs in {self.logs}") from None


class _Stat:
    """The fields of /proc/PID/stat this module uses."""

    __slots__ = ("comm", "state", "ppid", "start")

    def __init__(self, comm: str, state: str, ppid: int, start: int) -> None:
        self.comm, self.state, self.ppid, self.start = comm, state, ppid, start


def _stat(pid: int) -> _Stat | None:
    """/proc/PID/stat, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    open_, close = raw.index("("), raw.rindex(")")
    rest = raw[close + 2 :].split()
    return _Stat(raw[open_ + 1 : close], rest[0], int(rest[1]), int(rest[19]))


def _proc_table() -> dict[int, _Stat]:
    """Every process now: pid -> its stat."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            table[int(entry)] = st
    return table


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _descendants(table: dict[int, _Stat], roots: set[int]) -> set[int]:
    found = set(roots)
    while True:
        more = {pid for pid, st in table.items() if st.ppid in found and pid not in found}
        if not more:
            return found
        found |= more


def _ancestors(table: dict[int, _Stat], pid: int) -> set[int]:
    found = set()
    while pid in table and pid not in found:
        found.add(pid)
        pid = table[pid].ppid
    return found


def _signal(pid: int, start: int, sig: signal.Signals) -> None:
    """Send `sig` to `pid` if it is still the process that started at `start`."""
    st = _stat(pid)
    if st is not None and st.start == start:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

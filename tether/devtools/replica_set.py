"""`tether mongo up|down`: a local three-member MongoDB replica set for development (DESIGN §6).

    tether mongo up [--dir DIR] [--ports P1,P2,P3] [--json]
    tether mongo down [--dir DIR] [--json]

``up`` starts three ``mongod --replSet rs0`` processes on 127.0.0.1 as detached background
processes (each in its own session, logs in DIR, data in DIR/PORT), records their pids in
DIR/pids.json, initiates the set, waits for a primary and prints the store URI, e.g.
``mongodb://127.0.0.1:27017,127.0.0.1:27018,127.0.0.1:27019/?replicaSet=rs0``, for
``tether launch --store URI``. ``down`` stops exactly the processes recorded in DIR/pids.json
(checking each is still that ``mongod`` first); the data stays, so ``up`` on the same DIR and
ports brings the same set back. The test suite starts its replica set with the same code
(:func:`start_replica_set`).

Needs ``mongod`` (MongoDB Community Server) on PATH; without it both commands say so in one
sentence and exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.devtools.ports import free_ports
from tether.retry import PollTimeout, poll_until

DEFAULT_DIR = Path("tether-mongo")
PIDS_FILE = "pids.json"
NO_MONGOD = (
    "mongod is not on PATH: install MongoDB Community Server "
    "(https://www.mongodb.com/try/download/community) or pass --store with the mongodb:// URI "
    "of an existing replica set"
)


class MongodMissing(RuntimeError):
    def __init__(self) -> None:
        super().__init__(NO_MONGOD)


class ReplicaSetError(RuntimeError):
    """The members did not start, or no primary was elected before the deadline."""


@dataclass
class ReplicaSet:
    uri: str
    dir: Path
    ports: tuple[int, ...]
    replset: str
    pids: list[int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    def stop(self, timeout_s: float = 30.0) -> list[int]:
        """Stop and reap the members this process started (SIGTERM, then SIGKILL)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()  # mongod shuts down cleanly on SIGTERM
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        (self.dir / PIDS_FILE).unlink(missing_ok=True)
        return [p.pid for p in self.procs]


def find_mongod() -> str:
    path = shutil.which("mongod")
    if path is None:
        raise MongodMissing()
    return path


def replica_set_uri(ports: Sequence[int], replset: str) -> str:
    hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
    return f"mongodb://{hosts}/?replicaSet={replset}"


def start_replica_set(
    dbpath: Path,
    ports: Sequence[int] | None = None,
    replset: str = "rs0",
    *,
    timeout_s: float = 60.0,
    cache_gb: float = 0.25,
) -> ReplicaSet:
    """Start a three-member replica set on 127.0.0.1, initiate it and wait for a primary.

    Raises :class:`MongodMissing` without ``mongod`` on PATH and :class:`ReplicaSetError` if a
    member exits or no primary is elected within ``timeout_s`` (its log is named; the members
    started are stopped again).
    """
    mongod = find_mongod()
    dbpath = dbpath.expanduser().resolve()
    dbpath.mkdir(parents=True, exist_ok=True)
    ports = tuple(ports) if ports else free_ports(3)
    if len(ports) != 3 or len(set(ports)) != 3:
        raise ValueError(f"a replica set here has three members on distinct ports; got {ports}")
    uri = replica_set_uri(ports, replset)
    rs = ReplicaSet(uri, dbpath, ports, replset, [])
    try:
        for port in ports:
            data = dbpath / str(port)
            data.mkdir(exist_ok=True)
            options = {
                "--replSet": replset,
                "--bind_ip": "127.0.0.1",
                "--port": str(port),
                "--dbpath": str(data),
                "--logpath": str(dbpath / f"mongod-{port}.log"),
                "--oplogSize": "128",
                "--wiredTigerCacheSizeGB": str(cache_gb),
            }
            argv = [mongod, *(x for item in options.items() for x in item), "--logappend"]
            with open(dbpath / f"mongod-{port}.out", "ab") as out:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # detached: its own session and process group
                )
            rs.procs.append(proc)
            rs.pids.append(proc.pid)
        _write_pids(rs)
        deadline = time.monotonic() + timeout_s
        for port, proc in zip(ports, rs.procs, strict=True):
            _wait_accepting(port, proc, dbpath, deadline)
        _initiate(rs)
        _wait_for_primary(rs, deadline)
    except BaseException:
        rs.stop(10.0)
        raise
    return rs


def _write_pids(rs: ReplicaSet) -> None:
    record = {"uri": rs.uri, "pids": rs.pids, "ports": list(rs.ports), "replset": rs.replset}
    tmp = rs.dir / f"{PIDS_FILE}.tmp"
    tmp.write_text(json.dumps(record | {"dir": str(rs.dir)}, indent=1))
    tmp.replace(rs.dir / PIDS_FILE)


def _direct(port: int, timeout_ms: int = 1000) -> Any:
    from pymongo import MongoClient

    return MongoClient(
        f"mongodb://127.0.0.1:{port}/?directConnection=true",
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
    )


def _log_tail(dbpath: Path, port: int) -> str:
    lines: list[str] = []
    for name in (f"mongod-{port}.out", f"mongod-{port}.log"):
        try:
            lines += (dbpath / name).read_text(errors="replace").splitlines()[-5:]
        except OSError:
            pass
    return "\n".join(lines)


def _wait_accepting(
    port: int, proc: subprocess.Popen[bytes], dbpath: Path, deadline: float
) -> None:
    from pymongo.errors import PyMongoError

    client = _direct(port)

    def accepting() -> bool:
        if proc.poll() is not None:
            raise ReplicaSetError(
                f"mongod on port {port} exited with code {proc.returncode}; see "
                f"{dbpath / f'mongod-{port}.log'}:\n{_log_tail(dbpath, port)}"
            )
        try:
            client.admin.command("ping")
            return True
        except PyMongoError:
            return False

    try:
        poll_until(accepting, max(0.0, deadline - time.monotonic()), "a ping", interval_s=0.1)
    except PollTimeout:
        raise ReplicaSetError(f"mongod on port {port} did not accept connections in time") from None
    finally:
        client.close()


def _initiate(rs: ReplicaSet) -> None:
    from pymongo.errors import OperationFailure

    members = [{"_id": i, "host": f"127.0.0.1:{p}"} for i, p in enumerate(rs.ports)]
    client = _direct(rs.ports[0], 10_000)
    try:
        client.admin.command("replSetInitiate", {"_id": rs.replset, "members": members})
    except OperationFailure as e:
        if e.code != 23:  # AlreadyInitialized: the same DIR brought up again
            raise ReplicaSetError(f"replSetInitiate failed: {e}") from e
    finally:
        client.close()


def _wait_for_primary(rs: ReplicaSet, deadline: float) -> None:
    """Until one member is PRIMARY and the others SECONDARY (so w=majority writes succeed)."""
    from pymongo.errors import PyMongoError

    client = _direct(rs.ports[0])
    states: list[str] = []

    def ready() -> bool:
        nonlocal states
        try:
            status = client.admin.command("replSetGetStatus")
            states = sorted(m["stateStr"] for m in status["members"])
        except PyMongoError as e:
            states = [f"{type(e).__name__}: {e}"]
        return states == ["PRIMARY", "SECONDARY", "SECONDARY"]

    try:
        poll_until(ready, max(0.0, deadline - time.monotonic()), "a primary", interval_s=0.2)
    except PollTimeout:
        raise ReplicaSetError(
            f"replica set {rs.replset} had no primary and two secondaries in time (last seen: "
            f"{', '.join(states) or 'nothing'}); logs in {rs.dir}"
        ) from None
    finally:
        client.close()


def mongo_up(dbpath: Path, ports: tuple[int, int, int] | None, replset: str = "rs0") -> str:
    """Start a local replica set in ``dbpath`` and return its URI.

    If the set recorded there is still running, return its URI; if it was stopped, start it
    again on its recorded ports (its data and replica set config are kept per port).
    """
    dbpath = dbpath.expanduser().resolve()
    record = recorded(dbpath)
    if record is not None:
        if is_running(dbpath):
            return str(record["uri"])
        ports = ports or tuple(record["ports"])  # type: ignore[assignment]
    return start_replica_set(dbpath, ports, replset).uri


def is_running(dbpath: Path) -> bool:
    record = recorded(dbpath)
    pids = [] if record is None else record["pids"]
    return bool(pids) and all(_is_our_mongod(pid, dbpath) for pid in pids)


def mongo_down(dbpath: Path, timeout_s: float = 30.0) -> list[int]:
    """Stop exactly the mongod processes recorded in ``dbpath``/pids.json; return their pids."""
    record = recorded(dbpath)
    if record is None:
        raise FileNotFoundError(f"no replica set was started in {dbpath} (no {PIDS_FILE} there)")
    ours = [pid for pid in record["pids"] if _is_our_mongod(pid, dbpath)]
    for pid in ours:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for pid in ours:
        while _is_our_mongod(pid, dbpath) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _is_our_mongod(pid, dbpath):
            os.kill(pid, signal.SIGKILL)
    (dbpath / PIDS_FILE).unlink(missing_ok=True)
    return ours


def recorded(dbpath: Path) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads((dbpath / PIDS_FILE).read_text())
    except FileNotFoundError:
        return None
    return record


def _is_our_mongod(pid: int, dbpath: Path) -> bool:
    """Whether ``pid`` is a live (not zombie) mongod whose data is under ``dbpath``, so that a
    recycled pid is never signalled."""
    try:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                return False
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except FileNotFoundError:
            if Path("/proc/self").exists():
                return False  # Linux: the process is gone
            out = subprocess.run(
                ["ps", "-o", "stat=,command=", "-p", str(pid)], capture_output=True, text=True
            ).stdout.strip()
            if not out or out.startswith("Z"):
                return False
            args = out.split()[1:]
    except (OSError, IndexError):
        return False
    root = str(dbpath.expanduser().resolve())
    return (
        bool(args)
        and Path(args[0]).name == "mongod"
        and any(a == root or a.startswith(root + os.sep) for a in args)
    )

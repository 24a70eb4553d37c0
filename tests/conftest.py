"""Shared fixtures: in-process shards on port 0 and multi-process runs with cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from helpers import RUN, RunWatch
from tether import shm
from tether.config import OptimizerConfig
from tether.consistency import Consistency, Mode
from tether.server.host import ShardHost
from tether.server.main import add_services, create_server, pool_size
from tether.server.servicer import ShardServicer
from tether.server.state import ShardSpec, ShardState
from tether.transport import Security, TokenBook
from tether.worker.client import ShardClient

# The in-process shards check a run token like every shard does (DESIGN §13).
LIVE_TOKEN = "live-shard-token"


@dataclass
class LiveShard:
    state: ShardState
    servicer: ShardServicer
    address: str
    clients: list[ShardClient]
    security: Security

    def client(self, security: Security | None = None) -> ShardClient:
        c = ShardClient(
            self.address, RUN, security=security or self.security,
            chunk_bytes=self.state.spec.chunk_bytes,
        )  # fmt: skip
        self.clients.append(c)
        return c


@pytest.fixture
def live_shard() -> Iterator[Callable[..., LiveShard]]:
    servers = []
    shards: list[LiveShard] = []

    def start(
        mode: Mode = Mode.SSP,
        staleness: int = 0,
        workers: int = 2,
        n: int = 1000,
        wait_timeout_s: float = 10.0,
        chunk_bytes: int = 1 << 12,
    ) -> LiveShard:
        consistency = Consistency(mode, staleness if mode is Mode.SSP else 0)
        spec = ShardSpec(
            RUN, 0, 0, n, workers, consistency, OptimizerConfig("sgd", lr=0.1), chunk_bytes
        )
        state = ShardState(spec, np.linspace(-1, 1, n, dtype=np.float32))
        servicer = ShardServicer(ShardHost(state), wait_timeout_s=wait_timeout_s)
        security = Security(TokenBook.fixed(LIVE_TOKEN))
        server, port = create_server(
            "127.0.0.1:0", max_workers=pool_size(workers), security=security
        )
        add_services(server, servicer)
        server.start()
        servers.append(server)
        shard = LiveShard(state, servicer, f"127.0.0.1:{port}", [], security)
        shards.append(shard)
        return shard

    yield start
    for shard in shards:
        for c in shard.clients:
            c.close()
    for server in servers:
        server.stop(grace=0).wait()


@dataclass
class Proc:
    proc: subprocess.Popen[str]

    def finish(self, timeout_s: float = 170.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, out, err

    def json(self, timeout_s: float = 170.0) -> dict:
        rc, out, err = self.finish(timeout_s)
        assert rc == 0, f"exit {rc}\n{err[-3000:]}"
        return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def tether_cli(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Run `tether ...` in its own process group; teardown kills and reaps the whole group."""
    procs: list[subprocess.Popen[str]] = []
    segments_before = same_host_segments()

    def run(*args: str, env: dict[str, str] | None = None) -> Proc:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether", *args],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        procs.append(proc)
        return Proc(proc)

    yield run
    # Leak check: a command that ended by itself must have reaped every process it started
    # (they share its process group). Then kill whatever is left, e.g. of a failed test.
    leaked = {p.pid: processes_in_groups({p.pid}) for p in procs if p.poll() is not None}
    # ... and every same-host segment its workers made (DESIGN §2).
    if all(p.poll() is not None for p in procs):
        left = same_host_segments() - segments_before
        assert not left, f"same-host segments left in /dev/shm by finished commands: {left}"
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe:
                pipe.close()
    assert not any(leaked.values()), f"processes left behind by finished commands: {leaked}"


def same_host_segments() -> set[str]:
    return {p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}*")} if shm.SHM_DIR.is_dir() else set()


def processes_in_groups(groups: set[int]) -> list[int]:
    """PIDs of live (non-zombie) processes whose process group is in `groups` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, ...
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) in groups:
            found.append(int(entry.name))
    return found


@pytest.fixture
def watch(tmp_path):
    watches = []

    def make(run_dir: Path) -> RunWatch:
        w = RunWatch(run_dir)
        watches.append(w)
        return w

    yield make
    for w in watches:
        w.close()

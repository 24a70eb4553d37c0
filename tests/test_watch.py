"""`tether status --watch` in a terminal, against a real run, until the run ends (DESIGN §9, §13).

The watch runs in a pseudo-terminal, as a user at a terminal runs it: rich draws its live table
there, and the test reads everything it wrote until it exits. The run is a real `tether launch`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from helpers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def read_until_exit(master: int, proc: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    """Everything the process writes to the terminal, until it exits and the terminal is done."""
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError as e:  # EIO: every process holding the terminal closed it
                if e.errno != errno.EIO:
                    raise
                chunk = b""
            if chunk:
                out += chunk
                continue
            break
        if proc.poll() is not None:
            break
    return bytes(out)


def test_watch_draws_the_run_in_a_terminal_until_it_finishes(tether_cli, tmp_path, watch):
    run_dir = tmp_path / "run"
    launch = tether_cli("launch", "--steps", "300", "--json", "--run-dir", str(run_dir))
    w = watch(run_dir)
    wait_until(lambda: bool(w.members()), 120, "the launcher to create the run")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "status", "--watch", "--run-dir", str(run_dir)],
        stdin=slave, stdout=slave, stderr=slave, cwd=tmp_path, start_new_session=True,
        env={**env, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    os.close(slave)
    try:
        raw = read_until_exit(master, proc, timeout_s=300)
        rc = proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        os.close(master)
    summary = launch.json()
    text = ANSI.sub("", raw.decode("utf-8", "replace"))
    assert rc == 0, text[-3000:]
    assert b"\x1b[" in raw  # drawn as a live table, in place
    # The last frame: every member, each worker with its loss, and the finished marker.
    last = text[text.rindex(f"run {summary['run_id']}: bsp") :]
    assert "step 300/300 (100%)" in last and "; finished" in last
    for name in ("shard 0", "shard 1", "worker 0", "worker 1", "launcher 0"):
        assert name in last
    for wid in (0, 1):
        assert re.search(rf"worker {wid}\s.*\s300\s.*\s\d+\.\d{{4}}\s", last), last
    assert f"run {summary['run_id']} finished: final loss " in last

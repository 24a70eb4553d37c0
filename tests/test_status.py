"""`tether status` reads what members report about themselves (DESIGN §9, §13)."""

from __future__ import annotations

import os
import socket

from tether.cli.status import run_status
from tether.member.heartbeat import peak_rss_bytes
from tether.store import open_store


def test_status_shows_each_member_s_peak_memory(tmp_path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'tether.db'}")
    store.create_run("r", {"mode": "bsp", "shards": 1, "workers": 1, "steps": 1})
    epoch = store.register("r", "server", 0, address="127.0.0.1:1", pid=os.getpid(),
                           host=socket.gethostname())  # fmt: skip
    store.register("r", "worker", 0, address="", pid=os.getpid(), host=socket.gethostname())
    store.heartbeat("r", "server", 0, epoch, {"peak_rss_bytes": 300 * 2**20})
    store.close()
    status = run_status(run_dir=tmp_path, store_uri=None, run_id="r")
    by_role = {m["role"]: m for m in status["members"]}
    assert by_role["server"]["peak_rss_mb"] == 300.0
    assert by_role["worker"]["peak_rss_mb"] is None  # not reported yet
    assert peak_rss_bytes() > 10 * 2**20  # this process: Linux reports ru_maxrss in KiB


def test_status_shows_each_member_s_metrics_url(tmp_path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'tether.db'}")
    store.create_run("r", {"mode": "bsp", "shards": 1, "workers": 1, "steps": 1})
    host = socket.gethostname()
    epoch = store.register("r", "server", 0, address="127.0.0.1:1", pid=os.getpid(), host=host)
    store.register("r", "worker", 0, address="", pid=os.getpid(), host=host)
    url = "http://127.0.0.1:9464/metrics"
    store.heartbeat("r", "server", 0, epoch, {"metrics_url": url})
    store.close()
    status = run_status(run_dir=tmp_path, store_uri=None, run_id="r")
    by_role = {m["role"]: m for m in status["members"]}
    assert by_role["server"]["metrics_url"] == url
    assert by_role["worker"]["metrics_url"] is None  # serves none (--metrics-port not given)

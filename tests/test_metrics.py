"""Prometheus metrics (DESIGN §13): each role's scrape passes `promtool check metrics`, and a real
Prometheus server on loopback scrapes every member of a run and answers every dashboard query.

promtool and prometheus are Debian's `prometheus` package (`bash .ci/install-prometheus`); where
they are not installed, the tests that need them skip and say so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import typing
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from helpers import REPO, RunWatch, wait_until
from tether.consistency import Mode
from tether.driver.liveness import CauseKind
from tether.driver.slurm_engine import SlurmSpawner
from tether.driver.spawner import MemberSpec, member_command
from tether.member.report import BeatReport, LauncherReport, WorkerReport
from tether.member.view import MemberView
from tether.metrics.buckets import (
    GAP_BUCKETS,
    MEMBER_ROLES,
    RESTART_CAUSES,
    Buckets,
    StepCounters,
    folded,
)
from tether.metrics.collect import (
    LauncherCollector,
    ShardCollector,
    WorkerCollector,
    histogram,
    listen_host,
    registry_of,
    serve_metrics,
)
from tether.roles import Role
from tether.server.main import _metrics_sample

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
_INSTALL = "(bash .ci/install-prometheus installs Debian's prometheus package)"
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool not on PATH {_INSTALL}")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason=f"prometheus not on PATH {_INSTALL}"
)
DASHBOARD = REPO / "deploy" / "grafana" / "tether.json"


def promtool_check(text: str) -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, of an exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- pure ---------------------------------------------------------------------------------------


def test_buckets_count_each_value_in_the_first_bound_at_or_above_it() -> None:
    b = Buckets((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        b.observe(v)
    assert b.counts == [2, 2, 1] and b.sum == pytest.approx(4.65)
    family = histogram(b, "x_seconds", "x")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.1": 2, "1.0": 4, "+Inf": 5}


def test_exact_counts_fold_into_the_gap_buckets() -> None:
    exact = [3, 0, 2, 0, 0, 1]  # three gaps of 0, two of 2, one of 5
    b = folded(exact)
    assert b.bounds == GAP_BUCKETS
    assert sum(b.counts) == 6 and b.sum == 2 * 2 + 5
    assert b.counts[GAP_BUCKETS.index(0)] == 3 and b.counts[GAP_BUCKETS.index(6)] == 1


def test_members_started_with_metrics_get_the_flag(tmp_path: Path) -> None:
    spec = MemberSpec("worker", 1, "sqlite:///x.db", "r", metrics_port=0)
    cmd = member_command(spec)
    assert cmd[cmd.index("--metrics-port") + 1] == "0"
    assert "--metrics-port" not in member_command(MemberSpec("server", 0, "sqlite:///x.db", "r"))
    # On Slurm too (the step's command is the member's, listening on the node's address).
    srun = SlurmSpawner(tmp_path, gpu_workers=False, nodes=["n1"]).srun_command(spec, "n1")
    assert srun[srun.index("--metrics-port") + 1] == "0"


def test_the_restart_causes_are_the_detector_s() -> None:
    assert RESTART_CAUSES == typing.get_args(CauseKind)
    assert set(MEMBER_ROLES) | {"launcher"} == set(typing.get_args(Role))


def test_the_url_is_a_stored_key_of_every_member_s_beat() -> None:
    url = "http://10.0.0.7:9464/metrics"
    info = BeatReport(0, 5, None, url).to_info()
    assert info == {"heartbeats_skipped": 0, "peak_rss_bytes": 5, "metrics_url": url}
    assert BeatReport.from_info(info).metrics_url == url
    assert BeatReport.from_info({}).metrics_url is None  # an older record, or metrics off


def test_listen_host() -> None:
    assert listen_host("127.0.0.1:0") == "127.0.0.1"
    assert listen_host("[::1]:7000") == "::1"
    assert listen_host("0.0.0.0:7000") == "0.0.0.0"


# -- each role's scrape -------------------------------------------------------------------------


@pytest.fixture
def served() -> Iterator[Callable[..., str]]:
    """Serve collectors on 127.0.0.1, port 0; returns the scrape text over HTTP."""
    servers = []

    def serve(*collectors: Any) -> str:
        server = serve_metrics(registry_of(collectors), "127.0.0.1", 0)
        servers.append(server)
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=30) as reply:
            return reply.read().decode()

    yield serve
    for server in servers:
        server.close()


def _drive(shard: Any, workers: int, clocks: int) -> None:
    n = shard.state.spec.length
    clients = [shard.client() for _ in range(workers)]
    for clock in range(clocks):
        for w, client in enumerate(clients):
            _, pulled = client.pull(n, worker_id=w, clock=clock, wait_timeout_s=5.0)
            grad = np.full(n, 0.01, dtype=np.float32)
            client.push(grad, worker_id=w, clock=clock, seq=clock,
                        read_version=pulled.version, epoch=pulled.epoch)  # fmt: skip


def test_a_shard_scrape_counts_what_it_served(live_shard, served) -> None:
    shard = live_shard(Mode.SSP, staleness=1, workers=2, n=1000)
    _drive(shard, workers=2, clocks=3)
    sample = _metrics_sample([shard.servicer], [])
    assert sample is not None
    text = served(ShardCollector("r", 0, lambda: sample))
    got = samples(text)
    assert got[("tether_shard_pushes_total", ())] == 6
    assert got[("tether_shard_updates_applied_total", ())] == 6
    assert got[("tether_shard_pulls_total", ())] == 6
    assert got[("tether_shard_push_bytes_total", ())] == 6 * 4000
    assert got[("tether_shard_pull_bytes_total", ())] == 6 * 4000
    assert got[("tether_shard_push_duration_seconds_count", ())] == 6
    assert got[("tether_shard_clock_gap_count", ())] == 6
    assert got[("tether_shard_clock_gap_bucket", (("le", "1.0"),))] == 6  # within SSP(1)
    assert got[("tether_shard_serving", ())] == 1
    assert got[("tether_shard_epoch", ())] == shard.state.epoch
    assert got[("tether_member_info", (("member_id", "0"), ("role", "server"), ("run", "r")))]
    if PROMTOOL is not None:
        promtool_check(text)


def test_a_taken_port_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            serve_metrics(registry_of([]), "127.0.0.1", port)


def test_a_shard_still_loading_reports_that_it_does_not_serve(served) -> None:
    got = samples(served(ShardCollector("r", 1, lambda: None)))
    assert got[("tether_shard_serving", ())] == 0


def _worker_and_launcher_collectors() -> tuple[WorkerCollector, LauncherCollector]:
    steps = StepCounters()
    for i in range(5):
        steps.step(0.02 * (i + 1), 0.001, 0.002, 32)
    steps.task = {"accuracy": np.float32(0.5), "grad_norm": 1.5}
    worker = WorkerCollector(
        "r", 1, lambda: (WorkerReport(clock=5, loss=0.25, reconnects=1), steps)
    )
    recoveries = (
        {"role": "worker", "id": 1, "cause": "exited", "recovery_s": 1.2},
        {"role": "worker", "id": 0, "cause": "exited", "recovery_s": None},
        {"role": "server", "id": 0, "cause": "probe_failed", "recovery_s": 3.0},
    )
    report = LauncherReport(phase="train", restarts={"worker": 2, "server": 1},
                            recoveries=recoveries)  # fmt: skip
    launcher = LauncherCollector("r", lambda: (report, {"server": 2, "worker": 2}))
    return worker, launcher


def test_worker_and_driver_scrapes(served) -> None:
    worker, launcher = _worker_and_launcher_collectors()
    w = samples(served(worker))
    assert w[("tether_worker_steps_total", ())] == 5
    assert w[("tether_worker_step_duration_seconds_count", ())] == 5
    assert w[("tether_worker_loss", ())] == 0.25
    assert w[("tether_worker_task_metric", (("name", "accuracy"),))] == 0.5
    d = samples(served(launcher))
    assert d[("tether_run_restarts_total", (("cause", "exited"), ("role", "worker")))] == 2
    assert d[("tether_run_restarts_total", (("cause", "probe_failed"), ("role", "server")))] == 1
    assert d[("tether_run_restarts_total", (("cause", "node_lost"), ("role", "server")))] == 0
    assert d[("tether_run_recovery_seconds_count", ())] == 2
    assert d[("tether_run_members", (("role", "worker"),))] == 2


@needs_promtool
def test_every_role_passes_promtool(live_shard) -> None:
    shard = live_shard(Mode.ASP, workers=1, n=100)
    _drive(shard, workers=1, clocks=2)
    worker, launcher = _worker_and_launcher_collectors()
    shard_collector = ShardCollector("r", 0, lambda: _metrics_sample([shard.servicer], []))
    for collector in (shard_collector, worker, launcher):
        promtool_check(generate_latest(registry_of([collector])).decode())


# -- a real Prometheus server scraping a run ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """Debian's prometheus on loopback, scraping the given targets every 0.5 s."""

    def __init__(self, folder: Path, targets: list[str]) -> None:
        assert PROMETHEUS is not None
        self.port = _free_port()
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\n"
            "scrape_configs:\n  - job_name: tether\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.log = folder / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 f"--storage.tsdb.path={folder / 'data'}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.load(reply)
        except OSError:
            return []  # not up yet
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def values(self, expr: str) -> list[float]:
        return [float(r["value"][1]) for r in self.query(expr)]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_the_dashboard_is_a_grafana_model_with_a_prometheus_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
    exprs = " ".join(dashboard_queries())
    needed = ["tether_run_restarts_total", "tether_worker_loss", "tether_shard_serving",
              "tether_shard_clock_gap_bucket", "tether_shard_replication_lag_seconds"]  # fmt: skip
    assert [name for name in needed if name not in exprs] == []


@pytest.mark.slow
@pytest.mark.timeout(420)
@needs_prometheus
def test_prometheus_scrapes_every_member_of_a_run(tether_cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    staleness = 2
    # Long enough to be scraped for a while (worker 0 is a straggler); stopped by the test.
    launch = tether_cli(
        "launch", "--run-dir", str(run_dir), "--mode", "ssp", "--staleness", str(staleness),
        "--steps", "100000", "--straggler", "0:20", "--metrics-port", "0",
        "--lease", "10",
    )  # fmt: skip
    watch = RunWatch(run_dir)
    prometheus: Prometheus | None = None
    try:
        # A worker killed early: its restart is counted by cause (and it is a new target).
        watch.kill_at(10, "worker", 1)
        roles = {"launcher": 1, "server": 2, "worker": 2}

        def restarted_and_advertised() -> bool:
            w1 = watch.member("worker", 1)
            if w1 is None or w1.epoch < 2 or w1.state != "running":
                return False
            return all(MemberView.of(m).metrics_url for m in watch.members())

        wait_until(restarted_and_advertised, 120, "worker 1 restarted, every metrics_url published")
        views = [MemberView.of(m) for m in watch.members()]
        for role, n in roles.items():
            assert sum(v.role == role for v in views) == n
        urls = [v.metrics_url for v in views]
        assert all(urls), views
        status = tether_cli("status", "--run-dir", str(run_dir), "--json").json()
        assert sorted(m["metrics_url"] for m in status["members"]) == sorted(urls)  # type: ignore[type-var]
        targets = [urllib.parse.urlsplit(u).netloc for u in urls if u]
        assert all(t.startswith("127.0.0.1:") for t in targets)  # bound to the listen host
        prometheus = Prometheus(tmp_path / "prometheus", targets)
        p = prometheus

        def all_up() -> bool:
            up = p.values("up")
            return len(up) == len(targets) and all(v == 1 for v in up)

        wait_until(all_up, 120, f"every target up (log: {p.log})")
        queries = [q.replace("$__rate_interval", "1m") for q in dashboard_queries()]

        def answered() -> bool:
            return all(p.query(q) for q in queries)

        try:
            wait_until(answered, 120, "every dashboard query to return data")
        except pytest.fail.Exception:
            missing = [q for q in queries if not p.query(q)]
            pytest.fail(f"dashboard queries without data: {missing}")
        # Pushes counted equal the updates applied (SSP applies every push), in every scrape.
        for diff in p.values("tether_shard_pushes_total - tether_shard_updates_applied_total"):
            assert diff == 0
        assert all(v > 0 for v in p.values("tether_shard_updates_applied_total"))
        assert len(p.values("tether_shard_serving == 1")) == 2
        # The clock gap stays within the bound: every served pull is in the bucket le=s.
        within = p.values(
            f'sum(tether_shard_clock_gap_bucket{{le="{float(staleness)}"}}) '
            "- sum(tether_shard_clock_gap_count)"
        )
        assert within == [0.0]
        assert max(p.values("tether_shard_max_clock_gap")) <= staleness
        assert p.values("tether_shard_staleness_bound") == [staleness, staleness]
        assert p.values('sum(tether_run_restarts_total{role="worker",cause="exited"})') == [1.0]
        assert all(v > 0 for v in p.values("tether_worker_steps_total"))
        lag = p.values("tether_shard_replication_lag_seconds")
        assert len(lag) == 2 and all(0 <= v < 60 for v in lag)
        assert all(v >= 1 for v in p.values("tether_shard_epoch"))
        now = time.time()
        assert all(
            now - 120 < v <= now + 5 for v in p.values("tether_shard_last_update_timestamp_seconds")
        )
    finally:
        if prometheus is not None:
            prometheus.close()
        watch.close()
        if launch.proc.poll() is None:
            launch.proc.send_signal(signal.SIGINT)  # the driver stops its members and exits
        launch.finish(timeout_s=120)


@pytest.mark.slow
def test_bench_pushpull_measures_scraped_against_unscraped_in_one_run(tether_cli) -> None:
    r = tether_cli(
        "bench", "pushpull", "--metrics", "--size-mb", "1", "--repeats", "5",
        "--scrape-interval", "0.05", "--json",
    ).json()  # fmt: skip
    # Figures only: a busy machine decides the timings (DESIGN §9 reports them, no test asserts).
    assert r["metrics_push_ratio"] > 0 and r["metrics_pull_ratio"] > 0
    assert r["scrapes"] == 5 and r["scrapes_during"] >= 1
    assert 0 < r["scrape_ms_median"] <= r["scrape_ms_p99"]

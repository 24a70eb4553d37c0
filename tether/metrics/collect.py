"""Prometheus metrics of every member, read from its typed report at scrape time (DESIGN §13).

Nothing is kept twice. What a member already counts -- a shard's `ShardReport` with its
`ServingCounters` (server/report.py), a worker's `WorkerReport` with its `StepCounters`, the
driver's `LauncherReport` -- is turned into metric families by one collector per role when
Prometheus scrapes, as dask's scheduler does (`distributed/http/scheduler/prometheus`). The
histograms are fixed-bucket counts (`Buckets`) observed where the event happens: one bisect and
two additions, the same whether metrics are served or not, so serving them costs only the HTTP
thread and the scrape. Each member has its own `CollectorRegistry`, never the module-global one.

Labels stay bounded: a wait's reason, a restart's role and cause, a task metric's name. No label
holds a worker id, a push or a request; which member a series comes from is the scrape
target's (`instance`), and `tether_member_info` names it.

Names follow Prometheus conventions (base units, `_total` counters, `_seconds`, `_bytes`) and
pass `promtool check metrics` (tests/test_metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tether.metrics.buckets import (
    MEMBER_ROLES,
    RECOVERY_BUCKETS_S,
    RESTART_CAUSES,
    WAIT_REASONS,
    Buckets,
    StepCounters,
    folded,
)

if TYPE_CHECKING:
    from tether.member.report import LauncherReport, WorkerReport
    from tether.server.report import ServingCounters, ShardReport


SERVING_HELP = "1 while the shard serves, else 0."


def histogram(counts: Buckets, name: str, documentation: str) -> HistogramMetricFamily:
    """`counts` as a metric family: cumulative buckets, `+Inf` last."""
    cumulative, running = [], 0
    for bound, n in zip(counts.bounds, counts.counts, strict=False):
        running += n
        cumulative.append((str(float(bound)), running))
    cumulative.append(("+Inf", running + counts.counts[-1]))
    return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=counts.sum)


@dataclass(frozen=True, slots=True)
class ShardSample:
    """What a shard's collector reads at one scrape: its report, taken under the shard's lock,
    and what its process knows beside it (server/main.py builds it)."""

    report: ShardReport
    counters: ServingCounters  # the servicer's, read as they are (monotonic counts)
    serving: bool
    replication_lag_s: float  # since the oldest change that is not durable yet (0: none)
    appended_bytes: int  # log entries' bytes the replicator appended to the store
    appends: int
    compactions: int  # bases written


# -- collectors ---------------------------------------------------------------------------------


def _info(run_id: str, role: str, member_id: int) -> GaugeMetricFamily:
    info = GaugeMetricFamily(
        "tether_member_info",
        "The member this process is (always 1).",
        labels=["run", "role", "member_id"],
    )
    info.add_metric([run_id, role, str(member_id)], 1)
    return info


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    # prometheus_client appends the `_total` the exposition shows.
    return CounterMetricFamily(name.removesuffix("_total"), documentation, value=value)


class ShardCollector(Collector):
    """A shard's metrics, from `sample()` at scrape time."""

    def __init__(
        self, run_id: str, shard_id: int, sample: Callable[[], ShardSample | None]
    ) -> None:
        self.run_id, self.shard_id, self.sample = run_id, shard_id, sample

    def collect(self) -> Iterator[Metric]:
        sample = self.sample()
        if sample is None:  # still loading its state: not serving yet
            yield _gauge("tether_shard_serving", SERVING_HELP, 0)
        else:
            yield from shard_families(sample)
        yield _info(self.run_id, "server", self.shard_id)


def shard_families(s: ShardSample) -> Iterator[Metric]:
    r, serving = s.report, s.counters
    yield _counter(
        "tether_shard_pushes_total", "Pushes accepted (duplicates not counted).", r.pushes_accepted
    )
    yield _counter(
        "tether_shard_updates_applied_total",
        "Updates applied to the parameters.",
        r.updates_applied,
    )
    yield _counter(
        "tether_shard_pulls_total",
        "Workers' pulls served (reads outside the clock protocol not counted).",
        r.pulls_served,
    )
    yield _counter(
        "tether_shard_push_bytes_total",
        "Gradient bytes of the pushes accepted.",
        serving.push_bytes,
    )
    yield _counter(
        "tether_shard_pull_bytes_total",
        "Parameter bytes served to workers' pulls.",
        serving.pull_bytes,
    )
    yield histogram(
        serving.push_s,
        "tether_shard_push_duration_seconds",
        "A push at the shard, from its header to its acknowledgement (durability wait included).",
    )
    yield histogram(
        serving.pull_s,
        "tether_shard_pull_duration_seconds",
        "A pull at the shard, from its request to the decision to serve it (waits included).",
    )
    waits = CounterMetricFamily(
        "tether_shard_waits", "Calls that waited, by what they waited for.", labels=["reason"]
    )
    wait_s = CounterMetricFamily(
        "tether_shard_wait_seconds",
        "Seconds calls spent waiting, by what they waited for.",
        labels=["reason"],
    )
    for reason in WAIT_REASONS:
        waits.add_metric([reason], serving.waits.get(reason, 0))
        wait_s.add_metric([reason], serving.wait_s.get(reason, 0.0))
    yield waits
    yield wait_s
    yield _gauge("tether_shard_waiting_pulls", "Pulls waiting for slower workers now.", r.waiting)
    yield histogram(
        folded(r.clock_gap_hist),
        "tether_shard_clock_gap",
        "Clock gap of each served pull (DESIGN §3).",
    )
    yield histogram(
        folded(r.staleness_hist),
        "tether_shard_version_staleness",
        "Versions applied between a gradient's read and its apply (DESIGN §3).",
    )
    yield _gauge(
        "tether_shard_max_clock_gap", "The largest clock gap served so far.", r.max_clock_gap
    )
    yield _gauge(
        "tether_shard_staleness_bound",
        "The run's SSP bound s (0 under BSP, -1 under ASP).",
        r.staleness if r.mode != "asp" else -1,
    )
    yield _gauge("tether_shard_version", "The shard's parameter version.", r.version)
    yield _gauge(
        "tether_shard_durable_version", "The last version durable in the store.", r.durable_version
    )
    yield _gauge(
        "tether_shard_replication_lag_entries",
        "Applied updates not yet durable in the store.",
        max(r.version - r.durable_version, 0) if r.replication != "off" else 0,
    )
    yield _gauge(
        "tether_shard_replication_lag_seconds",
        "Seconds since the oldest change not yet durable in the store (0: all durable).",
        s.replication_lag_s,
    )
    yield _gauge(
        "tether_shard_replication_lag_max_seconds",
        "The longest replication lag measured so far.",
        r.replication_lag_max_s,
    )
    yield _counter(
        "tether_shard_replication_appended_bytes_total",
        "Log bytes appended to the store.",
        s.appended_bytes,
    )
    yield _counter("tether_shard_replication_appends_total", "Log appends to the store.", s.appends)
    yield _counter(
        "tether_shard_compactions_total", "Bases written (log compactions).", s.compactions
    )
    yield _gauge("tether_shard_log_entries", "Log entries after the store's base.", r.log_entries)
    yield _gauge("tether_shard_serving", SERVING_HELP, int(s.serving))
    yield _gauge("tether_shard_epoch", "The shard's membership epoch (restarts + 1).", r.epoch)
    if serving.last_update_at is not None:
        yield _gauge(
            "tether_shard_last_update_timestamp_seconds",
            "Unix time of the last update applied.",
            serving.last_update_at,
        )


class WorkerCollector(Collector):
    """A worker's metrics, from its report and step counters at scrape time."""

    def __init__(
        self, run_id: str, worker_id: int, sample: Callable[[], tuple[WorkerReport, StepCounters]]
    ) -> None:
        self.run_id, self.worker_id, self.sample = run_id, worker_id, sample

    def collect(self) -> Iterator[Metric]:
        report, steps = self.sample()
        yield from worker_families(report, steps)
        yield _info(self.run_id, "worker", self.worker_id)


def worker_families(report: WorkerReport, steps: StepCounters) -> Iterator[Metric]:
    yield _counter("tether_worker_steps_total", "Iterations this process completed.", steps.steps)
    yield _counter("tether_worker_samples_total", "Samples this process trained on.", steps.samples)
    yield _gauge(
        "tether_worker_clock", "Iterations done (the next clock pulled).", report.clock or 0
    )
    yield histogram(
        steps.step_s,
        "tether_worker_step_duration_seconds",
        "An iteration: pull, gradient and push.",
    )
    yield histogram(
        steps.pull_s,
        "tether_worker_pull_duration_seconds",
        "Pulling every shard's slice (waits included).",
    )
    yield histogram(
        steps.push_s,
        "tether_worker_push_duration_seconds",
        "Pushing to every shard until acknowledged.",
    )
    if report.loss is not None:
        yield _gauge("tether_worker_loss", "The last mini-batch loss.", report.loss)
    yield _counter(
        "tether_worker_reconnects_total",
        "Shard re-resolutions after failures.",
        report.reconnects or 0,
    )
    task = GaugeMetricFamily(
        "tether_worker_task_metric",
        "The task's own metrics of the last step, by name.",
        labels=["name"],
    )
    for name, value in sorted(steps.task.items()):
        task.add_metric([name], float(value))
    yield task


class LauncherCollector(Collector):
    """The driver's metrics, from its `LauncherReport` and the members it holds."""

    def __init__(
        self, run_id: str, sample: Callable[[], tuple[LauncherReport, Mapping[str, int]]]
    ) -> None:
        self.run_id, self.sample = run_id, sample

    def collect(self) -> Iterator[Metric]:
        report, members = self.sample()
        yield from launcher_families(report, members)
        yield _info(self.run_id, "launcher", 0)


def launcher_families(report: LauncherReport, members: Mapping[str, int]) -> Iterator[Metric]:
    restarts = CounterMetricFamily(
        "tether_run_restarts",
        "Member restarts, by role and cause (DESIGN §5).",
        labels=["role", "cause"],
    )
    # Every (role, cause) from 0, so that increase() and alerts see the first restart.
    counted = {(role, cause): 0 for role in MEMBER_ROLES for cause in RESTART_CAUSES}
    seconds: list[float] = []
    for r in report.recoveries or ():
        key = (str(r.get("role")), str(r.get("cause")))
        counted[key] = counted.get(key, 0) + 1
        if isinstance(r.get("recovery_s"), int | float):
            seconds.append(float(r["recovery_s"]))
    for (role, cause), n in sorted(counted.items()):
        restarts.add_metric([role, cause], n)
    yield restarts
    recovery = Buckets(RECOVERY_BUCKETS_S)
    for value in seconds:
        recovery.observe(value)
    yield histogram(
        recovery, "tether_run_recovery_seconds", "From a member's exit to its replacement serving."
    )
    running = GaugeMetricFamily(
        "tether_run_members", "Member processes the driver holds, by role.", labels=["role"]
    )
    for role, n in sorted(members.items()):
        running.add_metric([role], n)
    yield running


# -- serving ------------------------------------------------------------------------------------


def registry_of(collectors: Iterable[Collector]) -> CollectorRegistry:
    """A fresh registry with `collectors` and this process's own (CPU, memory, open files)."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


@dataclass(slots=True)
class MetricsServer:
    """A member's `/metrics` endpoint: where it listens and the URL it advertises."""

    httpd: WSGIServer
    port: int
    url: str

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def listen_host(listen: str) -> str:
    """The host part of a `--listen HOST:PORT` (brackets of an IPv6 literal removed)."""
    return listen.rpartition(":")[0].strip("[]") or "127.0.0.1"


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, advertised_host: str | None = None
) -> MetricsServer:
    """Serve `registry` on http://host:port/metrics (port 0 picks a free one) from a daemon
    thread; the URL names `advertised_host` (what others dial) or `host`."""
    try:
        httpd, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:  # as a taken --listen port is (server/main.py create_server)
        raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
    bound = int(httpd.server_port)
    shown = advertised_host or host
    if ":" in shown:
        shown = f"[{shown}]"
    return MetricsServer(httpd, bound, f"http://{shown}:{bound}/metrics")

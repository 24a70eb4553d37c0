"""`tether chaos run`: execute a scenario and check its invariants (DESIGN §7).

A scenario runs twice when its invariants need a reference: once without faults (the baseline,
same config and seed; reused across scenarios of one invocation with the same run options) and
once with its fault timeline. The faulted run is an ordinary `tether launch` run — the launcher
in this process, its shards and workers as child processes — with its worker->shard links behind
a fault proxy when the scenario asks for it. The seed is printed with the command that replays
the run.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

from tether.chaos.invariants import check_run
from tether.chaos.links import LinkPlan, fault_proxy
from tether.chaos.report import write_report
from tether.chaos.scenario import Scenario, run_settings
from tether.chaos.timeline import Timeline, progress_after
from tether.driver import api
from tether.driver.launcher import Launcher, RunFailed
from tether.store import MetricRow, default_store_uri, open_store
from tether.store.metrics import first_iteration_start

Baseline = tuple[dict[str, Any], list[MetricRow]]  # the fault-free run's summary and metrics


class BaselineCache:
    """Fault-free runs by their run options: one invocation runs each distinct baseline once."""

    def __init__(self) -> None:
        self._runs: dict[str, Baseline] = {}

    @staticmethod
    def key(scenario: Scenario) -> str:
        return json.dumps(scenario.run, sort_keys=True)

    def get(self, scenario: Scenario) -> Baseline | None:
        return self._runs.get(self.key(scenario))

    def put(self, scenario: Scenario, baseline: Baseline) -> None:
        self._runs[self.key(scenario)] = baseline


def replay_command(scenario: Scenario) -> str:
    return f"tether chaos run {scenario.path} --seed {scenario.seed}"


def _metrics(store_uri: str, run_id: str) -> list[MetricRow]:
    with open_store(store_uri) as store:
        return store.metrics(run_id)


def run_baseline(scenario: Scenario, out_dir: Path, err: TextIO, cache: BaselineCache) -> Baseline:
    """The fault-free run with the scenario's options and seed (from `cache` if it has run)."""
    if (cached := cache.get(scenario)) is not None:
        print(f"chaos: fault-free baseline reused ({cached[0]['run_id']})", file=err)
        return cached
    config = api.new_run(**run_settings(scenario))
    run_dir = out_dir / "baseline"
    shutil.rmtree(run_dir, ignore_errors=True)
    store_uri = default_store_uri(run_dir)
    print(f"chaos: fault-free baseline run {config.run_id}", file=err, flush=True)
    summary = api.run(config, run_dir=run_dir, store=store_uri, err=err).to_json()
    baseline = (summary, _metrics(store_uri, config.run_id))
    cache.put(scenario, baseline)
    return baseline


@contextlib.contextmanager
def _store_for(scenario: Scenario, run_dir: Path) -> Any:
    """(store URI, store-member controller or None) for the faulted run."""
    if not scenario.needs_mongod:
        yield default_store_uri(run_dir), None
        return
    from tether.chaos.store_faults import StoreMembers
    from tether.devtools.replica_set import start_replica_set

    rs = start_replica_set(run_dir / "mongo")
    try:
        yield rs.uri, StoreMembers(rs)
    finally:
        rs.stop()


def run_scenario(
    scenario: Scenario,
    out_dir: Path,
    err: TextIO = sys.stderr,
    *,
    prefer_binary: bool = True,
    baselines: BaselineCache | None = None,
) -> dict[str, Any]:
    """Run one scenario; the result names every invariant with ok and detail.

    Pass the same `baselines` to every scenario of one invocation so that scenarios with the
    same run options share one fault-free run; without it, this call runs its own.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"chaos: scenario {scenario.name} — {scenario.description}\n"
        f"chaos: seed {scenario.seed} (replay: {replay_command(scenario)})",
        file=err,
        flush=True,
    )
    result: dict[str, Any] = {
        "scenario": scenario.name,
        "path": str(scenario.path),
        "seed": scenario.seed,
        "replay": replay_command(scenario),
    }
    if scenario.needs_mongod and shutil.which("mongod") is None:
        reason = "skipped: needs a MongoDB replica set and `mongod` is not on PATH"
        print(f"chaos: {scenario.name} {reason}", file=err)
        return result | {"ok": None, "skipped": reason, "invariants": []}
    if baselines is None:
        baselines = BaselineCache()
    baseline, base_metrics = (
        run_baseline(scenario, out_dir, err, baselines)
        if scenario.invariants.needs_baseline
        else (None, [])
    )
    config = api.new_run(**run_settings(scenario))
    run_dir = out_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    summary: dict[str, Any] | None = None
    failure: str | None = None
    proxy_kind = None
    with contextlib.ExitStack() as stack:
        store_uri, store_members = stack.enter_context(_store_for(scenario, run_dir))
        links = None
        if scenario.proxy_workers:
            proxy_api, proxy_kind = stack.enter_context(fault_proxy(scenario.seed, prefer_binary))
            print(f"chaos: links through {proxy_kind}", file=err, flush=True)
            links = LinkPlan(proxy_api, config.workers, config.shards)
            links.create()
            stack.callback(links.close)
            links.follow(store_uri, config.run_id)
        observer = stack.enter_context(open_store(store_uri))
        timelines: list[Timeline] = []

        def start_timeline(launcher: Launcher) -> None:
            """The faults fire through the driver while it runs (DESIGN §7)."""
            timeline = Timeline(
                scenario.faults, launcher, observer, config.run_id, config.workers, links,
                store_members,
            )  # fmt: skip
            timelines.append(timeline)
            print(f"chaos: faulted run {config.run_id}", file=err, flush=True)
            timeline.start()

        hooks = api.RunHooks(
            routes=links.routes() if links is not None else {},
            before_workers=links.point_all if links is not None else None,
            on_start=start_timeline,
        )
        try:
            done = api.run(config, None, hooks, run_dir=run_dir, store=store_uri, err=err)
            summary = done.to_json()
        except RunFailed as e:
            failure = str(e)
        finally:
            for timeline in timelines:
                timeline.done.set()
                timeline.join(30)
                timeline.join_watchers()
        (timeline,) = timelines
        metrics = observer.metrics(config.run_id)
    t0 = first_iteration_start(metrics) or timeline.t0 or 0.0
    faults = [r.to_json(t0) for r in timeline.records]
    for record, f in zip(timeline.records, faults, strict=True):
        if record.heal_workers and record.t is not None:
            f["recovery_s"] = progress_after(metrics, record.heal_workers, record.t)
            f["heal"] = True
    gaps = [int(r.values.get("clock_gap", 0)) for r in metrics]
    checks = check_run(
        scenario.invariants, config, summary, failure, baseline, faults, max(gaps, default=None)
    )
    ok = all(c.ok for c in checks)
    report = write_report(
        out_dir, scenario, checks, faults, metrics, base_metrics, t0, summary, failure, proxy_kind
    )
    for c in checks:
        print(f"chaos: {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}", file=err)
    print(
        f"chaos: {scenario.name} {'passed' if ok else 'FAILED'} (seed {scenario.seed}); "
        f"report {report}",
        file=err,
        flush=True,
    )
    return result | {
        "ok": ok,
        "invariants": [c.to_json() for c in checks],
        "faults": faults,
        "recovery_s": [f["recovery_s"] for f in faults if f["recovery_s"] is not None],
        "proxy": proxy_kind,
        "summary": summary,
        "failure": failure,
        "baseline": None
        if baseline is None
        else {k: baseline[k] for k in ("run_id", "test_accuracy", "params_sha256", "wall_s")},
        "report": str(report),
    }

"""`tether chaos soak`: long runs under seeded random process and link faults (DESIGN §7).

A soak is two long runs, one BSP with sync replication and one SSP(2) with async replication,
each under a fault plan drawn from the seed: SIGKILLs of shards and workers, a SIGTERM of a
worker, a SIGSTOP of a shard that nothing resumes (the liveness detector must find it frozen and
replace it), added latency and a short partition of one worker's links. Each run is an ordinary
chaos scenario, so every invariant of `tether chaos run` is checked (the BSP run against its
fault-free baseline, bit for bit), and on top of them what only a long run shows:

- no process is left behind: once a run has ended, this process has no child alive;
- no file descriptor is leaked: this process (the launcher of both runs) holds no descriptor
  at the end that it did not hold after the first run (whose end is when every cache that a run
  warms -- gRPC's, matplotlib's fonts for the report -- is warm);
- memory stayed flat: every member process's resident memory is sampled through the run; for
  each process that lived through most of it, the median of the last quarter of its life may
  exceed the median of its second quarter by at most ``max(10 %, 32 MiB)``. The series are in
  the JSON result and plotted in ``memory.png``.

The length of each run comes from a short calibration run of the same mode on this machine (its
steps per second), so ``--minutes`` holds roughly on an idle machine and a busy one alike.
"""

from __future__ import annotations

import gc
import json
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tether.chaos.runner import BaselineCache, run_scenario
from tether.chaos.scenario import (
    FaultSpec,
    Invariants,
    LinkTarget,
    ProcessTarget,
    Scenario,
    ToxicSpec,
)
from tether.config import LivenessPolicy
from tether.driver import api
from tether.store import default_store_uri, open_store

SAMPLE_S = 1.0
MIN_FAULT_GAP_S = 8.0
FLAT_RATIO = 0.10
FLAT_SLACK_BYTES = 32 << 20


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    run: dict[str, Any]  # the scenario's [run] options, less the steps
    invariants: Invariants
    share: float  # of the soak's minutes, the baseline (if any) included


PHASES = (
    Phase(
        "bsp-sync",
        {"mode": "bsp", "shards": 2, "workers": 2, "replication": "sync"},
        Invariants(no_acked_loss=True, bit_identical=True, max_recovery_s=60.0),
        share=0.5,
    ),
    Phase(
        "ssp2-async",
        {"mode": "ssp", "staleness": 2, "shards": 2, "workers": 3, "replication": "async"},
        Invariants(max_recovery_s=60.0),
        share=0.5,
    ),
)


def fault_plan(
    rng: random.Random, duration_s: float, workers: int, shards: int, detect_s: float
) -> list[FaultSpec]:
    """Faults at seeded times within the first 70 % of the run, at least MIN_FAULT_GAP_S apart.

    ``detect_s`` (lease + probe timeout) is how long a paused shard stalls the run before it is
    replaced; a pause is planned only when the run is long enough to absorb it.
    """
    faults: list[FaultSpec] = []
    t = max(5.0, 0.1 * duration_s)
    end = 0.7 * duration_s
    paused = False
    while t < end:
        kinds = ["kill_shard", "kill_worker", "stop_worker", "latency", "partition"]
        if not paused and duration_s - t > 3 * detect_s:
            kinds.append("pause_shard")
        kind = rng.choice(kinds)
        shard = ProcessTarget("server", rng.randrange(shards))
        worker_id = rng.randrange(workers)
        worker = ProcessTarget("worker", worker_id)
        links = LinkTarget(worker_id, None)
        gap = MIN_FAULT_GAP_S
        if kind == "kill_shard":
            faults.append(FaultSpec("kill", shard, at_s=round(t, 2)))
        elif kind == "kill_worker":
            faults.append(FaultSpec("kill", worker, at_s=round(t, 2)))
        elif kind == "stop_worker":
            faults.append(FaultSpec("stop", worker, at_s=round(t, 2)))
        elif kind == "pause_shard":
            faults.append(FaultSpec("pause", shard, at_s=round(t, 2)))
            paused = True
            gap += detect_s
        elif kind == "latency":
            toxic = ToxicSpec("latency", "soak-latency", attributes={"latency": 30, "jitter": 10})
            faults.append(FaultSpec("add_toxic", links, at_s=round(t, 2), toxic=toxic))
            faults.append(FaultSpec("remove_toxic", links, after_s=3.0, toxic_name="soak-latency"))
        else:
            faults.append(FaultSpec("disable", links, at_s=round(t, 2)))
            faults.append(FaultSpec("enable", links, after_s=2.0))
        t += gap + rng.uniform(0, MIN_FAULT_GAP_S)
    return faults


class MemorySampler(threading.Thread):
    """Samples the resident memory of this process's children (the members) every SAMPLE_S."""

    def __init__(self) -> None:
        super().__init__(name="soak-memory", daemon=True)
        self.stop = threading.Event()
        self.series: dict[int, dict[str, Any]] = {}  # pid -> {"member", "t": [...], "rss": [...]}
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_S):
            now = time.monotonic() - self.t0
            for pid in children(os.getpid()):
                member = _member_of(pid)
                rss = _rss_bytes(pid)
                if member is None or rss is None:
                    continue
                s = self.series.setdefault(pid, {"member": member, "t": [], "rss": []})
                s["t"].append(round(now, 2))
                s["rss"].append(rss)


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def open_fds() -> dict[int, str]:
    """This process's open descriptors and what each points at."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the descriptor listdir itself used, closed by now
    return out


def _member_of(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in argv]
    for flag, name in (("--shard-id", "shard"), ("--worker-id", "worker")):
        if flag in args:
            return f"{name}:{args[args.index(flag) + 1]}"
    return None


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_flat(series: dict[int, dict[str, Any]], phase_s: float) -> tuple[bool, list[dict]]:
    """Judge each process that lived through a good part of the phase (see the module
    docstring); with a baseline, a phase holds two runs, each with its own processes."""
    verdicts = []
    for pid, s in sorted(series.items()):
        t, rss = s["t"], s["rss"]
        if len(rss) < 8 or t[-1] - t[0] < max(20.0, 0.3 * phase_s):
            continue
        n = len(rss)
        early = sorted(rss[n // 4 : n // 2])[len(rss[n // 4 : n // 2]) // 2]
        late = sorted(rss[3 * n // 4 :])[len(rss[3 * n // 4 :]) // 2]
        allowed = max(FLAT_RATIO * early, FLAT_SLACK_BYTES)
        verdicts.append(
            {
                "member": s["member"],
                "pid": pid,
                "early_mib": round(early / 2**20, 1),
                "late_mib": round(late / 2**20, 1),
                "growth_mib": round((late - early) / 2**20, 1),
                "ok": late - early <= allowed,
            }
        )
    return all(v["ok"] for v in verdicts) and bool(verdicts), verdicts


def calibrate(run: dict[str, Any], seed: int, out: Path, err: TextIO) -> float:
    """Steps per second of a short fault-free run of this mode on this machine, now."""
    config = api.new_run(**{**run, "steps": 200, "seed": seed})
    run_dir = out / "calibration"
    store_uri = default_store_uri(run_dir)
    api.run(config, run_dir=run_dir, store=store_uri, err=err)
    with open_store(store_uri) as store:  # steady state: from step 50 on, start-up excluded
        rows = [r for r in store.metrics(config.run_id, "worker:0") if r.step >= 50]
    return (rows[-1].step - rows[0].step) / max(rows[-1].t - rows[0].t, 1e-3)


def soak(minutes: float, seed: int, out: Path, err: TextIO) -> dict[str, Any]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    print(f"chaos soak: {minutes:g} minutes, seed {seed} (replay: tether chaos soak "
          f"--minutes {minutes:g} --seed {seed})", file=err, flush=True)  # fmt: skip
    results = []
    fds_before: dict[int, str] | None = None
    baselines = BaselineCache()  # the phases' run options differ: one baseline each
    for phase in PHASES:
        budget_s = minutes * 60 * phase.share
        rate = calibrate(phase.run, seed, out / phase.name, err)
        # With a baseline, the budget holds two runs of the same length; faults and recoveries
        # take a part of the faulted run's.
        duration_s = budget_s / (2 if phase.invariants.needs_baseline else 1)
        steps = max(100, int(0.8 * rate * duration_s))
        liveness = LivenessPolicy()  # the product's, which the soak's runs keep
        detect_s = liveness.lease_s + liveness.probe_timeout_s
        workers, shards = int(phase.run["workers"]), int(phase.run["shards"])
        faults = fault_plan(rng, duration_s, workers, shards, detect_s)
        scenario = Scenario(
            name=f"soak-{phase.name}",
            path=Path(f"soak:{phase.name}"),
            description=f"{phase.name}, {steps} steps, {len(faults)} seeded faults",
            seed=seed,
            ci=False,
            run={**phase.run, "steps": steps, "seed": seed, "max_restarts": 2 + len(faults)},
            proxy_workers=True,
            faults=tuple(faults),
            invariants=phase.invariants,
            needs_mongod=False,
        )
        sampler = MemorySampler()
        sampler.start()
        started = time.monotonic()
        try:
            result = run_scenario(scenario, out / phase.name, err, baselines=baselines)
        finally:
            sampler.stop.set()
            sampler.join(10)
        phase_s = time.monotonic() - started
        left = children(os.getpid())
        flat, verdicts = memory_flat(sampler.series, phase_s)
        results.append(
            {
                "phase": phase.name,
                "ok": bool(result["ok"]) and not left and flat,
                "steps": steps,
                "wall_s": round(phase_s, 1),
                "invariants": result["invariants"],
                "faults": [
                    {k: f[k] for k in ("fault", "fired", "at_s", "recovery_s", "error")}
                    for f in result["faults"]
                ],
                "restarts": (result["summary"] or {}).get("restarts"),
                "recoveries": (result["summary"] or {}).get("recoveries"),
                "processes_left": left,
                "memory_flat": flat,
                "memory": verdicts,
                "memory_series": {
                    str(pid): {
                        "member": s["member"],
                        "t": s["t"],
                        "rss_mib": [round(r / 2**20, 1) for r in s["rss"]],
                    }
                    for pid, s in sampler.series.items()
                },  # fmt: skip
                "report": result.get("report"),
            }
        )
        _say_phase(results[-1], err)
        gc.collect()
        if fds_before is None:
            fds_before = open_fds()
    fds_after = open_fds()
    assert fds_before is not None
    leaked = {fd: target for fd, target in fds_after.items() if fds_before.get(fd) != target}
    fd_ok = not leaked
    ok = all(r["ok"] for r in results) and fd_ok
    summary = {
        "ok": ok,
        "minutes": minutes,
        "seed": seed,
        "fds_before": len(fds_before),
        "fds_after": len(fds_after),
        "fds_leaked": leaked,
        "fds_ok": fd_ok,
        "phases": results,
        "plot": str(_plot(results, out)),
    }
    (out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"chaos soak: {'passed' if ok else 'FAILED'} (seed {seed}); open descriptors "
        f"{len(fds_before)} -> {len(fds_after)}"
        + (f" (leaked: {leaked})" if leaked else "")
        + f"; result {out / 'soak.json'}",
        file=err,
        flush=True,
    )
    return summary


def _say_phase(r: dict[str, Any], err: TextIO) -> None:
    bad = [i["name"] for i in r["invariants"] if not i["ok"]]
    grown = [f"{m['member']} +{m['growth_mib']} MiB" for m in r["memory"] if not m["ok"]]
    print(
        f"chaos soak: {r['phase']} {'ok' if r['ok'] else 'FAILED'} in {r['wall_s']}s, "
        f"{len(r['faults'])} faults, restarts {r['restarts']}; memory "
        + ("flat" if r["memory_flat"] else f"NOT flat ({', '.join(grown) or 'no samples'})")
        + (f"; processes left {r['processes_left']}" if r["processes_left"] else "")
        + (f"; failed invariants {', '.join(bad)}" if bad else ""),
        file=err,
        flush=True,
    )


def _plot(results: list[dict[str, Any]], out: Path) -> Path:
    from tether.plotting import pyplot

    plt = pyplot("a soak report's memory.png")
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3.5), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        for pid, s in sorted(r["memory_series"].items()):
            ax.plot(s["t"], s["rss_mib"], label=f"{s['member']} ({pid})", linewidth=1)
        ax.set_title(f"{r['phase']}: member RSS")
        ax.set_xlabel("s since the run started")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path = out / "memory.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

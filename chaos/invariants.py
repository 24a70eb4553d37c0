"""The invariants a chaos run checks, as pure functions of what the run left behind (DESIGN §7).

Inputs are data: the run summary (or the failure message), the fault-free baseline's summary,
the fault records and the per-step metrics. Each check returns ok and a detail a person can act
on; none raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tether.chaos.scenario import Invariants, ProcessTarget
from tether.config import RunConfig

# Faults after which a member must be serving again at a newer epoch.
RECOVERING_ACTIONS = ("kill", "stop", "restart", "replace")
# Faults that may end a member's process and so explain one restart of it: a kill, a graceful
# stop, or a pause that the liveness detector rightly finds frozen. A "replace" starts a new
# process without a restart.
RESTARTING_ACTIONS = ("kill", "stop", "restart", "pause")


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def check_run(
    inv: Invariants,
    config: RunConfig,
    summary: dict[str, Any] | None,
    failure: str | None,
    baseline: dict[str, Any] | None,
    faults: list[dict[str, Any]],
    metrics_max_gap: int | None,
) -> list[Check]:
    checks = [_faults_fired(faults)]
    if summary is None:
        checks.append(Check("finished", False, f"the run failed: {failure}"))
        return checks
    if inv.finished:
        checks.append(
            Check(
                "finished",
                True,
                f"{summary['updates_applied']} updates in {summary['wall_s']:.1f}s, restarts "
                f"{summary['restarts']}",
            )
        )
    if inv.accuracy_tolerance is not None:
        assert baseline is not None
        drop = baseline["test_accuracy"] - summary["test_accuracy"]
        checks.append(
            Check(
                "accuracy",
                drop <= inv.accuracy_tolerance,
                f"test accuracy {summary['test_accuracy']:.4f} vs fault-free "
                f"{baseline['test_accuracy']:.4f} (tolerance {inv.accuracy_tolerance})",
            )
        )
    if inv.clock_gap:
        checks.append(_clock_gap(config, summary, metrics_max_gap))
    if inv.ledger:
        ledger = summary["ledger"]
        detail = (
            f"{ledger['pushes_in_logs']} pushes in the shards' logs, each applied once"
            if ledger["ok"]
            else "; ".join(ledger["problems"][:5])
        )
        checks.append(Check("ledger", bool(ledger["ok"]), detail))
    if inv.no_acked_loss:
        lost_pushes = summary["ledger"]["lost_acked_pushes"]
        lost_versions = summary["lost_updates"]
        checks.append(
            Check(
                "no_acked_loss",
                lost_pushes == 0 and lost_versions == 0,
                f"{lost_pushes} acknowledged pushes and {lost_versions} acknowledged updates "
                f"lost in recoveries",
            )
        )
    if inv.bit_identical:
        assert baseline is not None
        same = summary["params_sha256"] == baseline["params_sha256"]
        checks.append(
            Check(
                "bit_identical",
                same,
                f"params sha256 {summary['params_sha256'][:16]}… "
                f"{'==' if same else '!='} fault-free {baseline['params_sha256'][:16]}…",
            )
        )
    if inv.max_recovery_s is not None:
        checks.append(_recovery(faults, inv.max_recovery_s))
    if inv.zombie_fenced:
        checks.append(_zombies(faults, summary.get("events", [])))
    if inv.no_spurious_restarts:
        checks.append(_no_spurious_restarts(faults, summary.get("recoveries", [])))
    return checks


def _no_spurious_restarts(faults: list[dict[str, Any]], restarts: list[dict[str, Any]]) -> Check:
    """Every restart the launcher made answers a fault this scenario injected on that member,
    fired before it; each fault explains at most one restart. Anything else is the supervisor
    turning slowness (or a broken link) into failure."""
    unused = [
        f for f in faults
        if f["fired"] and f["action"] in RESTARTING_ACTIONS and f.get("t") is not None
    ]  # fmt: skip
    problems, matched = [], []
    for r in sorted(restarts, key=lambda r: r["t"]):
        target = ProcessTarget(r["role"], r["id"]).describe()  # as faults name their target
        fault = next((f for f in unused if f["target"] == target and f["t"] <= r["t"]), None)
        if fault is None:
            problems.append(f"{target} was restarted with no fault on it: {r['detail']}")
            continue
        unused.remove(fault)
        matched.append(f"{target} after fault {fault['index'] + 1} ({r['cause']})")
    detail = "; ".join(problems) or (
        f"{len(matched)} restarts, each after a fault on its member: {', '.join(matched)}"
        if matched
        else "no restarts"
    )
    return Check("no_spurious_restarts", not problems, detail)


def _faults_fired(faults: list[dict[str, Any]]) -> Check:
    bad = [f"fault {f['index'] + 1} ({f['fault']}): {f['error']}" for f in faults if not f["fired"]]
    return Check(
        "faults_fired",
        not bad,
        "; ".join(bad) if bad else f"all {len(faults)} faults fired",
    )


def _clock_gap(config: RunConfig, summary: dict[str, Any], metrics_max_gap: int | None) -> Check:
    # The shards count every served pull; the workers also record the gap they were served,
    # which survives a shard's crash even when its statistics since the last replication do not.
    gap = max(summary["max_clock_gap"], metrics_max_gap or 0)
    bound = config.consistency.read_bound
    if bound is None:
        return Check("clock_gap", True, f"ASP has no bound; largest gap served {gap}")
    return Check(
        "clock_gap",
        gap <= bound,
        f"largest gap served {gap}, bound {bound} ({config.consistency.describe()})",
    )


def _recovery(faults: list[dict[str, Any]], limit: float) -> Check:
    problems, times = [], []
    for f in faults:
        if not f["fired"]:
            continue
        r = f["recovery_s"]
        if r is None:
            if f["action"] in RECOVERING_ACTIONS or f.get("heal"):
                problems.append(f"fault {f['index'] + 1} ({f['fault']}): no recovery seen")
            continue
        times.append(r)
        if r > limit:
            problems.append(f"fault {f['index'] + 1} ({f['fault']}): {r:.2f}s > {limit}s")
    detail = "; ".join(problems) or (
        f"recoveries {', '.join(f'{t:.2f}s' for t in times)} (limit {limit}s)"
        if times
        else "no fault needed a recovery"
    )
    return Check("recovery", not problems, detail)


def _zombies(faults: list[dict[str, Any]], events: list[dict[str, Any]]) -> Check:
    """Every replaced process that this run resumed exited with an error during the run."""
    exits = {e["pid"]: e for e in events if e["kind"] == "exit" and e.get("superseded")}
    superseded = {e["pid"] for e in events if e["kind"] == "superseded"}
    resumed = [f for f in faults if f["action"] == "resume" and f["pid"] in superseded]
    if not resumed:
        return Check("zombie_fenced", False, "no replaced process was resumed by the scenario")
    problems = []
    for f in resumed:
        e = exits.get(f["pid"])
        if e is None:
            problems.append(f"pid {f['pid']} ({f['target']}) kept running after it was resumed")
        elif e["exit_code"] == 0:
            problems.append(f"pid {f['pid']} ({f['target']}) exited 0 instead of being fenced")
    detail = "; ".join(problems) or ", ".join(
        f"pid {f['pid']} ({f['target']}) exited with code {exits[f['pid']]['exit_code']} once "
        f"resumed"
        for f in resumed
    )
    return Check("zombie_fenced", not problems, detail)

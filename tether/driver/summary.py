"""The run summary (DESIGN §9's `--json` fields) as a typed value, and the audits behind it.

`RunSummary` is what `tether launch --json` prints, what `summary.json` holds and what the store
keeps as the run's result; `to_json()` is its one serialisation. `audit_ledger` and
`lost_updates` check the workers' ack ledgers against the shards' applied logs (DESIGN §5, §7).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tether.config import RunConfig
from tether.member.report import WorkerReport
from tether.member.view import MemberView
from tether.server.report import ShardReport
from tether.tasks.build import own_optimizer_name
from tether.wire import FLOAT


@dataclass(frozen=True, slots=True)
class RunSummary:
    run_id: str
    run_dir: str
    store: str
    mode: str
    staleness: int
    shards: int
    workers: int
    steps: int
    batch_size: int
    model: str
    dataset: str
    task: str  # the user's task spec (DESIGN §11); "" for the built-in model on dataset
    num_params: int
    optimizer: str
    opt_args: dict[str, Any]  # --opt K=V (DESIGN §4)
    schedule: str | None  # None, like lr, when the shards ran the task's own optimizer
    lr: float | None
    seed: int
    final_loss: float | None
    test_accuracy: float | None
    evaluation: dict[str, float]  # what the task's evaluate returned on the final parameters
    updates_applied: int
    pushes_accepted: int
    max_clock_gap: int
    clock_gap_hist: list[int]
    version_staleness_hist: list[int]
    pull_wait_s: float
    # Pulls served into, and gradients read from, workers' same-host segments (DESIGN §2).
    segment_pulls: int
    segment_pushes: int
    wall_s: float
    train_s: float
    samples_per_s: float
    params_sha256: str
    replication: str
    restarts: dict[str, int]  # {"server": n, "worker": n}
    recovery_s: list[float]
    recoveries: list[dict[str, Any]]  # policy.Recovery.to_json()
    liveness: dict[str, Any]  # what the liveness detector measured (docs/liveness.md)
    lost_updates: int
    ledger: dict[str, Any]  # audit_ledger()
    events: list[dict[str, Any]]  # exits, restarts, signals, replacements, in order
    durable_versions: list[int]
    replication_lag_max_s: float
    export: str | None

    def to_json(self) -> dict[str, Any]:
        """The JSON object, with the fields in declaration order (a shallow copy)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the driver measured of a finished run, beside what the shards and workers report."""

    run_dir: str
    store_uri: str
    export: str | None
    evaluation: dict[str, float]
    last_losses: list[float]  # each worker's last reported mini-batch loss
    wall_s: float
    train_s: float


def summarise(
    cfg: RunConfig,
    outcome: Outcome,
    flat: np.ndarray,
    infos: list[ShardReport],
    workers: Sequence[MemberView],
    recoveries: list[dict[str, Any]],
    restarts: dict[str, int],
    liveness: dict[str, Any],
    events: list[dict[str, Any]],
) -> RunSummary:
    """The summary of a finished run: its config, the shards' final reports (`infos`, one per
    shard), the workers' ack ledgers and what the driver saw."""
    samples = cfg.workers * cfg.steps * cfg.batch_size
    own = own_optimizer_name(cfg)  # what the shards ran, when it is not --optimizer
    return RunSummary(
        run_id=cfg.run_id,
        run_dir=outcome.run_dir,
        store=outcome.store_uri,
        mode=cfg.mode,
        staleness=cfg.staleness,
        shards=cfg.shards,
        workers=cfg.workers,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        model=cfg.model,
        dataset=cfg.dataset,
        task=cfg.task,
        num_params=cfg.num_params,
        optimizer=own or cfg.optimizer,
        opt_args={} if own else dict(cfg.opt_args),
        schedule=None if own else cfg.schedule,
        lr=None if own else cfg.lr,
        seed=cfg.seed,
        final_loss=final_loss(outcome.evaluation, outcome.last_losses),
        test_accuracy=test_accuracy(outcome.evaluation),
        evaluation=outcome.evaluation,
        updates_applied=min(i.updates_applied for i in infos),
        pushes_accepted=sum(i.pushes_accepted for i in infos),
        max_clock_gap=max(i.max_clock_gap for i in infos),
        clock_gap_hist=sum_hists([list(i.clock_gap_hist) for i in infos]),
        version_staleness_hist=sum_hists([list(i.staleness_hist) for i in infos]),
        pull_wait_s=sum(i.pull_wait_s for i in infos),
        segment_pulls=sum(i.segment_pulls for i in infos),
        segment_pushes=sum(i.segment_pushes for i in infos),
        wall_s=outcome.wall_s,
        train_s=outcome.train_s,
        samples_per_s=samples / outcome.train_s,
        params_sha256=params_sha256(flat),
        replication=cfg.replication,
        restarts=restarts,
        recovery_s=[r["recovery_s"] for r in recoveries if r["recovery_s"] is not None],
        recoveries=recoveries,
        liveness=liveness,
        lost_updates=lost_updates(workers),
        ledger=audit_ledger(cfg.steps, infos, workers),
        events=events,
        durable_versions=[i.durable_version for i in infos],
        replication_lag_max_s=max(i.replication_lag_max_s for i in infos),
        export=outcome.export,
    )


def final_loss(evaluation: dict[str, float], last_losses: list[float]) -> float | None:
    """The task's evaluated loss on the final parameters; without an `evaluate`, the mean of
    the workers' last mini-batch losses (None if no worker reported one)."""
    if "loss" in evaluation:
        return evaluation["loss"]
    return sum(last_losses) / len(last_losses) if last_losses else None


def test_accuracy(evaluation: dict[str, float]) -> float | None:
    for key in ("test_accuracy", "accuracy"):
        if key in evaluation:
            return evaluation[key]
    return None


def params_sha256(flat: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(flat, dtype=FLOAT).tobytes()).hexdigest()


def sum_hists(hists: list[list[int]]) -> list[int]:
    out = [0] * max((len(h) for h in hists), default=0)
    for h in hists:
        for i, v in enumerate(h):
            out[i] += v
    return out


def report(worker: MemberView) -> WorkerReport:
    """A worker's report as its record holds it (empty before its first)."""
    return worker.worker or WorkerReport()


def last_losses(workers: Sequence[MemberView]) -> list[float]:
    """Each worker's last reported mini-batch loss (workers that reported none are left out)."""
    return [loss for w in workers if (loss := report(w).loss) is not None]


def lost_updates(workers: Sequence[MemberView]) -> int:
    """Acknowledged updates that recoveries lost, from the workers' ack ledgers (DESIGN §5).

    Each worker reports, per shard recovery (shard:epoch), how far the restored version fell
    behind the highest version it had been acknowledged; the largest report per recovery counts.
    """
    worst: dict[str, int] = {}
    for m in workers:
        for key, n in (report(m).lost_updates or {}).items():
            worst[key] = max(worst.get(key, 0), n)
    return sum(worst.values())


def audit_ledger(
    steps: int, infos: list[ShardReport], workers: Sequence[MemberView]
) -> dict[str, Any]:
    """The workers' ack ledgers against the shards' applied logs (DESIGN §7).

    A shard's log of worker w is its de-duplication entry: how many of w's pushes it accepted
    and the highest seq among them. Seqs are the iterations 0..steps-1, pushed in order, so after
    a complete run every shard must hold exactly `steps` pushes of every worker with last seq
    steps-1: fewer means a push is missing, more means one was applied twice. Every seq a worker
    saw acknowledged must be in the final log, and no recovery may have restored a log without
    a push that had been acknowledged (`lost_acked`, reported by the workers as they reconnect).
    """
    problems: list[str] = []
    by_id = {m.member_id: m for m in workers}
    applied = 0
    for info in infos:
        for entry in info.workers:
            applied += entry.clock
            where = f"shard {info.shard_id}, worker {entry.worker_id}"
            if entry.clock != entry.last_seq + 1:
                problems.append(
                    f"{where}: {entry.clock} pushes accepted but the last seq is "
                    f"{entry.last_seq} (a push applied twice or skipped)"
                )
            elif entry.clock != steps:
                problems.append(f"{where}: {entry.clock} of {steps} pushes in the log")
            member = by_id.get(entry.worker_id)
            acked = (report(member).acked_seqs or ()) if member else ()
            if info.shard_id < len(acked) and acked[info.shard_id] > entry.last_seq:
                problems.append(
                    f"{where}: seq {acked[info.shard_id]} was acknowledged but the log ends "
                    f"at {entry.last_seq}"
                )
    lost = {
        f"worker {m.member_id} shard:epoch {key}": int(n)
        for m in workers
        for key, n in (report(m).lost_acked or {}).items()
    }
    # `ok` is the log's consistency; acknowledged pushes lost to a crash are reported apart, as
    # async replication may lose its window by design (DESIGN §5) while sync must lose none.
    return {
        "ok": not problems,
        "problems": problems,
        "pushes_in_logs": applied,
        "lost_acked_pushes": sum(lost.values()),
        "lost_acked": lost,
    }

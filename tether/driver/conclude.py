"""The end of a run: its final parameters read from the shards, evaluated and summarised.

The driver concludes the runs it drives (`tether.driver.launcher`). A run made by `tether run
create` for another scheduler has no driver: its last worker to finish concludes it
(`conclude_if_last`), and every member exits 0 once the store marks it finished (DESIGN §12).
Several workers may find themselves last at once; each writes the same parameters' summary, so
concluding twice is harmless, and a worker that could not conclude exits non-zero, so that the
scheduler's retry of it tries again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import grpc
import numpy as np

from tether.config import RunConfig
from tether.driver.summary import Outcome, last_losses, summarise
from tether.member.view import MemberView, member_views
from tether.retry import PollTimeout, poll_until
from tether.server.report import ShardReport
from tether.store import Member, Store, redact_uri
from tether.tasks.build import context_of, runtime_of
from tether.transport import Security
from tether.worker.client import read_params


class RunFailed(RuntimeError):
    """The run could not finish; the message names the member that failed."""


def final_params(
    config: RunConfig, shards: Callable[[], list[Member]], timeout_s: float, security: Security
) -> tuple[np.ndarray, list[ShardReport]]:
    """The run's final parameters and each shard's report, once every shard answers.

    A shard restarted near the end may still be starting when the last worker finishes: until
    its replacement registers, the store names the dead one's address (refused) or a fenced one
    (FAILED_PRECONDITION). Those are read again, at the addresses `shards()` names then, until
    `timeout_s`; after that the run fails, naming the last error."""
    last: list[str] = []

    def attempt() -> tuple[np.ndarray, list[ShardReport]] | None:
        try:
            flat, infos = read_params(config, shards(), security)
            return flat, [ShardReport.from_info(i) for i in infos]
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION):
                raise
            last[:] = [f"{e.code().name}: {e.details()}"]
            return None

    try:
        got = poll_until(attempt, timeout_s, "the final parameters", interval_s=0.1)
    except PollTimeout:
        raise RunFailed(
            f"the final parameters could not be read from the shards within {timeout_s:.0f}s "
            f"(--startup-timeout): {last[0] if last else 'no answer'}"
        ) from None
    assert got is not None
    return got


def restarts_from_epochs(members: Sequence[MemberView]) -> dict[str, int]:
    """Restarts per role as the store counts them: every registration after a member's first."""
    return {
        role: sum(max(m.epoch - 1, 0) for m in members if m.role == role)
        for role in ("server", "worker")
    }


def workers_done(config: RunConfig, members: Sequence[MemberView]) -> bool:
    """Whether every worker of the run has exited after its last step."""
    done = {
        m.member_id
        for m in members
        if m.role == "worker" and m.state == "exited" and (m.clock or 0) >= config.steps
    }
    return len(done) == config.workers


def conclude_if_last(store: Store, store_uri: str, config: RunConfig, security: Security) -> bool:
    """Conclude a driverless run if every worker is done; returns whether this call did.

    Raises RunFailed when the shards cannot be read (the caller exits non-zero, to be retried).
    """
    members = member_views(store.members(config.run_id))
    if any(m.role == "launcher" for m in members):
        return False  # a driver concludes its own runs
    if not workers_done(config, members):
        return False
    record = store.get_run(config.run_id)
    if record.finished:
        return False
    flat, infos = final_params(
        config, lambda: store.members(config.run_id, "server"), config.startup_timeout_s, security
    )
    evaluation = runtime_of(config, device="cpu").evaluate(
        flat, context_of(config, "driver", store_uri=store_uri)
    )
    members = member_views(store.members(config.run_id))
    workers = [m for m in members if m.role == "worker"]
    wall_s = max(time.time() - record.created_at, 1e-9)
    outcome = Outcome(
        run_dir="",
        store_uri=redact_uri(store_uri),
        export=None,
        evaluation=evaluation,
        last_losses=last_losses(workers),
        wall_s=wall_s,
        train_s=wall_s,
    )
    summary = summarise(
        config, outcome, flat, infos, workers, recoveries=[],
        restarts=restarts_from_epochs(members), liveness={}, events=[],
    )  # fmt: skip
    store.finish_run(config.run_id, summary.to_json())
    return True

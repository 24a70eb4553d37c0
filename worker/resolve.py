"""Finding the shards, and finding them again after one was replaced (DESIGN §5).

A worker dials the addresses the store names. When a shard is replaced (a new epoch in the
store) the worker looks every shard up again and redoes its iteration; pushes are idempotent by
`(worker_id, seq)`, so a redone push that had been applied is acknowledged as a duplicate.

- `classify` and `after_failure` decide, as values, whether an error means "re-resolve" or ends
  the worker, and when re-resolving has stopped making progress.
- `wait_for_shards` waits until the store names every shard serving at a high enough epoch.
- `ResolvedShards` holds the clients and the epochs they were resolved at; the heartbeat thread
  closes the client of a shard the store says was replaced (`close_replaced`), so a call waiting
  on the old process ends now instead of at its deadline.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from tether.config import RunConfig
from tether.member.view import MemberView, member_views
from tether.proto.ps_pb2 import InfoReply
from tether.retry import PollTimeout, RetryPolicy, poll_until, with_retry
from tether.store import Member, Store, StoreError
from tether.transport import Security
from tether.worker.client import ShardClient


class WorkerFailed(RuntimeError):
    """The run cannot go on from this worker; the message names the cause."""


class StaleShard(RuntimeError):
    """A reply came from an older epoch than the store names: a fenced shard (zombie)."""


MAX_RESOLVES_WITHOUT_PROGRESS = 20

# Codes after which the shard may have been replaced: look its address up again and redo the
# iteration (pushes are idempotent by (worker_id, seq), DESIGN §5). CANCELLED is what a call
# gets from a shard process whose server shut down under it.
RESOLVE_CODES = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
    }
)


# ---- what an error means -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolve:
    """A shard may have been replaced: look every shard up again and redo the iteration."""


@dataclass(frozen=True, slots=True)
class Fatal:
    """Not a sign of a replaced shard: the error ends the worker as it was raised."""


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Re-resolving made no progress `resolutions` times in a row at one clock."""

    resolutions: int


def status_of(error: BaseException) -> grpc.StatusCode | None:
    """The gRPC status of a failed call; None for a failure without one."""
    return error.code() if isinstance(error, grpc.RpcError) else None


def classify(code: grpc.StatusCode | None) -> Resolve | Fatal:
    """`code` of a failed shard call; None: a failure without a status (a stale reply, a
    channel closed under the call because its shard was replaced), which always re-resolves."""
    return Resolve() if code is None or code in RESOLVE_CODES else Fatal()


def after_failure(code: grpc.StatusCode | None, failures: int) -> Resolve | Fatal | GiveUp:
    """What to do after an iteration failed with `code`, `failures` failed attempts at the same
    clock before it. A shard that never comes back must end the run, not hold it forever."""
    if isinstance(classify(code), Fatal):
        return Fatal()
    if failures + 1 > MAX_RESOLVES_WITHOUT_PROGRESS:
        return GiveUp(resolutions=failures)
    return Resolve()


# ---- finding the shards --------------------------------------------------------------------


def wait_for_shards(
    store: Store, config: RunConfig, timeout_s: float, min_epochs: dict[int, int] | None = None
) -> list[Member]:
    """The shards' members once all are registered and serving, at epochs >= `min_epochs`."""
    floor = min_epochs or {}
    seen: list[Member] = []

    def ready() -> list[Member] | None:
        seen[:] = [
            m
            for m in store.members(config.run_id, "server")
            if m.state == "running" and m.epoch >= floor.get(m.member_id, 0)
        ]
        if len(seen) == config.shards:
            return sorted(seen, key=lambda m: m.member_id)
        return None

    try:
        shards = poll_until(ready, timeout_s, f"all {config.shards} shards", interval_s=0.02)
    except PollTimeout:
        have = sorted(m.member_id for m in seen)
        raise WorkerFailed(
            f"worker could not reach all {config.shards} shards within {timeout_s:.0f}s: "
            f"only shards {have} are registered and running"
        ) from None
    assert shards is not None  # poll_until returns None only when a stop event is set
    return shards


def replaced_shards(members: Sequence[MemberView], epochs: Sequence[int]) -> list[int]:
    """The shards whose replacement (a newer epoch than `epochs`) already serves."""
    return [
        m.member_id
        for m in members
        if m.member_id < len(epochs) and m.epoch > epochs[m.member_id] and m.serving
    ]


class ResolvedShards:
    """This worker's clients to the shards, and the store epochs they were resolved at.

    `resolve()` runs on the training thread and `close_replaced()` on the heartbeat thread: the
    clients are swapped under a lock, and left alone while a resolve is under way.
    """

    def __init__(
        self,
        store: Store,
        config: RunConfig,
        routes: dict[int, str],
        policy: RetryPolicy,
        rng: random.Random,
        security: Security,
    ) -> None:
        self.store, self.config, self.routes = store, config, routes
        self.security = security
        self.policy, self.rng = policy, rng
        self.clients: list[ShardClient] = []
        self.epochs: list[int] = []  # each shard's epoch as last resolved from the store
        self._lock = threading.Lock()
        self._resolving = False

    def resolve(self) -> tuple[list[Member], list[InfoReply]]:
        """Look every shard up in the store (at no older epoch than before), dial them and ask
        each for its state; returns their members and replies, in shard order."""
        with self._lock:
            self._resolving = True
        try:
            return self._resolve()
        finally:
            with self._lock:
                self._resolving = False

    def _resolve(self) -> tuple[list[Member], list[InfoReply]]:
        floor = dict(enumerate(self.epochs))
        deadline = time.monotonic() + self.config.wait_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            shards = wait_for_shards(self.store, self.config, max(remaining, 0.0), floor)
            self.close()
            self.clients = [
                ShardClient(
                    self.routes.get(m.member_id, m.address),
                    self.config.run_id,
                    security=self.security,
                    chunk_bytes=self.config.chunk_bytes,
                )
                for m in shards
            ]
            try:
                infos = [with_retry(c.info, self.policy, self.rng) for c in self.clients]
                break
            except grpc.RpcError as e:
                if isinstance(classify(e.code()), Fatal) or time.monotonic() > deadline:
                    raise
        self.epochs = [m.epoch for m in shards]
        return shards, infos

    def close_replaced(self, store: Store) -> None:
        """Close the channel to a shard the store says was replaced, so that a call waiting on
        the old process (paused, partitioned: it never answers) ends now and the loop looks the
        shard up again, instead of at the call's deadline (DESIGN §5)."""
        try:
            members = member_views(store.members(self.config.run_id, "server"))
        except StoreError:
            return
        with self._lock:
            if self._resolving:
                return
            for i in replaced_shards(members, self.epochs):
                if not self.clients[i].closed:
                    self.clients[i].close()

    def close(self) -> None:
        for c in self.clients:
            c.close()

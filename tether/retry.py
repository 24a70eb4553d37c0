"""The one way Tether retries and the one way it waits on a condition (STYLE §6).

- `retry` runs a call again after failures that `retryable` accepts, with bounded full-jitter
  exponential backoff; `with_retry` is the gRPC case (only UNAVAILABLE is retried; pushes stay
  idempotent because they carry `(worker_id, seq)`, DESIGN §5).
- `Backoff` is the same schedule for loops that must do their own bookkeeping between attempts
  (the replicator keeps serving while the store is unavailable).
- `poll_until` waits for a predicate to become truthy, with a deadline, and fails with a message
  that names what it waited for. An optional `stop` event ends the wait early.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`attempts` calls in all; the n-th wait is uniform in [0, min(max_s, initial_s·2ⁿ)]."""

    attempts: int = 6
    initial_s: float = 0.05
    max_s: float = 1.0

    def cap_s(self, failures: int) -> float:
        """The largest wait after `failures` consecutive failures (failures >= 0)."""
        return min(self.max_s, self.initial_s * 2 ** max(failures, 0))


class Backoff:
    """Full-jitter exponential backoff state for a loop that retries on its own terms."""

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self.failures = 0

    def failed(self) -> float:
        """Record one more failure and return how long to wait before the next attempt."""
        delay = self.rng.uniform(0, self.policy.cap_s(self.failures))
        self.failures += 1
        return delay

    def succeeded(self) -> None:
        self.failures = 0


def retry(
    call: Callable[[], T],
    policy: RetryPolicy,
    rng: random.Random,
    retryable: Callable[[BaseException], bool],
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `call` up to `policy.attempts` times; re-raise the first error not `retryable`."""
    backoff = Backoff(policy, rng)
    for attempt in range(policy.attempts):
        try:
            return call()
        except Exception as e:
            if not retryable(e) or attempt == policy.attempts - 1:
                raise
            sleep(backoff.failed())
    raise AssertionError("unreachable: attempts must be >= 1")


def grpc_unavailable(error: BaseException) -> bool:
    return isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE


def with_retry(call: Callable[[], T], policy: RetryPolicy, rng: random.Random) -> T:
    """Run a gRPC call, retrying only UNAVAILABLE, with full-jitter exponential backoff."""
    return retry(call, policy, rng, grpc_unavailable)


class PollTimeout(TimeoutError):
    """`poll_until` ran past its deadline; the message names what it waited for."""


def poll_until(
    predicate: Callable[[], T | None],
    timeout_s: float | None,
    what: str,
    interval_s: float = 0.02,
    stop: threading.Event | None = None,
) -> T | None:
    """Call `predicate` until it returns a truthy value, and return that value.

    Raises `PollTimeout` after `timeout_s` (None: no deadline, only `stop`), naming `what`.
    Returns None when `stop` is set first.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if stop is not None and stop.is_set():
            return None
        if deadline is not None and time.monotonic() >= deadline:
            raise PollTimeout(f"timed out after {timeout_s:.0f}s waiting for {what}")
        if stop is not None:
            stop.wait(interval_s)
        else:
            time.sleep(interval_s)

"""The replication adapter: executes the shard core's "replicate now" decisions (DESIGN §5).

One background thread per shard. Under the shard's lock it asks the core whether a write is due
(``replication_due``) and, if so, copies the state (``codec.to_replica``); the store write happens
outside the lock, so requests keep flowing while it runs. Writes are group commits: every push
accepted before the copy is covered by it. Completion goes back to the core as an event
(``replicated``) and wakes the pushes whose acknowledgement waits for durability (sync mode).

Failures are data (STYLE §4): a store that is briefly unavailable is retried with bounded,
jittered backoff (``tether.retry.Backoff``); a Fenced write means a newer epoch owns the shard,
which the core learns as a fenced stop. The replicator shares the shard's lock through its
``ShardHost`` and knows nothing of the gRPC servicer.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from tether.retry import Backoff, RetryPolicy
from tether.server.codec import to_replica
from tether.server.host import ShardHost
from tether.store import Fenced, ShardSnapshot, Store, StoreUnavailable

log = logging.getLogger("tether.server.replication")

_IDLE_WAKE_S = 1.0
# Waits of up to 0.02, 0.04, ... 0.5 s between writes to an unavailable store. `attempts` does not
# apply: the shard keeps serving and the replicator keeps trying until it stops.
STORE_BACKOFF = RetryPolicy(initial_s=0.02, max_s=0.5)


class Replicator:
    def __init__(
        self,
        host: ShardHost,
        store: Store,
        *,
        on_failure: Callable[[BaseException], None],
        now: Callable[[], float] = time.time,
        seed: int = 0,
    ) -> None:
        self.host = host
        self.store = store
        self.on_failure = on_failure  # Fenced, or an error the shard cannot serve past
        self.now = now
        self._stopping = False
        self._rng = random.Random(seed)
        self._thread = threading.Thread(target=self._run, name="replicator", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Flush what is not durable yet, then end the thread."""
        with self.host.locked():
            self._stopping = True
            self.host.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # surfaced by the process, never swallowed
            self.error = e
            log.exception("replication failed")
            self.host.stop(fenced=False)
            self.on_failure(e)

    def _loop(self) -> None:
        spec = self.host.state.spec
        backoff = Backoff(STORE_BACKOFF, self._rng)
        while True:
            with self.host.locked() as state:
                while not state.replication_due(self.now()):
                    if self._stopping:
                        if state.revision == state.durable_revision:
                            return
                        break  # final flush on a graceful stop
                    wait = state.replication_wait_s(self.now())
                    self.host.wait(_IDLE_WAKE_S if wait is None else max(wait, 1e-3))
                meta, arrays = to_replica(state)
                revision, version, epoch = state.revision, state.version, state.epoch
            snapshot = ShardSnapshot(spec.run_id, spec.shard_id, epoch, version, meta, arrays)
            try:
                self.store.save_shard_state(snapshot)
            except Fenced as e:
                self.host.stop(fenced=True)  # a newer epoch owns the shard (DESIGN §5)
                self.on_failure(e)
                return
            except StoreUnavailable as e:
                log.warning("replication of shard %d failed (%s); retrying", spec.shard_id, e)
                time.sleep(backoff.failed())
                continue
            backoff.succeeded()
            with self.host.locked() as state:
                state.replicated(revision, version, self.now())
                self.host.notify_all()  # pushes waiting for durability ask the core again

"""The replication adapter: executes the shard core's "replicate now" decisions (DESIGN §5).

One background thread per shard. Under the shard's lock it asks the core whether a write is due
(``replication_due``) and, if so, copies the state (``to_replica``); the store write happens
outside the lock, so requests keep flowing while it runs. Writes are group commits: every push
accepted before the copy is covered by it. Completion goes back to the core as an event
(``replicated``) and wakes the pushes whose acknowledgement waits for durability (sync mode).

Failures are data (STYLE.md §4): a store that is briefly unavailable is retried with bounded,
jittered backoff; a Fenced write means a newer epoch owns the shard, so this one stops serving.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from tether.server.servicer import ShardServicer
from tether.store import Fenced, ShardSnapshot, Store, StoreUnavailable

log = logging.getLogger("tether.server.replication")

_IDLE_WAKE_S = 1.0
_BACKOFF_MAX_S = 0.5


class Replicator:
    def __init__(
        self,
        servicer: ShardServicer,
        store: Store,
        *,
        on_failure: Callable[[BaseException], None],
        now: Callable[[], float] = time.time,
        seed: int = 0,
    ) -> None:
        self.servicer = servicer
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
        with self.servicer.cond:
            self._stopping = True
            self.servicer.cond.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # surfaced by the process, never swallowed
            self.error = e
            log.exception("replication failed")
            self.servicer.stop_serving(fenced=False)
            self.on_failure(e)

    def _loop(self) -> None:
        cond, state = self.servicer.cond, self.servicer.state
        spec = state.spec
        failures = 0
        while True:
            with cond:
                while not state.replication_due(self.now()):
                    if self._stopping:
                        if state.revision == state.durable_revision:
                            return
                        break  # final flush on a graceful stop
                    wait = state.replication_wait_s(self.now())
                    cond.wait(_IDLE_WAKE_S if wait is None else max(wait, 1e-3))
                meta, arrays = state.to_replica()
                revision, version, epoch = state.revision, state.version, state.epoch
            snapshot = ShardSnapshot(spec.run_id, spec.shard_id, epoch, version, meta, arrays)
            try:
                self.store.save_shard_state(snapshot)
            except Fenced as e:
                self.servicer.stop_serving(fenced=True)
                self.on_failure(e)
                return
            except StoreUnavailable as e:
                failures += 1
                backoff = min(_BACKOFF_MAX_S, 0.01 * 2**failures)
                log.warning("replication of shard %d failed (%s); retrying", spec.shard_id, e)
                time.sleep(self._rng.uniform(0, backoff))
                continue
            failures = 0
            with cond:
                state.replicated(revision, version, self.now())
                cond.notify_all()

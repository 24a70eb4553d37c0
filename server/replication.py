"""The replication adapters: the shard core's log reaches the store, and bases compact it
(DESIGN §5).

Two background threads per shard, each with its own loop and neither on the request path:

- :class:`Replicator` appends the log. Under the shard's lock it asks the core's log cursor
  (``server/log.py``) whether an append is due (``replication_due``) and takes the unlogged
  entries (``batch``: references to the
  gradients the optimizer applied, never a copy); the store write happens outside the lock.
  Appends are group commits: every update applied before the batch was taken is in it.
  Completion goes back to the core (``replicated``) and wakes the pushes whose acknowledgement
  waits for durability.
- :class:`Compactor` writes bases. When the core says the durable log is past its budget
  (``compaction_due``) it copies the state *outside* the lock and keeps the copy only if no
  update ran meanwhile (the version, read under the lock before and after, did not move: every
  update runs under the lock and moves it). A BSP shard is idle between clocks, so the first try
  almost always holds; after :data:`COPY_TRIES` torn copies (an ASP shard under steady load) the
  base is rebuilt instead from what the store holds, by the same replay a recovery runs. The base
  is saved once the log is durable up to its version; nothing waits for it.

Failures are data (STYLE §4): a store that is briefly unavailable is retried with bounded,
jittered backoff (``tether.retry.Backoff``); a Fenced write means a newer epoch owns the shard,
which the core learns as a fenced stop. The adapters share the shard's lock through its
``ShardHost`` and know nothing of the gRPC servicer.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

import numpy as np

from tether.retry import Backoff, RetryPolicy
from tether.server.codec import base_parts, recover, to_replica
from tether.server.host import ShardHost
from tether.store import Fenced, ShardSnapshot, Store, StoreUnavailable

log = logging.getLogger("tether.server.replication")

_IDLE_WAKE_S = 1.0
# Waits of up to 0.02, 0.04, ... 0.5 s between writes to an unavailable store. `attempts` does not
# apply: the shard keeps serving and the replicator keeps trying until it stops.
STORE_BACKOFF = RetryPolicy(initial_s=0.02, max_s=0.5)
# Copies of the state outside the lock tried before the base is rebuilt from the store instead.
COPY_TRIES = 4


class _Adapter:
    """A background thread working on a shard through its host, stopped by `stop`."""

    name = "adapter"

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
        self._backoff = Backoff(STORE_BACKOFF, self._rng)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the thread (a Replicator first flushes what is not durable yet)."""
        with self.host.locked():
            self._stopping = True
            self.host.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            self._loop()
        except Fenced as e:
            self.host.stop(fenced=True)  # a newer epoch owns the shard (DESIGN §5)
            self.on_failure(e)
        except BaseException as e:  # surfaced by the process, never swallowed
            self.error = e
            log.exception("%s failed", self.name)
            self.host.stop(fenced=False)
            self.on_failure(e)

    def _loop(self) -> None:
        raise NotImplementedError

    def _unavailable(self, what: str, e: StoreUnavailable) -> None:
        shard = self.host.state.spec.shard_id
        log.warning("%s of shard %d failed (%s); retrying", what, shard, e)
        time.sleep(self._backoff.failed())


class Replicator(_Adapter):
    """Appends the shard's log to the store (module docstring)."""

    name = "replicator"
    appends = 0  # successful appends to the store, and the entries' bytes (read by metrics)
    appended_bytes = 0

    def _loop(self) -> None:
        spec = self.host.state.spec
        while True:
            with self.host.locked() as state:
                while not state.log.replication_due(self.now()):
                    if self._stopping:
                        if not state.log.unlogged:
                            return
                        break  # final flush on a graceful stop
                    if state.status != "serving" and not state.log.unlogged:
                        return
                    wait = state.log.wait_s(self.now())
                    self.host.wait(_IDLE_WAKE_S if wait is None else max(wait, 1e-3))
                if state.status == "fenced":
                    return  # a zombie writes nothing
                batch, epoch = state.log.batch(), state.epoch
            try:
                self.store.append_shard_log(spec.run_id, spec.shard_id, epoch, batch)
            except StoreUnavailable as e:
                self._unavailable("a log append", e)
                continue
            self._backoff.succeeded()
            self.appends += 1
            self.appended_bytes += sum(entry.nbytes for entry in batch)
            with self.host.locked() as state:
                state.replicated(batch[-1].position, self.now())
                self.host.notify_all()  # pushes waiting for durability ask the core again


class Compactor(_Adapter):
    """Writes a base when the log is past its budget (module docstring). `initial` gives the
    shard's parameters at version 0, for a rebuild from a log that has no base yet."""

    name = "compactor"

    def __init__(
        self,
        host: ShardHost,
        store: Store,
        *,
        initial: Callable[[], np.ndarray],
        on_failure: Callable[[BaseException], None],
        now: Callable[[], float] = time.time,
        seed: int = 0,
    ) -> None:
        super().__init__(host, store, on_failure=on_failure, now=now, seed=seed)
        self.initial = initial
        self.bases = 0  # bases written
        self.rebuilt = 0  # of which rebuilt from the store after torn copies

    def _loop(self) -> None:
        while True:
            with self.host.locked() as state:
                while not state.compaction_due():
                    if self._stopping or state.status != "serving":
                        return
                    self.host.wait(_IDLE_WAKE_S)
            base = self._copy() or self._rebuild()
            if base is None:
                continue  # the store was unavailable: ask again
            with self.host.locked() as state:
                # A base is never ahead of the durable log; the replicator gets there soon.
                while state.log.durable_version < base.version:
                    if self._stopping or state.status != "serving":
                        return
                    self.host.wait(_IDLE_WAKE_S)
            while True:
                try:
                    self.store.save_shard_state(base)
                    break
                except StoreUnavailable as e:
                    self._unavailable("a base save", e)
                    if self._stopping:
                        return
            self._backoff.succeeded()
            self.bases += 1
            with self.host.locked() as state:
                state.log.base_saved(base.version)

    def _copy(self) -> ShardSnapshot | None:
        """The state copied outside the lock, or None if every try was torn by an update."""
        spec = self.host.state.spec
        for _ in range(COPY_TRIES):
            with self.host.locked() as state:
                version, meta, live = base_parts(state)
                epoch = state.epoch
            copied = {name: a.copy() for name, a in live.items()}
            with self.host.locked() as state:
                if state.version == version:
                    return ShardSnapshot(spec.run_id, spec.shard_id, epoch, version, meta, copied)
        return None

    def _rebuild(self) -> ShardSnapshot | None:
        """A base at the durable log's end, rebuilt by replaying the store's base and log."""
        spec = self.host.state.spec
        epoch = self.host.state.epoch
        try:
            stored = self.store.load_shard_log(spec.run_id, spec.shard_id)
        except StoreUnavailable as e:
            self._unavailable("a base rebuild", e)
            return None
        state = recover(spec, epoch, stored, self.initial)
        meta, arrays = to_replica(state)
        self.rebuilt += 1
        return ShardSnapshot(spec.run_id, spec.shard_id, epoch, state.version, meta, arrays)

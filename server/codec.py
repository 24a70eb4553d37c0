"""A shard's replica: what the store keeps of a `ShardState` and how a replacement rebuilds it.

The store keeps a *base* (the complete state at one version: JSON tables plus named flat arrays,
what `ShardSnapshot` carries) and the *log* of updates after it (DESIGN §5). `base_parts` names
the arrays of a base without copying them, so the compactor can copy them outside the shard's
lock and keep the copy only if no update ran meanwhile; `to_replica` is the same, copied.
`recover` is a replacement's start: the base (or the initial parameters) and then every log
entry replayed through the same optimizer code, which gives the lost shard's state bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tether.server.state import ShardSpec, ShardState, Stats
from tether.store.base import ShardLog, StoreError
from tether.wire import FLOAT


def base_parts(state: ShardState) -> tuple[int, dict[str, Any], dict[str, np.ndarray]]:
    """(version, JSON tables, named arrays) of a base at the current version. The arrays are
    the live ones (copy them before use); the tables are those of the last applied update, so a
    BSP gradient held for an open clock is not part of it (it is not in the log either)."""
    arrays = {"params": state.params}
    if state.prev_params is not None:
        arrays["prev_params"] = state.prev_params
    scalars = {}
    for name, value in state.optimizer.state_arrays().items():
        if value.ndim == 0:
            scalars[name] = int(value)
        else:
            arrays[f"opt.{name}"] = value
    meta = dict(state.applied_tables)
    meta["optimizer_scalars"] = scalars
    return state.version, meta, arrays


def to_replica(state: ShardState) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A base of the state as it is now, copied: (JSON metadata, named flat arrays)."""
    _, meta, arrays = base_parts(state)
    return meta, {name: a.copy() for name, a in arrays.items()}


def from_replica(
    spec: ShardSpec, epoch: int, meta: dict[str, Any], arrays: dict[str, np.ndarray]
) -> ShardState:
    """Rebuild a shard from a base at `epoch` (the inverse of to_replica)."""
    state = ShardState(spec, arrays["params"], epoch=epoch, restored_version=meta["version"])
    opt = {k[len("opt.") :]: v for k, v in arrays.items() if k.startswith("opt.")}
    opt.update({k: np.array(v, dtype=np.int64) for k, v in meta["optimizer_scalars"].items()})
    state.optimizer.load_state_arrays(opt)
    if state.prev_params is not None:
        state.prev_params = np.array(arrays["prev_params"], dtype=FLOAT, copy=True)
    state.version = state.durable_version = state.base_version = meta["version"]
    _restore_tables(state, meta)
    return state


def recover(
    spec: ShardSpec, epoch: int, log: ShardLog | None, initial: Callable[[], np.ndarray]
) -> ShardState:
    """The shard at `epoch` rebuilt from what the store holds: the base (or `initial()`, the
    parameters at version 0, when no base was written) with every log entry replayed."""
    if log is None or (log.base is None and not log.entries):
        return ShardState(spec, initial(), epoch=epoch)
    started = time.perf_counter()
    if log.base is not None:
        state = from_replica(spec, epoch, log.base.meta, log.base.arrays)
    else:
        state = ShardState(spec, initial(), epoch=epoch, restored_version=0)
    for entry in log.entries:
        state.replay(entry.position, entry.arrays["grad"])
    if log.entries:
        _restore_tables(state, log.entries[-1].meta)
    state.durable_version = state.restored_version = state.version
    state.recovered = {
        "base_version": log.base_version,
        "entries": len(log.entries),
        "replay_s": time.perf_counter() - started,
    }
    # The log a compaction would now cover, costed with the step time the replay measured.
    state.since_base.extend(
        (e.position, e.nbytes, state.replay_cost_s(e.nbytes)) for e in log.entries
    )
    state.rebase_invariants()
    return state


def _restore_tables(state: ShardState, meta: dict[str, Any]) -> None:
    if len(meta["clocks"]) != state.spec.num_workers:
        raise ValueError("replicated state has a different number of workers")
    if meta["version"] != state.version:
        raise StoreError(
            f"shard {state.spec.shard_id}: recorded tables are of version {meta['version']}, "
            f"the state is at {state.version}"
        )
    state.revision = meta["revision"]
    for entry, clock, seq in zip(state.workers, meta["clocks"], meta["last_seq"], strict=True):
        entry.clock, entry.last_seq = clock, seq
    state.stats = Stats(**meta["stats"])
    state.applied_tables = state.tables()
    state.rebase_invariants()

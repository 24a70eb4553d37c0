"""A shard's replica: what the store keeps of a `ShardState` and how a replacement rebuilds it.

The form is JSON metadata plus named flat arrays (DESIGN §5), what `ShardSnapshot` carries. The
replicator copies it under the shard's lock (`to_replica`), so the arrays are copies that later
updates cannot touch; a replacement shard starts from `from_replica` at its own, newer epoch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from tether.server.state import ShardSpec, ShardState, Stats
from tether.wire import FLOAT


def to_replica(state: ShardState) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Everything a replacement needs, copied: (JSON metadata, named flat arrays)."""
    arrays = {"params": state.params.copy()}
    if state.prev_params is not None:
        arrays["prev_params"] = state.prev_params.copy()
    scalars = {}
    for name, value in state.optimizer.state_arrays().items():
        if value.ndim == 0:
            scalars[name] = int(value)
        else:
            arrays[f"opt.{name}"] = value.copy()
    for w, g in state.pending.items():
        arrays[f"pending.{w}"] = g.copy()
    meta = {
        "version": state.version,
        "revision": state.revision,
        "clocks": state.clocks,
        "last_seq": [w.last_seq for w in state.workers],
        "pending": sorted(state.pending),
        "optimizer_scalars": scalars,
        "stats": dataclasses.asdict(state.stats),
    }
    return meta, arrays


def from_replica(
    spec: ShardSpec, epoch: int, meta: dict[str, Any], arrays: dict[str, np.ndarray]
) -> ShardState:
    """Rebuild a shard from its replicated state at `epoch` (the inverse of to_replica)."""
    # -1 as for a fresh shard when the replica holds no accepted change.
    restored = meta["version"] if meta["revision"] > 0 else -1
    state = ShardState(spec, arrays["params"], epoch=epoch, restored_version=restored)
    if len(meta["clocks"]) != spec.num_workers:
        raise ValueError("replicated state has a different number of workers")
    state.version = state.durable_version = meta["version"]
    state.revision = state.durable_revision = meta["revision"]
    for entry, clock, seq in zip(state.workers, meta["clocks"], meta["last_seq"], strict=True):
        entry.clock, entry.last_seq = clock, seq
    opt = {k[len("opt.") :]: v for k, v in arrays.items() if k.startswith("opt.")}
    opt.update({k: np.array(v, dtype=np.int64) for k, v in meta["optimizer_scalars"].items()})
    state.optimizer.load_state_arrays(opt)
    if state.prev_params is not None:
        state.prev_params = np.array(arrays["prev_params"], dtype=FLOAT, copy=True)
    state.pending = {w: np.array(arrays[f"pending.{w}"], copy=True) for w in meta["pending"]}
    state.stats = Stats(**meta["stats"])
    state.updates_at_replication = state.stats.updates_applied
    state.rebase_invariants()
    return state

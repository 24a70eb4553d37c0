"""A shard's replica: what the store keeps of a `ShardState` and how a replacement rebuilds it.

The store keeps a *base* (the complete state at one version: JSON tables plus named flat arrays,
what `ShardSnapshot` carries) and the *log* of updates after it (DESIGN §5). Every table's part
is named by the table: arrays `"{table}.{name}"` (`"dense.params"`, `"dense.opt.mu"`; a log
entry's `"dense.grad"`), its base meta under `meta["tables"][table]`, and the clock table with
its membership in the meta beside them. `base_parts` names the arrays of a base without copying
them, so the compactor can copy them outside the shard's lock and keep the copy only if no
update ran meanwhile; `to_replica` is the same, copied. `recover` is a replacement's start: the
base (or the initial parameters) and then every log entry replayed through the same optimizer
code, which gives the lost shard's state bit for bit.

A replica written before tables existed (no `"membership"` in its meta) named the dense
slice's arrays without a prefix and kept its optimizer scalars at the top of the meta; it is
read as the dense table's (`_legacy`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tether.store.base import ShardLog, StoreError

from .state import DENSE, ShardSpec, ShardState, Stats


def base_parts(state: ShardState) -> tuple[int, dict[str, Any], dict[str, np.ndarray]]:
    """(version, JSON tables, named arrays) of a base at the current version. The arrays are
    the live ones (copy them before use); the tables are those of the last applied update, so a
    BSP gradient held for an open clock is not part of it (it is not in the log either)."""
    meta = dict(state.applied_tables)
    meta["tables"] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, table in state.tables.items():
        table_meta, table_arrays = table.base_parts()
        meta["tables"][name] = table_meta
        arrays.update({f"{name}.{key}": a for key, a in table_arrays.items()})
    return state.version, meta, arrays


def to_replica(state: ShardState) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A base of the state as it is now, copied: (JSON metadata, named flat arrays)."""
    _, meta, arrays = base_parts(state)
    return meta, {name: a.copy() for name, a in arrays.items()}


def from_replica(
    spec: ShardSpec, epoch: int, meta: dict[str, Any], arrays: Mapping[str, np.ndarray]
) -> ShardState:
    """Rebuild a shard from a base at `epoch` (the inverse of to_replica)."""
    meta, arrays = _legacy(meta, arrays)
    state = ShardState(
        spec, arrays[f"{DENSE}.params"], epoch=epoch, restored_version=meta["version"]
    )
    for name, table in state.tables.items():
        prefix = name + "."
        table.load(
            meta["tables"][name],
            {k[len(prefix) :]: a for k, a in arrays.items() if k.startswith(prefix)},
        )
    state.version = meta["version"]
    state.log.recovered(meta["version"], [])
    state.log.base_saved(meta["version"])
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
        state.replay(entry.position, _legacy(entry.meta, entry.arrays)[1])
    if log.entries:
        _restore_tables(state, log.entries[-1].meta)
    state.restored_version = state.version
    state.recovered = {
        "base_version": log.base_version,
        "entries": len(log.entries),
        "replay_s": time.perf_counter() - started,
    }
    # The log a compaction would now cover, costed with the step time the replay measured.
    state.log.recovered(state.version, log.entries)
    state.rebase_invariants()
    return state


def _legacy(
    meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A replica's meta and arrays in today's naming: one written before tables existed (no
    membership recorded) held only the dense slice, its arrays unprefixed and its optimizer
    scalars at the top of the meta."""
    if "membership" in meta:
        return dict(meta), dict(arrays)
    renamed = {f"{DENSE}.{name}": a for name, a in arrays.items()}
    out = dict(meta)
    if "optimizer_scalars" in out:
        out["tables"] = {DENSE: {"optimizer_scalars": out.pop("optimizer_scalars")}}
    return out, renamed


def _restore_tables(state: ShardState, meta: Mapping[str, Any]) -> None:
    if meta["version"] != state.version:
        raise StoreError(
            f"shard {state.spec.shard_id}: recorded tables are of version {meta['version']}, "
            f"the state is at {state.version}"
        )
    state.workers.load_meta(meta)
    state.revision = meta["revision"]
    state.stats = Stats(**meta["stats"])
    state.applied_tables = state.record()
    state.rebase_invariants()

"""Replicated shard state as stored data: a head record plus chunks (DESIGN §5).

A snapshot's arrays are split into chunks of at most `chunk_bytes` (well under MongoDB's 16 MiB
document limit); the head record names the complete (epoch, version) to read and the manifest of
its arrays, and is switched in one atomic write after every chunk is in place. A reader that
follows the head therefore never sees a torn state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from tether.store.base import StoreError

DEFAULT_STATE_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class ShardSnapshot:
    run_id: str
    shard_id: int
    epoch: int  # the writer's epoch
    version: int  # shard version (optimizer steps applied) this state is at
    meta: dict[str, Any]  # small JSON: clock table, de-dup table, stats...
    arrays: dict[str, np.ndarray]  # name -> 1-D array


def manifest_of(arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    return [
        {"name": name, "dtype": a.dtype.str, "size": int(a.size)}
        for name, a in sorted(arrays.items())
    ]


def chunks_of(arrays: dict[str, np.ndarray], chunk_bytes: int) -> Iterator[tuple[str, int, Any]]:
    """(array name, chunk index, bytes-like view) for every chunk, without copying."""
    for name, a in sorted(arrays.items()):
        if a.ndim != 1:
            raise ValueError(f"state array {name!r} must be 1-D, got shape {a.shape}")
        raw = np.ascontiguousarray(a).view(np.uint8).data  # a memoryview: no copy
        if len(raw) == 0:
            yield name, 0, b""
        for idx, start in enumerate(range(0, len(raw), chunk_bytes)):
            yield name, idx, raw[start : start + chunk_bytes]


def assemble(
    manifest: list[dict[str, Any]], chunks: dict[str, list[bytes]], what: str
) -> dict[str, np.ndarray]:
    """Rebuild the arrays from their chunks (in index order); a missing byte is an error."""
    arrays = {}
    for entry in manifest:
        dtype = np.dtype(entry["dtype"])
        out = np.empty(entry["size"], dtype=dtype)
        buf = out.view(np.uint8)
        filled = 0
        for data in chunks.get(entry["name"], []):
            buf[filled : filled + len(data)] = np.frombuffer(data, dtype=np.uint8)
            filled += len(data)
        if filled != buf.size:
            raise StoreError(
                f"{what}: array {entry['name']!r} has {filled} of {buf.size} bytes (torn state)"
            )
        arrays[entry["name"]] = out
    return arrays

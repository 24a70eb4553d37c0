"""Which records a worker reads, and which of them make the mini-batch of a clock.

A worker owns a fixed slice of the training set -- the strided :func:`partition` of the
built-in data sets, or the contiguous :func:`record_range` of a dataset in the store -- and
draws its mini-batch for clock c with :func:`batch_indices`, a pure function of (seed, worker
id, clock). That purity is what lets a restarted worker reposition its data cursor from the
clock it reads back from the shards, with no cursor state of its own (DESIGN §5, worker
recovery).
"""

from __future__ import annotations

import functools
import operator

import numpy as np


def _checked_int(name: str, value: int, minimum: int) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}.") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}.")
    return number


def partition(n: int, num_workers: int, worker_id: int) -> np.ndarray:
    """Sorted int64 indices i in [0, n) with i % num_workers == worker_id: this worker's slice."""
    n = _checked_int("n", n, 0)
    num_workers = _checked_int("num_workers", num_workers, 1)
    worker_id = _checked_int("worker_id", worker_id, 0)
    if worker_id >= num_workers:
        raise ValueError(f"worker_id must be < num_workers={num_workers}, got {worker_id}.")
    return np.arange(worker_id, n, num_workers, dtype=np.int64)


def batches_per_epoch(part_size: int, batch_size: int) -> int:
    """Full batches in one pass over a partition; the remainder is left out of that epoch."""
    batch_size = _checked_int("batch_size", batch_size, 1)
    count = part_size // batch_size
    if count < 1:
        raise ValueError(
            f"batch_size {batch_size} is larger than this worker's partition of {part_size} "
            "samples; use a smaller batch size or fewer workers."
        )
    return count


def batch_indices(
    part: np.ndarray, batch_size: int, seed: int, worker_id: int, clock: int
) -> np.ndarray:
    """The data indices of the mini-batch for iteration `clock` (DESIGN §3, §5).

    A pure function of its arguments: epoch e = clock // batches_per_epoch is a permutation of
    `part` drawn from (seed, worker_id, e), and the batch is its k-th slice of `batch_size`.
    """
    part = np.asarray(part)
    if part.ndim != 1:
        raise ValueError(f"part must be a 1-D array of indices, got shape {part.shape}.")
    seed = _checked_int("seed", seed, 0)
    worker_id = _checked_int("worker_id", worker_id, 0)
    clock = _checked_int("clock", clock, 0)
    per_epoch = batches_per_epoch(len(part), batch_size)
    epoch, k = divmod(clock, per_epoch)
    perm = _epoch_permutation(seed, worker_id, epoch, len(part))
    return part[perm[k * batch_size : (k + 1) * batch_size]]


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, worker_id: int, epoch: int, size: int) -> np.ndarray:
    # Consecutive clocks share an epoch, so caching the permutation saves an O(n) shuffle per
    # step. The result is frozen because the cache hands the same array to every caller.
    perm = np.random.default_rng([seed, worker_id, epoch]).permutation(size)
    perm.setflags(write=False)
    return perm


def record_range(records: int, num_workers: int, worker_id: int) -> tuple[int, int]:
    """Worker ``worker_id``'s records ``[start, stop)``: ``num_workers`` contiguous ranges whose
    sizes differ by at most one, in worker order."""
    for what, value, low in (("num_workers", num_workers, 1), ("worker_id", worker_id, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{what} must be an int >= {low}; got {value!r}")
    if worker_id >= num_workers:
        raise ValueError(f"worker_id must be < num_workers={num_workers}; got {worker_id}")
    return records * worker_id // num_workers, records * (worker_id + 1) // num_workers

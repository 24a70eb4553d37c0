"""Input data kept in the store, as tasks read it (DESIGN §11).

``tether data import FILE --name NAME`` (or :func:`tether.data.import_file`) stores a ``.npz``,
``.jsonl`` or ``.csv`` file as a dataset (the layout: :mod:`tether.store.datasets`; the schema
rules: :mod:`tether.data.schema`). A task reads it with :class:`StoredDataset`::

    class Digits(tether.Task):
        data = tether.data.StoredDataset("digits")

        def batch(self, ctx, clock):
            b = self.data.batch(ctx, clock)   # {"x": float32 (B, 64), "y": int64 (B,)}
            return b["x"], b["y"]

Each worker reads only its own partition: the records are cut into ``ctx.num_workers``
contiguous, balanced ranges and worker ``w`` gets range ``w`` (:func:`record_range`) -- not the
strided slices of :func:`tether.data.batches.partition`, so that a worker reads only the chunks
that hold its records. A background thread, started at first use, reads them chunk by chunk;
``batch`` waits (with a deadline) only for the chunks its records are in. The batch of a clock
is :func:`tether.data.batches.batch_indices` over the partition: a pure function of
``(ctx.seed, ctx.worker_id, ctx.num_workers, clock)`` and the stored records, so it is the same
bits in every process and after every restart (DESIGN §3, §5). Because partitions are
contiguous, a file sorted by label gives each worker a few labels only: shuffle it first.
"""

from __future__ import annotations

import functools
import os
import random
import threading

import numpy as np

from tether.data.batches import batch_indices, record_range
from tether.retry import RetryPolicy, retry
from tether.store import Store, StoreError, StoreUnavailable, open_store
from tether.store.datasets import (
    DatasetInfo,
    Table,
    check_dataset_name,
    concat_tables,
    decode_chunk,
    slice_table,
)
from tether.tasks.api import TaskContext

# A read of the store that finds it briefly unavailable is tried again (STYLE §6).
_READ_RETRY = RetryPolicy(attempts=6, initial_s=0.1, max_s=2.0)


# -- reading records ---------------------------------------------------------------------------


def read_records(store: Store, info: DatasetInfo, start: int, stop: int) -> Table:
    """Records ``[start, stop)`` of the dataset ``info`` describes, read in one go."""
    c0, c1 = info.chunk_span(start, stop)
    parts = [decode_chunk(info.fields, c) for c in store.read_dataset_chunks(info, c0, c1)]
    whole = concat_tables(info.fields, parts)
    offset = info.chunk_starts[c0] if parts else 0
    return slice_table(whole, start - offset, stop - offset)


# -- what tasks use ----------------------------------------------------------------------------


class _Reader:
    """Records ``[start, stop)`` of one share of a dataset, read by a background thread chunk by
    chunk into preallocated arrays. One lock; no I/O while holding it; waiters sleep on its
    condition with a deadline (STYLE §6)."""

    def __init__(self, name: str, uri: str, parts: int, part: int, timeout_s: float) -> None:
        self.name, self.uri, self.parts, self.part = name, uri, parts, part
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self.info: DatasetInfo | None = None
        self.start = self.stop = 0
        self.table: Table | None = None
        self.positions = np.zeros(0, dtype=np.int64)  # 0..stop-start-1, for batch_indices
        self._starts = np.zeros(0, dtype=np.int64)  # first record of each of this share's chunks
        self._done = np.zeros(0, dtype=np.bool_)
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"tether-data-{name}-{part}of{parts}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        rng = random.Random()

        def again(error: BaseException) -> bool:
            return isinstance(error, StoreUnavailable)

        try:
            with retry(lambda: open_store(self.uri), _READ_RETRY, rng, again) as store:
                info = retry(lambda: store.dataset_info(self.name), _READ_RETRY, rng, again)
                start, stop = record_range(info.records, self.parts, self.part)
                c0, c1 = info.chunk_span(start, stop)
                n = stop - start
                columns, present = {}, {}
                for f in info.fields:
                    columns[f.name] = np.empty((n, *f.shape), dtype=f.dtype)
                    if f.nullable:
                        present[f.name] = np.empty(n, dtype=np.bool_)
                with self._cond:
                    self.info, self.start, self.stop = info, start, stop
                    self.table = Table(info.fields, columns, present)
                    self.positions = np.arange(n, dtype=np.int64)
                    self._starts = np.asarray(info.chunk_starts[c0:c1], dtype=np.int64)
                    self._done = np.zeros(c1 - c0, dtype=np.bool_)
                    self._cond.notify_all()
                for k, c in enumerate(range(c0, c1)):
                    chunks = retry(
                        functools.partial(store.read_dataset_chunks, info, c, c + 1),
                        _READ_RETRY,
                        rng,
                        again,
                    )
                    self._copy(decode_chunk(info.fields, chunks[0]), info.chunk_starts[c])
                    with self._cond:
                        self._done[k] = True
                        self._cond.notify_all()
        except BaseException as e:
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _copy(self, chunk: Table, first: int) -> None:
        """Copy the part of a decoded chunk that is in this share (outside the lock: the rows
        written are ones no waiter reads until the chunk is marked done)."""
        assert self.table is not None
        lo, hi = max(first, self.start), min(first + chunk.records, self.stop)
        src, dst = slice(lo - first, hi - first), slice(lo - self.start, hi - self.start)
        for name, values in chunk.columns.items():
            self.table.columns[name][dst] = values[src]
        for name, mask in chunk.present.items():
            self.table.present[name][dst] = mask[src]

    def wait(self, positions: np.ndarray | None, what: str) -> DatasetInfo:
        """Wait for the header and the chunks that hold ``positions`` (share-relative record
        numbers; None: only the header; all of them: ``self.positions``)."""

        def ready() -> bool:
            if self._error is not None:
                return True
            if self.info is None:
                return False
            if positions is None:
                return True
            if len(positions) == len(self.positions):
                return bool(self._done.all())
            chunks = np.searchsorted(self._starts, positions + self.start, side="right") - 1
            return bool(self._done[chunks].all())

        with self._cond:
            ok = self._cond.wait_for(ready, self.timeout_s)
            if self._error is not None:
                error = self._error
                if isinstance(error, StoreError | ValueError):
                    raise error
                raise StoreError(
                    f"reading dataset {self.name!r} from store {self.uri} failed: {error!r}"
                ) from error
            if not ok:
                done = int(self._done.sum())
                raise TimeoutError(
                    f"dataset {self.name!r} from store {self.uri}: {what} not read within "
                    f"{self.timeout_s:g}s ({done} of {len(self._done)} chunks of records "
                    f"[{self.start}, {self.stop}) read so far)"
                )
            assert self.info is not None
            return self.info


def _read_only(table: Table) -> dict[str, np.ndarray]:
    out = {}
    for name, array in table.arrays().items():
        view = array.view()
        view.flags.writeable = False
        out[name] = view
    return out


class StoredDataset:
    """A dataset in the store, as a task reads it (see the module docstring).

    Constructing one does no I/O (a task is built in every process). On first use with a
    :class:`tether.tasks.api.TaskContext` it opens ``store`` if given, else ``ctx.store_uri``,
    and a background thread reads this worker's partition. Every method returns numpy arrays
    of the schema's dtypes, keyed by field, plus ``NAME?`` (bool, True where the record has a
    value) for each nullable field. A wait longer than ``timeout_s`` raises TimeoutError; a
    failed read raises the store's error (:class:`tether.store.UnknownDataset` names the
    datasets the store holds).
    """

    def __init__(self, name: str, *, store: str | None = None, timeout_s: float = 600.0) -> None:
        self.name = check_dataset_name(name)
        if store is not None and not isinstance(store, str):
            raise TypeError(f"store must be a store URI (a string); got {type(store).__name__}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0; got {timeout_s!r}")
        self.store = store
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()
        self._readers: dict[tuple[str, int, int], _Reader] = {}
        self._pid = os.getpid()

    def __repr__(self) -> str:
        where = f", store={self.store!r}" if self.store is not None else ""
        return f"StoredDataset({self.name!r}{where})"

    def _reader(self, ctx: TaskContext, whole: bool) -> _Reader:
        uri = self.store or ctx.store_uri
        if not uri:
            raise ValueError(
                f"{self!r} has no store to read from: ctx.store_uri is empty; pass "
                "store=URI to StoredDataset"
            )
        parts, part = (1, 0) if whole else (ctx.num_workers, ctx.worker_id)
        record_range(0, parts, part)  # check them here, not in the reading thread
        key = (uri, parts, part)
        with self._lock:
            if os.getpid() != self._pid:  # threads do not survive a fork: read again
                self._readers, self._pid = {}, os.getpid()
            reader = self._readers.get(key)
            if reader is None:
                reader = self._readers[key] = _Reader(self.name, uri, parts, part, self.timeout_s)
        return reader

    def info(self, ctx: TaskContext) -> DatasetInfo:
        """The dataset's header (name, records, fields, chunks, bytes, created, source)."""
        return self._reader(ctx, whole=False).wait(None, "the header")

    def batch(self, ctx: TaskContext, clock: int, size: int | None = None) -> dict[str, np.ndarray]:
        """The mini-batch of ``clock``: ``size`` (default ``ctx.batch_size``) records of this
        worker's partition, drawn by :func:`tether.data.batches.batch_indices`; new arrays."""
        reader = self._reader(ctx, whole=False)
        reader.wait(None, "the header")
        size = ctx.batch_size if size is None else size
        local = batch_indices(reader.positions, size, ctx.seed, ctx.worker_id, clock)
        reader.wait(local, f"the records of clock {clock}")
        assert reader.table is not None
        return {name: array[local] for name, array in reader.table.arrays().items()}

    def partition(self, ctx: TaskContext) -> dict[str, np.ndarray]:
        """Every record of this worker's partition (read-only arrays)."""
        reader = self._reader(ctx, whole=False)
        reader.wait(None, "the header")
        reader.wait(reader.positions, "the partition")
        assert reader.table is not None
        return _read_only(reader.table)

    def all(self, ctx: TaskContext) -> dict[str, np.ndarray]:
        """Every record of the dataset (read-only arrays), e.g. for the driver's evaluation."""
        reader = self._reader(ctx, whole=True)
        reader.wait(None, "the header")
        reader.wait(reader.positions, "the dataset")
        assert reader.table is not None
        return _read_only(reader.table)

    def __len__(self) -> int:
        """The number of records: known after any use with a context; with ``store=`` the
        header is read now if it was not yet."""
        with self._lock:
            known = [r.info for r in self._readers.values() if r.info is not None]
        if known:
            return known[0].records
        if self.store is None:
            raise ValueError(
                f"len({self!r}) needs its store: use it with a context first (ds.info(ctx)) "
                "or pass store=URI"
            )
        with open_store(self.store) as store:
            return store.dataset_info(self.name).records

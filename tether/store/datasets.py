"""Input data in the store: the schema and the chunk codec (DESIGN §11).

A dataset is store-wide, keyed by its name (not per run): a *header* (name, number of records,
schema, chunk count, chunk starts, bytes, created time, source file) and the *chunks* of its
records. Chunk ``i`` holds ``count`` consecutive records from record ``first`` as a tuple of
buffers: the raw little-endian bytes of every field's values, in schema order (``count ×
per-record shape`` items of the field's dtype; a text field's values are one UTF-8 JSON list),
then one mask per nullable field, in schema order (one byte per record: 1 where the record has a
value). A chunk holds at most ``chunk_records`` records and about ``chunk_bytes`` bytes (a single
record may take a chunk of its own, up to :data:`MAX_DATASET_CHUNK_BYTES`: MongoDB's documents
are at most 16 MiB).

Nothing here does I/O or knows a backend: the backends store what :class:`ChunkTally` checked,
and readers decode with :func:`decode_chunk`. How a file's records become the columns of a
:class:`Table` (schema inference) is the data package's: :mod:`tether.data.schema`.
"""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The sizes of shard-state chunks (tether.store.base), which this module sits below.
DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_CHUNK_RECORDS = 65536
# A chunk is one MongoDB document (16 MiB at most) or one SQLite BLOB: half the document limit.
MAX_DATASET_CHUNK_BYTES = 8 << 20
MASK_SUFFIX = "?"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The dtype kinds a field may have besides text ("U"): numbers and booleans.
NUMERIC_KINDS = "biufc"


# -- the header and the chunks ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a dataset: its numpy dtype (little-endian ``str``, e.g. ``<f4``, ``<U12``),
    its per-record shape, and whether some records lack it."""

    name: str
    dtype: str
    shape: tuple[int, ...] = ()
    nullable: bool = False

    @property
    def is_text(self) -> bool:
        return np.dtype(self.dtype).kind == "U"

    @property
    def type_name(self) -> str:
        """``float32``, ``int64``, ``bool``, ``str``...: the name shown to users."""
        return "str" if self.is_text else np.dtype(self.dtype).name

    @property
    def record_bytes(self) -> int:
        """Bytes of one record's values (text: 0, its size varies)."""
        return 0 if self.is_text else np.dtype(self.dtype).itemsize * math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.type_name,
            "shape": list(self.shape),
            "nullable": self.nullable,
        }

    def to_stored(self) -> dict[str, Any]:
        return {**self.to_json(), "dtype": self.dtype}

    @classmethod
    def from_stored(cls, doc: Mapping[str, Any]) -> FieldSpec:
        shape = tuple(int(d) for d in doc["shape"])
        return cls(str(doc["name"]), str(doc["dtype"]), shape, bool(doc["nullable"]))


@dataclass(frozen=True, slots=True)
class DatasetChunk:
    """Records ``[first, first + count)`` of a dataset, as chunk ``index`` (module docstring)."""

    index: int
    first: int
    count: int
    buffers: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.buffers)


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    """A dataset's header, as published in the store."""

    name: str
    records: int
    fields: tuple[FieldSpec, ...]
    chunks: int
    chunk_starts: tuple[int, ...]  # the first record of every chunk
    nbytes: int  # bytes of every chunk's buffers
    created_at: float  # unix time of the import (store-side clock)
    source: str  # the file it was imported from (its name), or ""
    import_id: str  # which import's chunks this header publishes

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "records": self.records,
            "fields": [f.to_json() for f in self.fields],
            "chunks": self.chunks,
            "nbytes": self.nbytes,
            "created_at": self.created_at,
            "source": self.source,
        }

    def chunk_span(self, start: int, stop: int) -> tuple[int, int]:
        """The chunks ``[c0, c1)`` that hold records ``[start, stop)`` (empty if start == stop)."""
        if not 0 <= start <= stop <= self.records:
            raise ValueError(
                f"records [{start}, {stop}) are outside dataset {self.name!r} of "
                f"{self.records} records"
            )
        if start == stop:
            return 0, 0
        starts = np.asarray(self.chunk_starts, dtype=np.int64)
        c0 = int(np.searchsorted(starts, start, side="right")) - 1
        c1 = int(np.searchsorted(starts, stop - 1, side="right"))
        return c0, c1


def check_dataset_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"a dataset name is 1 to 128 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit; got {name!r}"
        )
    return name


def check_fields(fields: Sequence[FieldSpec]) -> tuple[FieldSpec, ...]:
    """``fields`` as a tuple, after checking each one; ValueError naming the first bad one."""
    out = tuple(fields)
    if not out:
        raise ValueError("a dataset needs at least one field")
    names = set()
    for f in out:
        if not isinstance(f, FieldSpec):
            raise TypeError(f"expected FieldSpec values; got {type(f).__name__}")
        if not isinstance(f.name, str) or not f.name:
            raise ValueError(f"field names must be non-empty strings; got {f.name!r}")
        if f.name in names:
            raise ValueError(f"field {f.name!r} appears twice")
        names.add(f.name)
        try:
            dtype = np.dtype(f.dtype)
        except TypeError:
            raise ValueError(f"field {f.name!r} has an unknown dtype {f.dtype!r}") from None
        if dtype.kind not in NUMERIC_KINDS + "U" or dtype.fields is not None:
            raise ValueError(f"field {f.name!r} has dtype {dtype}, which a dataset cannot hold")
        if dtype.str != f.dtype or dtype.byteorder == ">":
            raise ValueError(f"field {f.name!r}: dtype must be little-endian {dtype.str!r} form")
        if not isinstance(f.shape, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in f.shape
        ):
            raise ValueError(f"field {f.name!r}: shape must be a tuple of ints >= 0; {f.shape!r}")
    for f in out:
        if f.nullable and f.name + MASK_SUFFIX in names:
            raise ValueError(
                f"field {f.name!r} is nullable, so its mask {f.name + MASK_SUFFIX!r} would clash "
                "with the field of that name; rename one"
            )
    return out


def _buffer_count(fields: Sequence[FieldSpec]) -> int:
    return len(fields) + sum(f.nullable for f in fields)


class ChunkTally:
    """Checks a stream of chunks against a schema and sums up the header (DESIGN §11).

    Backends call :meth:`add` on every chunk before they store it: chunks must come in order,
    record after record, with buffers of exactly the schema's sizes, each at most
    :data:`MAX_DATASET_CHUNK_BYTES`; else ValueError.
    """

    def __init__(self, name: str, fields: Sequence[FieldSpec]) -> None:
        self.name = check_dataset_name(name)
        self.fields = check_fields(fields)
        self.records = 0
        self.nbytes = 0
        self.starts: list[int] = []

    def add(self, chunk: DatasetChunk) -> DatasetChunk:
        what = f"dataset {self.name!r}: chunk {len(self.starts)}"
        if not isinstance(chunk, DatasetChunk):
            raise TypeError(f"{what}: expected a DatasetChunk; got {type(chunk).__name__}")
        if (chunk.index, chunk.first) != (len(self.starts), self.records):
            raise ValueError(
                f"{what}: chunks must come in order: expected index {len(self.starts)} from "
                f"record {self.records}, got index {chunk.index} from record {chunk.first}"
            )
        if chunk.count < 1:
            raise ValueError(f"{what} holds {chunk.count} records; a chunk holds at least one")
        if len(chunk.buffers) != _buffer_count(self.fields):
            raise ValueError(
                f"{what} has {len(chunk.buffers)} buffers; the schema needs "
                f"{_buffer_count(self.fields)}"
            )
        for f, buf in zip(self.fields, chunk.buffers, strict=False):
            if not f.is_text and len(buf) != chunk.count * f.record_bytes:
                raise ValueError(
                    f"{what}: field {f.name!r} has {len(buf)} bytes, not "
                    f"{chunk.count * f.record_bytes} ({chunk.count} records)"
                )
        for buf in chunk.buffers[len(self.fields) :]:
            if len(buf) != chunk.count:
                raise ValueError(f"{what}: a mask has {len(buf)} bytes, not {chunk.count}")
        if chunk.nbytes > MAX_DATASET_CHUNK_BYTES:
            raise ValueError(
                f"{what} is {chunk.nbytes} bytes; a chunk is at most {MAX_DATASET_CHUNK_BYTES}"
            )
        self.starts.append(chunk.first)
        self.records += chunk.count
        self.nbytes += chunk.nbytes
        return chunk

    def info(self, *, created_at: float, source: str, import_id: str) -> DatasetInfo:
        """The header of the chunks added; ValueError if there were none."""
        if not self.records:
            raise ValueError(f"dataset {self.name!r} has no records; a dataset needs at least one")
        return DatasetInfo(
            name=self.name,
            records=self.records,
            fields=self.fields,
            chunks=len(self.starts),
            chunk_starts=tuple(self.starts),
            nbytes=self.nbytes,
            created_at=created_at,
            source=source,
            import_id=import_id,
        )


def new_import_id() -> str:
    """A fresh id for one import's chunks: no two imports share one, so a new import never
    writes over the chunks a header points at."""
    return uuid.uuid4().hex


def stored_header(info: DatasetInfo) -> dict[str, Any]:
    """The header as the backends store it (JSON values)."""
    return {
        "name": info.name,
        "import_id": info.import_id,
        "records": info.records,
        "fields": [f.to_stored() for f in info.fields],
        "chunks": info.chunks,
        "chunk_starts": list(info.chunk_starts),
        "nbytes": info.nbytes,
        "created_at": info.created_at,
        "source": info.source,
    }


def header_from_stored(doc: Mapping[str, Any]) -> DatasetInfo:
    return DatasetInfo(
        name=str(doc["name"]),
        records=int(doc["records"]),
        fields=tuple(FieldSpec.from_stored(f) for f in doc["fields"]),
        chunks=int(doc["chunks"]),
        chunk_starts=tuple(int(s) for s in doc["chunk_starts"]),
        nbytes=int(doc["nbytes"]),
        created_at=float(doc["created_at"]),
        source=str(doc["source"]),
        import_id=str(doc["import_id"]),
    )


def check_chunk_range(info: DatasetInfo, first: int, last: int) -> None:
    if not isinstance(info, DatasetInfo):
        raise TypeError(f"expected the DatasetInfo of a dataset; got {type(info).__name__}")
    for value in (first, last):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"chunk indices must be ints; got {value!r}")
    if not 0 <= first <= last <= info.chunks:
        raise ValueError(
            f"chunks [{first}, {last}) are outside dataset {info.name!r}'s {info.chunks} chunks"
        )


def torn_read(info: DatasetInfo, first: int, last: int, chunks: list[DatasetChunk]) -> str | None:
    """None if ``chunks`` are exactly chunks ``first..last-1`` of ``info``; else why not (the
    import was replaced or deleted under the reader), for the backend's StoreError."""
    expected = [(i, info.chunk_starts[i]) for i in range(first, last)]
    if [(c.index, c.first) for c in chunks] == expected:
        return None
    return (
        f"dataset {info.name!r} was replaced or deleted while it was read (chunks {first} to "
        f"{last - 1} of the import read are not all there); read it again"
    )


def pack_buffers(buffers: Sequence[bytes]) -> bytes:
    """One BLOB of a chunk's buffers: their count and lengths (uint64, little-endian), then them."""
    head = struct.pack(f"<{len(buffers) + 1}Q", len(buffers), *(len(b) for b in buffers))
    return b"".join([head, *buffers])


def unpack_buffers(blob: bytes) -> tuple[bytes, ...]:
    view = memoryview(blob)
    (n,) = struct.unpack_from("<Q", view, 0)
    lengths = struct.unpack_from(f"<{n}Q", view, 8)
    out, offset = [], 8 * (n + 1)
    for length in lengths:
        out.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise ValueError(f"a stored chunk has {len(view) - offset} bytes after its buffers")
    return tuple(out)


# -- columns: a dataset held in memory --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Table:
    """A dataset's records as columns: one array per field, ``(records, *shape)``, and for each
    nullable field a bool array, True where the record has a value."""

    fields: tuple[FieldSpec, ...]
    columns: dict[str, np.ndarray]
    present: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return len(self.columns[self.fields[0].name])

    def arrays(self) -> dict[str, np.ndarray]:
        """The columns and, under ``NAME?``, the masks: what a reader of the dataset gets."""
        return self.columns | {n + MASK_SUFFIX: m for n, m in self.present.items()}


# -- chunks of a table, and back --------------------------------------------------------------


def _text_bytes(values: np.ndarray) -> bytes:
    return json.dumps(values.tolist(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def chunk_bounds(
    table: Table, chunk_bytes: int = DEFAULT_CHUNK_BYTES, chunk_records: int = DEFAULT_CHUNK_RECORDS
) -> list[tuple[int, int]]:
    """``(first, count)`` of every chunk: at most ``chunk_records`` records and, unless one
    record alone is larger, at most ``chunk_bytes`` bytes; ValueError for a record larger than
    :data:`MAX_DATASET_CHUNK_BYTES`."""
    for value, name, top in (
        (chunk_bytes, "chunk_bytes", MAX_DATASET_CHUNK_BYTES),
        (chunk_records, "chunk_records", None),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if top is not None and value > top:
            raise ValueError(f"{name} must be at most {top} (MongoDB's documents are 16 MiB)")
    n = table.records
    sizes = np.full(n, sum(f.record_bytes + f.nullable for f in table.fields), dtype=np.int64)
    for f in table.fields:
        if f.is_text:  # the record's share of the JSON list: its items and a separator
            col = table.columns[f.name]
            sizes += np.fromiter((len(_text_bytes(col[i])) + 1 for i in range(n)), np.int64, n)
    big = np.flatnonzero(sizes + 64 > MAX_DATASET_CHUNK_BYTES)
    if big.size:
        raise ValueError(
            f"record {int(big[0])} is {int(sizes[big[0]])} bytes; a chunk holds at most "
            f"{MAX_DATASET_CHUNK_BYTES} bytes, so no record may be larger"
        )
    ends = np.cumsum(sizes)
    bounds, first = [], 0
    while first < n:
        # The most records from `first` that fit: a binary search on the running total.
        budget = (int(ends[first - 1]) if first else 0) + chunk_bytes
        fit = int(np.searchsorted(ends, budget, side="right")) - first
        count = min(max(1, fit), chunk_records)
        bounds.append((first, count))
        first += count
    return bounds


def table_chunks(
    table: Table, chunk_bytes: int = DEFAULT_CHUNK_BYTES, chunk_records: int = DEFAULT_CHUNK_RECORDS
) -> Iterator[DatasetChunk]:
    """The chunks of ``table`` (module docstring), made one at a time as they are stored."""
    for index, (first, count) in enumerate(chunk_bounds(table, chunk_bytes, chunk_records)):
        rows = slice(first, first + count)
        buffers = [
            _text_bytes(table.columns[f.name][rows])
            if f.is_text
            else np.ascontiguousarray(table.columns[f.name][rows], dtype=f.dtype).tobytes()
            for f in table.fields
        ]
        buffers += [
            table.present[f.name][rows].astype(np.uint8).tobytes()
            for f in table.fields
            if f.nullable
        ]
        yield DatasetChunk(index, first, count, tuple(buffers))


def decode_chunk(fields: Sequence[FieldSpec], chunk: DatasetChunk) -> Table:
    """The records of one stored chunk as a table of new, writable arrays."""
    columns, present = {}, {}
    for f, buf in zip(fields, chunk.buffers, strict=False):
        if f.is_text:
            values = np.array(json.loads(buf.decode("utf-8")), dtype=f.dtype)
        else:
            values = np.frombuffer(buf, dtype=f.dtype).copy()
        columns[f.name] = values.reshape(chunk.count, *f.shape)
    masks = iter(chunk.buffers[len(fields) :])
    for f in fields:
        if f.nullable:
            present[f.name] = np.frombuffer(next(masks), dtype=np.uint8).astype(np.bool_)
    return Table(tuple(fields), columns, present)


def concat_tables(fields: tuple[FieldSpec, ...], parts: Sequence[Table]) -> Table:
    """One table of the records of ``parts``, in order (empty arrays if there are none)."""
    columns, present = {}, {}
    for f in fields:
        if parts:
            columns[f.name] = np.concatenate([p.columns[f.name] for p in parts])
        else:
            columns[f.name] = np.zeros((0, *f.shape), dtype=f.dtype)
        if f.nullable:
            masks = [p.present[f.name] for p in parts]
            present[f.name] = np.concatenate(masks) if masks else np.zeros(0, dtype=np.bool_)
    return Table(fields, columns, present)


def slice_table(table: Table, start: int, stop: int) -> Table:
    rows = slice(start, stop)
    return Table(
        table.fields,
        {k: v[rows] for k, v in table.columns.items()},
        {k: v[rows] for k, v in table.present.items()},
    )

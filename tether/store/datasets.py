"""Input data in the store: the schema, the chunk codec and schema inference (DESIGN §11).

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
and readers decode with :func:`decode_chunk`. How records become columns:

- numbers: ``int64`` if every value of the field is an integer, else ``float32``; ``true``/
  ``false``: ``bool``; text: ``str`` (numpy ``<U`` of the longest value);
- lists (nested to any depth) of numbers, booleans or text of one fixed shape: an array field of
  that per-record shape;
- a field that some records lack (or hold ``null`` in) is *nullable*: its values there are NaN
  (floats), 0 (integers), False or "" and the field ``NAME?`` (:data:`MASK_SUFFIX`) is a bool
  array, True where the record has a value. So fields that only later records have are kept.
- a value that does not fit (a text among numbers, a list of another length, an object, an
  integer past int64, a float past float32) is a ValueError naming the record and the field.
"""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
_NUMERIC_KINDS = "biufc"
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT64 = (-(2**63), 2**63 - 1)


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
        if dtype.kind not in _NUMERIC_KINDS + "U" or dtype.fields is not None:
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


def table_from_arrays(arrays: Mapping[str, np.ndarray], what: str) -> Table:
    """A table of named arrays that share their first dimension (the records), e.g. an .npz."""
    if not arrays:
        raise ValueError(f"{what} holds no arrays")
    fields, columns, n = [], {}, None
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.ndim == 0:
            raise ValueError(
                f"{what}: array {name!r} is a scalar; every array needs a first dimension of "
                "records"
            )
        if n is None:
            n, first = len(a), name
        elif len(a) != n:
            raise ValueError(
                f"{what}: array {name!r} has {len(a)} records (first dimension), but array "
                f"{first!r} has {n}; every array needs the same number"
            )
        if a.dtype.kind not in _NUMERIC_KINDS + "U" or a.dtype.fields is not None:
            hint = "; store text as str, not bytes" if a.dtype.kind == "S" else ""
            raise ValueError(
                f"{what}: array {name!r} has dtype {a.dtype}, not numbers or text{hint}"
            )
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dtype.kind == "U":
            dtype = np.dtype(f"<U{max(1, dtype.itemsize // 4)}")
        columns[name] = np.ascontiguousarray(a, dtype=dtype)
        fields.append(FieldSpec(name, np.dtype(dtype).str, tuple(a.shape[1:])))
    if not n:
        raise ValueError(f"{what} holds no records (its arrays' first dimension is 0)")
    return Table(check_fields(fields), columns)


@dataclass
class _Seen:
    """What pass one learned of a field: kind ('b', 'i', 'f', 'U', or '' for only empty
    lists), shape, longest text, the records that have it."""

    first: int  # the first record that has the field
    first_label: str
    kind: str
    shape: tuple[int, ...]
    width: int = 1
    present: int = 0
    int_overflow: str | None = None  # the first record with an integer past int64


def _value_kind(value: Any) -> tuple[str, tuple[int, ...], list[Any]]:
    """(kind, shape, leaves) of a JSON value; kind '' for a nest of empty lists."""
    if isinstance(value, list):
        if not value:
            return "", (0,), []
        parts = [_value_kind(v) for v in value]
        shapes = {p[1] for p in parts}
        if len(shapes) != 1:
            raise ValueError("is a ragged list (its items have different lengths)")
        kinds = {p[0] for p in parts} - {""}
        if len(kinds) > 1 and not kinds <= {"i", "f"}:
            raise ValueError("is a list that mixes numbers, booleans and text")
        kind = "f" if kinds == {"i", "f"} else (kinds.pop() if kinds else "")
        return kind, (len(value), *shapes.pop()), [leaf for p in parts for leaf in p[2]]
    if isinstance(value, bool):
        return "b", (), [value]
    if isinstance(value, int):
        return "i", (), [value]
    if isinstance(value, float):
        return "f", (), [value]
    if isinstance(value, str):
        return "U", (), [value]
    if isinstance(value, dict):
        raise ValueError("is an object; nested objects are not supported (flatten them)")
    if value is None:
        raise ValueError("holds null inside a list; only a whole value may be null (missing)")
    raise ValueError(f"is a {type(value).__name__}, not a number, boolean, text or list")


def _merge_kind(seen: _Seen, kind: str) -> str | None:
    """The field's kind after a value of ``kind``, or None if the two do not mix."""
    if not kind or kind == seen.kind or not seen.kind:
        return seen.kind or kind
    if {seen.kind, kind} == {"i", "f"}:
        return "f"
    return None


_KIND_NAMES = {"b": "a boolean", "i": "a number", "f": "a number", "U": "text", "": "empty lists"}
_KIND_DTYPES = {"b": "|b1", "i": "<i8", "f": "<f4", "": "<f4"}


def table_from_records(
    records: Callable[[], Iterable[tuple[str, Mapping[str, Any]]]], what: str
) -> Table:
    """Columns of JSON-like records, read twice: ``records()`` yields ``(label, record)`` (the
    label, e.g. ``"line 7"``, goes into messages) the same way each time it is called.

    Pass one infers the schema (module docstring) and checks every value; pass two fills
    preallocated arrays. Fields are in the order they first appear.
    """
    seen: dict[str, _Seen] = {}
    nulls: dict[str, str] = {}  # a field seen as null -> the first record it was null in
    n = 0
    for label, rec in records():
        where = f"{what}: record {n} ({label})"
        if not isinstance(rec, Mapping):
            raise ValueError(f"{where} is a {type(rec).__name__}, not an object of fields")
        for name, value in rec.items():
            if value is None:
                nulls.setdefault(name, f"record {n} ({label})")
                continue
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: field names must be non-empty text; got {name!r}")
            try:
                kind, shape, leaves = _value_kind(value)
            except ValueError as e:
                raise ValueError(f"{where}: field {name!r} {e}") from None
            s = seen.get(name)
            if s is None:
                s = seen[name] = _Seen(n, label, kind, shape)
            merged = _merge_kind(s, kind)
            if merged is None or shape != s.shape:
                was = f"{_KIND_NAMES[s.kind]} of shape {s.shape}"
                got = f"{_KIND_NAMES[kind]} of shape {shape}"
                raise ValueError(
                    f"{where}: field {name!r} is {got}, but record {s.first} ({s.first_label}) "
                    f"made it {was}"
                )
            s.kind = merged
            s.present += 1
            _check_leaves(s, kind, leaves, where, name, label, n)
        n += 1
    if not n:
        raise ValueError(f"{what} holds no records")
    for name, where in nulls.items():
        if name not in seen:  # no value to take a type from
            raise ValueError(
                f"{what}: field {name!r} is null in every record that has it (first {where}); "
                "give it a value somewhere or leave it out"
            )
    fields = []
    for name, s in seen.items():
        if s.kind == "i" and s.int_overflow is not None:
            raise ValueError(
                f"{what}: record {s.int_overflow}: field {name!r} holds an integer that does "
                "not fit in int64"
            )
        dtype = f"<U{s.width}" if s.kind == "U" else _KIND_DTYPES[s.kind]
        fields.append(FieldSpec(name, np.dtype(dtype).str, s.shape, s.present < n))
    if not fields:
        raise ValueError(f"{what}: no record has a field with a value")
    checked = check_fields(fields)
    return _fill(checked, records, n, what)


def _check_leaves(
    s: _Seen, kind: str, leaves: list[Any], where: str, name: str, label: str, index: int
) -> None:
    if kind == "U":
        for text in leaves:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{where}: field {name!r} holds text that is not UTF-8") from None
            s.width = max(s.width, len(text))
    elif kind in "if":
        for v in leaves:
            if isinstance(v, int):
                if s.int_overflow is None and not _INT64[0] <= v <= _INT64[1]:
                    s.int_overflow = f"{index} ({label})"
            elif math.isfinite(v) and abs(v) > _FLOAT32_MAX:
                raise ValueError(f"{where}: field {name!r} holds {v!r}, beyond float32's range")


def _fill(
    fields: tuple[FieldSpec, ...],
    records: Callable[[], Iterable[tuple[str, Mapping[str, Any]]]],
    n: int,
    what: str,
) -> Table:
    columns: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    for f in fields:
        dtype = np.dtype(f.dtype)
        # Where a record has no value: NaN for floats, 0, False or "" otherwise.
        fill: Any = np.nan if dtype.kind == "f" else ("" if dtype.kind == "U" else 0)
        columns[f.name] = np.full((n, *f.shape), fill, dtype=dtype)
        if f.nullable:
            present[f.name] = np.zeros(n, dtype=np.bool_)
    count = 0
    for i, (_label, rec) in enumerate(records()):
        count += 1
        if i >= n:
            break
        for f in fields:
            value = rec.get(f.name)
            if value is None:
                continue
            columns[f.name][i] = value
            if f.nullable:
                present[f.name][i] = True
    if count != n:
        raise ValueError(f"{what} changed while it was read ({n} records, then {count})")
    return Table(fields, columns, present)


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

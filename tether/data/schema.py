"""Schema inference: a file's records or arrays as the columns of a dataset (DESIGN §11).

This is import, not storage: the store keeps what :mod:`tether.store.datasets` lays out, and
this module decides what a ``.jsonl``/``.csv`` file's records or an ``.npz``'s arrays become.
How records become columns:

- numbers: ``int64`` if every value of the field is an integer, else ``float32``; ``true``/
  ``false``: ``bool``; text: ``str`` (numpy ``<U`` of the longest value);
- lists (nested to any depth) of numbers, booleans or text of one fixed shape: an array field of
  that per-record shape;
- a field that some records lack (or hold ``null`` in) is *nullable*: its values there are NaN
  (floats), 0 (integers), False or "" and the field ``NAME?`` (``MASK_SUFFIX``) is a bool array,
  True where the record has a value. So fields that only later records have are kept.
- a value that does not fit (a text among numbers, a list of another length, an object, an
  integer past int64, a float past float32) is a ValueError naming the record and the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tether.store.datasets import NUMERIC_KINDS, FieldSpec, Table, check_fields

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT64 = (-(2**63), 2**63 - 1)


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
        if a.dtype.kind not in NUMERIC_KINDS + "U" or a.dtype.fields is not None:
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

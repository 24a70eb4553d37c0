"""Importing a file into the store as a dataset (DESIGN §11).

``tether data import FILE --name NAME`` (or :func:`import_file`) reads a ``.npz``, ``.jsonl`` or
``.csv`` file into columns (:func:`read_file`; the schema rules: :mod:`tether.data.schema`) and
stores them as dataset NAME chunk by chunk, all or nothing (the layout:
:mod:`tether.store.datasets`). A bad file or name is refused before the store is opened.
"""

from __future__ import annotations

import csv
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tether.data.schema import table_from_arrays, table_from_records
from tether.store import Store, open_store
from tether.store.datasets import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CHUNK_RECORDS,
    DatasetInfo,
    Table,
    check_dataset_name,
    table_chunks,
)

SUFFIXES = (".npz", ".jsonl", ".csv")
_INT_RE = re.compile(r"\s*[+-]?[0-9]+\s*")


# -- files to tables --------------------------------------------------------------------------


def read_file(path: str | Path) -> Table:
    """The records of a ``.npz`` (each array a field; all share their first dimension),
    ``.jsonl`` (one JSON object per line) or ``.csv`` (a header row; numbers parsed as numbers)
    file. ValueError naming the file, and the record and field where one does not fit."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        kind = f"a {suffix}" if suffix else "a suffix-less"
        raise ValueError(f"{path}: cannot import {kind} file; use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        if suffix == ".npz":
            return _read_npz(path)
        if suffix == ".jsonl":
            return table_from_records(lambda: _jsonl_records(path), str(path))
        return _read_csv(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise ValueError(f"{path} cannot be read: {e}") from None


def _read_npz(path: Path) -> Table:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not an .npz file: {e}") from None
    except ValueError as e:  # numpy refuses object arrays without allow_pickle
        raise ValueError(
            f"{path} holds Python objects (pickled arrays), which are not imported; save numbers "
            f"or text ({e})"
        ) from None
    return table_from_arrays(arrays, str(path))


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not JSON: {e.msg}") from None
            yield f"line {lineno}", record


def _is_float(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> Table:
    """A CSV file's columns: a column of integers is int64, of numbers float32, else text. An
    empty cell is a missing value in a number column and the empty string in a text one."""
    with path.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty; a CSV file needs a header row")
        for j, name in enumerate(header):
            if not name.strip():
                raise ValueError(f"{path}: column {j + 1} of the header has no name")
            if name in header[:j]:
                raise ValueError(f"{path}: the header names column {name!r} twice")
        kinds = ["i"] * len(header)
        valued = [False] * len(header)
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}: line {reader.line_num} has {len(row)} cells; the header has "
                    f"{len(header)}"
                )
            for j, cell in enumerate(row):
                if kinds[j] == "U" or not cell.strip():
                    continue
                valued[j] = True
                if kinds[j] == "i" and not _INT_RE.fullmatch(cell):
                    kinds[j] = "f"
                if kinds[j] == "f" and not _is_float(cell):
                    kinds[j] = "U"
    kinds = [k if v else "U" for k, v in zip(kinds, valued, strict=True)]

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        with path.open("r", encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            next(reader)
            for row in reader:
                if row:
                    yield (
                        f"line {reader.line_num}",
                        {
                            name: _cell(cell, kind)
                            for name, cell, kind in zip(header, row, kinds, strict=True)
                        },
                    )

    return table_from_records(records, str(path))


def _cell(cell: str, kind: str) -> Any:
    if kind == "U":
        return cell
    if not cell.strip():
        return None
    return int(cell) if kind == "i" else float(cell)


# -- tables to the store -----------------------------------------------------------------------


def import_file(
    path: str | Path,
    name: str,
    *,
    store: str | Store,
    replace: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    chunk_records: int = DEFAULT_CHUNK_RECORDS,
) -> DatasetInfo:
    """Read ``path`` (:func:`read_file`) and store it as dataset ``name``, all or nothing.

    ``store`` is a store URI or an open store. Raises ValueError for a bad file or name (before
    the store is opened) and :class:`tether.store.DatasetExists` unless ``replace``.
    """
    check_dataset_name(name)
    table = read_file(path)
    options: dict[str, Any] = {"source": Path(path).name, "replace": replace}
    options |= {"chunk_bytes": chunk_bytes, "chunk_records": chunk_records}
    if isinstance(store, str):
        with open_store(store) as opened:
            return import_table(opened, name, table, **options)
    return import_table(store, name, table, **options)


def import_table(
    store: Store,
    name: str,
    table: Table,
    *,
    source: str = "",
    replace: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    chunk_records: int = DEFAULT_CHUNK_RECORDS,
) -> DatasetInfo:
    """Store ``table`` as dataset ``name``, chunk by chunk, all or nothing."""
    chunks = table_chunks(table, chunk_bytes, chunk_records)
    return store.put_dataset(name, table.fields, chunks, source=source, replace=replace)

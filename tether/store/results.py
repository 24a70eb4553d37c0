"""The checks every backend makes before it writes results: metrics, artifacts, meta (DESIGN §8).

The layout is Sacred-like (DESIGN §8): free-form metadata on the run, per-step
:class:`~tether.store.base.MetricRow` s keyed by ``(run, source, step)``, and named artifacts.
Backends call these checks before touching the store, so bad input is a ValueError (TypeError for
a wrong type) that names the problem, and nothing is written -- a batch of metrics is all or
nothing. Both backends accept exactly the same input: names that MongoDB would read as field
paths (``a.b``, ``$x``) are refused on SQLite too.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from tether.store.base import MAX_ARTIFACT_BYTES, MetricRow

MAX_SOURCE_CHARS = 64
MAX_KEY_CHARS = 128  # metric names and top-level meta keys
# Keeps one row a small document (MongoDB's limit is 16 MiB per document) and a batch's check
# cheap; a histogram of a few thousand buckets still fits.
MAX_VALUES_PER_ROW = 10_000
MAX_ARTIFACT_NAME_CHARS = 255
_MAX_INT64 = 2**63 - 1  # SQLite INTEGER and BSON int64
_ARTIFACT_NAME = re.compile(r"[A-Za-z0-9._/-]+")
_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*"
_CONTENT_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}( *;[ -~]*)?")


def check_key(key: object, what: str) -> str:
    """A metric name or top-level meta key: a non-empty string with no ``.``, not starting with
    ``$`` and no NUL -- MongoDB reads such keys as field paths or operators."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"{what} must be a non-empty string; got {key!r}")
    if len(key) > MAX_KEY_CHARS:
        raise ValueError(f"{what} {key[:40]!r}... is longer than {MAX_KEY_CHARS} characters")
    if "." in key or key.startswith("$") or "\0" in key:
        raise ValueError(
            f"{what} {key!r} must not contain '.' or NUL or start with '$' (MongoDB field "
            "paths); use '/' to group names, e.g. 'train/loss'"
        )
    return key


def check_source(source: object) -> str:
    if not isinstance(source, str) or not source:
        raise ValueError(f"metric source must be a non-empty string; got {source!r}")
    if len(source) > MAX_SOURCE_CHARS:
        raise ValueError(f"metric source {source[:40]!r}... is over {MAX_SOURCE_CHARS} characters")
    if "\0" in source:
        raise ValueError(f"metric source {source!r} contains NUL")
    return source


def _finite(value: object, what: str) -> float:
    # numbers.Real takes Python and numpy ints and floats; a bool is not a measurement.
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a real number; got {value!r}")
    try:
        f = float(value)
    except OverflowError:
        raise ValueError(f"{what} does not fit a float64; got {value!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{what} must be finite; got {f!r}")
    return f


def check_metric_row(row: object) -> MetricRow:
    """``row`` checked, as stored: ``step`` an int, ``t`` and every value a Python float
    (``t`` of -0.0 becomes 0.0)."""
    if not isinstance(row, MetricRow):
        raise TypeError(f"expected a MetricRow; got {type(row).__name__}")
    source = check_source(row.source)
    step = row.step
    if isinstance(step, bool | np.bool_) or not isinstance(step, numbers.Integral):
        raise ValueError(f"step must be an int; got {step!r}")
    if not 0 <= int(step) <= _MAX_INT64:
        raise ValueError(f"step must be 0 to 2**63-1; got {step!r}")
    # + 0.0 turns -0.0 into 0.0: SQLite keeps a whole REAL as an integer, losing the sign (a
    # time has none that matters); values keep theirs.
    t = _finite(row.t, "t") + 0.0
    if not isinstance(row.values, dict):
        raise TypeError(f"values must be a dict; got {type(row.values).__name__}")
    if len(row.values) > MAX_VALUES_PER_ROW:
        raise ValueError(f"{len(row.values)} values is over {MAX_VALUES_PER_ROW} per row")
    values = {
        check_key(k, "metric name"): _finite(v, f"metric {k!r}") for k, v in row.values.items()
    }
    return MetricRow(source, int(step), t, values)


def check_metric_rows(rows: Sequence[MetricRow]) -> list[MetricRow]:
    """Every row checked (see :func:`check_metric_row`) before any is written; the error names
    the first bad row."""
    if isinstance(rows, MetricRow) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a sequence of MetricRow; got {type(rows).__name__}")
    checked = []
    for i, row in enumerate(rows):
        try:
            checked.append(check_metric_row(row))
        except (TypeError, ValueError) as e:
            where = f"metric row {i}"
            if isinstance(row, MetricRow):
                where += f" (source {row.source!r}, step {row.step!r})"
            raise type(e)(f"{where}: {e}; nothing of the batch was written") from None
    return checked


def check_artifact_name(name: object) -> str:
    """A relative path of ``[A-Za-z0-9._/-]`` with no empty, ``.`` or ``..`` component, so it
    can be written under a folder as is (a report and its plots) and never escapes it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"artifact name must be a non-empty string; got {name!r}")
    if len(name) > MAX_ARTIFACT_NAME_CHARS:
        raise ValueError(f"artifact name {name[:40]!r}... is over {MAX_ARTIFACT_NAME_CHARS} chars")
    if not _ARTIFACT_NAME.fullmatch(name):
        raise ValueError(f"artifact name {name!r} may only hold A-Z a-z 0-9 . _ / -")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(
            f"artifact name {name!r} must be a relative path with no '..', '.' or empty part "
            "(no leading, trailing or double '/')"
        )
    return name


def check_artifact(name: object, data: object, content_type: object) -> bytes:
    """Check an artifact before it is written; return its bytes."""
    check_artifact_name(name)
    if not isinstance(content_type, str) or not _CONTENT_TYPE.fullmatch(content_type):
        raise ValueError(
            f"content_type must be a MIME type such as 'text/markdown' or 'image/png'; "
            f"got {content_type!r}"
        )
    if len(content_type) > 255:
        raise ValueError(f"content_type {content_type[:40]!r}... is over 255 characters")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"artifact data must be bytes; got {type(data).__name__}")
    blob = bytes(data)
    if len(blob) > MAX_ARTIFACT_BYTES:
        raise ValueError(
            f"artifact {name!r} has {len(blob)} bytes, over the limit of {MAX_ARTIFACT_BYTES} "
            "(8 MiB: an artifact is one MongoDB document, at most 16 MiB)"
        )
    return blob


def check_run_meta(meta: object) -> dict[str, Any]:
    """``meta`` as it comes back from JSON (string keys, lists), top-level keys checked."""
    if not isinstance(meta, dict):
        raise TypeError(f"run meta must be a dict; got {type(meta).__name__}")
    for key in meta:
        check_key(key, "run meta key")
    try:
        return json.loads(json.dumps(meta))  # type: ignore[no-any-return]
    except (TypeError, ValueError) as e:
        raise ValueError(f"run meta is not JSON-serializable: {e}") from e

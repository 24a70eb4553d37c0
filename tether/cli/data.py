"""`tether data`: input data kept in the store (DESIGN §11).

`import` stores a .npz, .jsonl or .csv file as a named dataset, all or nothing; `list`, `show`
and `delete` read and remove them. Datasets are store-wide, keyed by name: a run reads one
through `tether.data.StoredDataset`, from the run's store (`tether launch --store URI`) or the
store given to the dataset. The store module and numpy are imported inside `run`, so `tether
--help` stays fast.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.cli.common import UsageError, emit_json
from tether.exitcodes import EXIT_OK

if TYPE_CHECKING:
    import numpy as np

    from tether.store import DatasetInfo
    from tether.store.datasets import Table

DEFAULT_DIR = Path("runs") / "data"
_STORE_HELP = (
    "store URI (default sqlite:///runs/data/tether.db, relative to the current directory; a run "
    "reads the dataset from its own --store or the store= given to StoredDataset)"
)


def default_store() -> str:
    from tether.store import default_store_uri

    return default_store_uri(DEFAULT_DIR)


def add_parser(sub: Any) -> None:
    data = sub.add_parser(
        "data",
        help="input data in the store: import, list, show, delete datasets",
        description="Datasets live in the store, keyed by name, for tasks to read with "
        "tether.data.StoredDataset (each worker reads only its partition).",
    )
    cmds = data.add_subparsers(dest="data_command", required=True, parser_class=type(data))

    imp = cmds.add_parser(
        "import",
        help="store a .npz, .jsonl or .csv file as a dataset",
        description="Store FILE as dataset NAME, all or nothing. .npz: each array is a field "
        "(all share their first dimension, the records). .jsonl: one JSON object per line. "
        ".csv: a header row; integer columns become int64, other number columns float32, the "
        "rest text. A field that some records lack is kept, as nullable: NAME? tells where "
        "it has a value. A record that does not fit is named, and nothing is stored.",
    )
    imp.add_argument("file", type=Path, metavar="FILE", help="a .npz, .jsonl or .csv file")
    imp.add_argument("--name", required=True, help="the dataset's name in the store")
    imp.add_argument("--store", default=None, help=_STORE_HELP)
    imp.add_argument(
        "--replace", action="store_true", help="replace a dataset of that name (else refused)"
    )
    imp.add_argument(
        "--chunk-records",
        type=int,
        default=None,
        metavar="N",
        help="at most N records per stored chunk (65536; chunks are also at most ~4 MiB)",
    )
    imp.add_argument("--json", action="store_true", help="print the dataset's header as JSON")

    ls = cmds.add_parser("list", help="the datasets in a store")
    ls.add_argument("--store", default=None, help=_STORE_HELP)
    ls.add_argument("--json", action="store_true", help="print the list as JSON")

    show = cmds.add_parser("show", help="one dataset's schema and first records")
    show.add_argument("name", metavar="NAME", help="the dataset")
    show.add_argument("--store", default=None, help=_STORE_HELP)
    show.add_argument("--head", type=int, default=5, metavar="K", help="records to show (5)")
    show.add_argument("--json", action="store_true", help="print schema and records as JSON")

    delete = cmds.add_parser("delete", help="remove a dataset and its chunks")
    delete.add_argument("name", metavar="NAME", help="the dataset")
    delete.add_argument("--store", default=None, help=_STORE_HELP)
    delete.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from tether.store import open_store

    uri = args.store or default_store()
    command = args.data_command
    if command == "import":
        from tether.data.importer import import_table, read_file
        from tether.store.datasets import DEFAULT_CHUNK_RECORDS, check_dataset_name

        per_chunk = DEFAULT_CHUNK_RECORDS if args.chunk_records is None else args.chunk_records
        if per_chunk < 1:
            raise UsageError(f"--chunk-records must be at least 1; got {per_chunk}")
        # The file is read and checked before the store is opened: bad input changes nothing.
        check_dataset_name(args.name)
        table = read_file(args.file)
        with open_store(uri) as store:
            info = import_table(
                store,
                args.name,
                table,
                source=args.file.name,
                replace=args.replace,
                chunk_records=per_chunk,
            )
            out: dict[str, Any] = {"store": store.uri, **info.to_json()}
        _human(args, f"imported {_describe(info)} from {info.source} into store {out['store']}")
    elif command == "list":
        with open_store(uri) as store:
            datasets = store.list_datasets()
            out = {"store": store.uri, "datasets": [d.to_json() for d in datasets]}
        _human(args, _list_text(out["store"], datasets))
    elif command == "show":
        if args.head < 0:
            raise UsageError(f"--head must be 0 or more; got {args.head}")
        from tether.data.reader import read_records

        with open_store(uri) as store:
            info = store.dataset_info(args.name)
            head = read_records(store, info, 0, min(args.head, info.records))
            out = {"store": store.uri, "dataset": info.to_json(), "head": head_records(head)}
        _human(args, _show_text(info, head))
    else:
        with open_store(uri) as store:
            info = store.dataset_info(args.name)
            store.delete_dataset(args.name)
            out = {"store": store.uri, "deleted": info.to_json()}
        records = _count(info.records, "record")
        _human(args, f"deleted dataset {info.name!r} ({records}) from store {out['store']}")
    if args.json:
        emit_json(out)
    return EXIT_OK


def _human(args: argparse.Namespace, text: str) -> None:
    """Human output: stdout, or stderr under --json (DESIGN §9)."""
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


def _fields_text(info: DatasetInfo) -> str:
    parts = []
    for f in info.fields:
        shape = "" if not f.shape else "[" + "x".join(str(d) for d in f.shape) + "]"
        parts.append(f"{f.name} {f.type_name}{shape}{' nullable' if f.nullable else ''}")
    return ", ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _describe(info: DatasetInfo) -> str:
    return (
        f"dataset {info.name!r}: {_count(info.records, 'record')} of {_fields_text(info)}; "
        f"{_count(info.chunks, 'chunk')}, {_size(info.nbytes)}"
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _list_text(uri: str, datasets: list[DatasetInfo]) -> str:
    if not datasets:
        return f"no datasets in store {uri}"
    lines = [f"{'name':<24} {'records':>10} {'bytes':>11}  {'created':<19}  fields"]
    for d in datasets:
        names = ", ".join(f.name for f in d.fields)
        lines.append(
            f"{d.name:<24} {d.records:>10} {_size(d.nbytes):>11}  {_when(d.created_at)}  {names}"
        )
    return "\n".join(lines)


def _show_text(info: DatasetInfo, head: Table) -> str:
    import numpy as np

    lines = [
        f"dataset {info.name!r}: {_count(info.records, 'record')}, "
        f"{_count(info.chunks, 'chunk')}, "
        f"{_size(info.nbytes)}, from {info.source or '-'}, created {_when(info.created_at)}",
        "fields:",
    ]
    for f in info.fields:
        shape = "x".join(str(d) for d in f.shape) or "scalar"
        lines.append(f"  {f.name:<20} {f.type_name:<8} {shape}{'  nullable' if f.nullable else ''}")
    for i in range(head.records):
        cells = []
        for f in info.fields:
            present = head.present.get(f.name)
            value = head.columns[f.name][i]
            missing = present is not None and not present[i]
            text = "-" if missing else np.array2string(np.asarray(value), threshold=8)
            cells.append(f"{f.name}={text}")
        lines.append(f"[{i}] " + " ".join(cells))
    return "\n".join(lines)


def head_records(table: Table) -> list[dict[str, Any]]:
    """Records as JSON values: missing values, NaN and inf are null; float32 is written in its
    shortest decimal form (it reads back as the same float32)."""
    out = []
    for i in range(table.records):
        record: dict[str, Any] = {}
        for f in table.fields:
            present = table.present.get(f.name)
            missing = present is not None and not present[i]
            record[f.name] = None if missing else _json_value(table.columns[f.name][i])
        out.append(record)
    return out


def _json_value(value: np.ndarray | np.generic) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        return [_json_value(v) for v in value]
    if isinstance(value, np.floating):
        return float(str(value)) if np.isfinite(value) else None
    if isinstance(value, np.complexfloating):
        return str(value)
    return value.item()

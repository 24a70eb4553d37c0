"""Input data in the store (DESIGN §11): schema inference, chunks, every backend, the CLI and
`tether.data.StoredDataset`.

Pure first (records and arrays to columns, chunk boundaries, the chunk codec), then the store
contract on SQLite, mongomock and a real replica set (skipped with a reason without one): round
trips bigger than one chunk, all-or-nothing imports, refusal of an existing name, torn reads.
Then `tether data import|list|show|delete` through `tether.cli.main.main`, and the reader tasks
use: disjoint covering partitions, deterministic batches, reads off the calling thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mongomock
import numpy as np
import pytest
from mongo_fixture import (  # noqa: F401  (mongodb_uri is a fixture used through BACKENDS)
    drop_database,
    fresh_database_name,
    mongodb_uri,
    with_database,
)
from pymongo.errors import AutoReconnect

import tether.data.reader as tdata
import tether.store.mongo as mongo_backend
import tether.store.sqlite as sqlite_backend
import tether.store.sqlite_schema as sqlite_schema
from tether.cli.main import main
from tether.data import (
    StoredDataset,
    batch_indices,
    import_table,
    read_file,
    read_records,
    record_range,
)
from tether.data.schema import table_from_arrays, table_from_records
from tether.store import (
    DatasetExists,
    MongoStore,
    SQLiteStore,
    Store,
    StoreError,
    StoreUnavailable,
    UnknownDataset,
    open_store,
)
from tether.store.datasets import (
    MAX_DATASET_CHUNK_BYTES,
    DatasetChunk,
    FieldSpec,
    Table,
    chunk_bounds,
    decode_chunk,
    pack_buffers,
    table_chunks,
    unpack_buffers,
)
from tether.tasks.api import TaskContext

# -- helpers -----------------------------------------------------------------------------------


def _records(rows: list[Any]) -> Callable[[], Iterator[tuple[str, Any]]]:
    return lambda: ((f"line {i + 1}", r) for i, r in enumerate(rows))


def _table(rows: list[Any]) -> Table:
    return table_from_records(_records(rows), "t.jsonl")


def _features(n: int, dim: int = 16, seed: int = 0) -> Table:
    rng = np.random.default_rng(seed)
    return table_from_arrays(
        {
            "x": rng.standard_normal((n, dim), dtype=np.float32),
            "y": rng.integers(0, 10, n).astype(np.int64),
            "tag": np.array([f"r{i}" * (i % 4) for i in range(n)]),
        },
        "features.npz",
    )


def _assert_tables_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        if a[name].dtype.kind == "f":  # bit for bit, NaN included
            assert a[name].tobytes() == b[name].tobytes(), name
        else:
            assert np.array_equal(a[name], b[name]), name


# -- schema inference ----------------------------------------------------------------------------


def test_records_become_typed_columns_in_order_of_first_appearance() -> None:
    t = _table(
        [
            {"i": 1, "f": 1, "mix": [1, 2], "b": True, "s": "ab", "grid": [[1, 2], [3, 4]]},
            {
                "i": -7,
                "f": 2.5,
                "mix": [3, 4.5],
                "b": False,
                "s": "héllo",
                "grid": [[5, 6], [7, 8]],
            },
        ]
    )
    spec = {f.name: (f.dtype, f.shape, f.nullable) for f in t.fields}
    assert list(spec) == ["i", "f", "mix", "b", "s", "grid"]
    assert spec == {
        "i": ("<i8", (), False),
        "f": ("<f4", (), False),  # an integer among floats is a float
        "mix": ("<f4", (2,), False),
        "b": ("|b1", (), False),
        "s": ("<U5", (), False),  # the longest text
        "grid": ("<i8", (2, 2), False),
    }
    assert t.columns["f"].tolist() == [1.0, 2.5]
    assert t.columns["s"].tolist() == ["ab", "héllo"]
    assert t.columns["grid"][1].tolist() == [[5, 6], [7, 8]]
    assert t.present == {}


def test_fields_some_records_lack_are_kept_as_nullable() -> None:
    t = _table([{"a": 1}, {"a": 2, "extra": 0.5, "note": "x"}, {"a": 3, "extra": None}])
    assert [f.name for f in t.fields] == ["a", "extra", "note"]
    assert [f.nullable for f in t.fields] == [False, True, True]
    assert t.present["extra"].tolist() == [False, True, False]
    assert t.present["note"].tolist() == [False, True, False]
    assert np.isnan(t.columns["extra"][[0, 2]]).all() and t.columns["extra"][1] == 0.5
    assert t.columns["note"].tolist() == ["", "x", ""]
    arrays = t.arrays()
    assert sorted(arrays) == ["a", "extra", "extra?", "note", "note?"]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"x": 1}, {"x": 2}, {"x": "three"}], r"record 2 \(line 3\): field 'x' is text"),
        (
            [{"x": [1, 2]}, {"x": [1, 2, 3]}],
            r"record 1 \(line 2\): field 'x' .*shape \(3,\).*\(2,\)",
        ),
        ([{"x": [[1], [2, 3]]}], r"record 0 \(line 1\): field 'x' is a ragged list"),
        ([{"x": {"a": 1}}], r"record 0 \(line 1\): field 'x' is an object"),
        ([{"x": 1}, {"x": True}], r"record 1 \(line 2\): field 'x' is a boolean"),
        ([{"x": [1, None]}], r"record 0 \(line 1\): field 'x' holds null inside a list"),
        ([{"x": 1.0}, {"x": 1e39}], r"record 1 \(line 2\): field 'x' holds 1e\+39"),
        ([{"x": 1}, {"x": 2**63}], r"record 1 \(line 2\): field 'x' .*int64"),
        ([{"x": 1}, [1, 2]], r"record 1 \(line 2\) is a list, not an object"),
        ([{"x": 1, "y": None}], r"field 'y' is null in every .*record 0 \(line 1\)"),
        ([], r"holds no records"),
    ],
)
def test_a_record_that_does_not_fit_is_named(rows: list[Any], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        _table(rows)


def test_a_big_integer_among_floats_is_a_float() -> None:
    t = _table([{"x": 2**63}, {"x": 0.5}])
    assert t.fields[0].dtype == "<f4" and t.columns["x"][0] == np.float32(2**63)


def test_arrays_need_one_first_dimension_and_plain_dtypes() -> None:
    big_endian = np.arange(6, dtype=">f8").reshape(3, 2)
    t = table_from_arrays({"x": big_endian, "s": np.array(["a", "bcd", ""])}, "a.npz")
    assert [(f.name, f.dtype, f.shape) for f in t.fields] == [
        ("x", "<f8", (2,)),
        ("s", "<U3", ()),
    ]
    assert t.columns["x"].tolist() == big_endian.tolist()
    with pytest.raises(ValueError, match="array 'y' has 2 records .* array 'x' has 3"):
        table_from_arrays({"x": np.zeros(3), "y": np.zeros(2)}, "a.npz")
    with pytest.raises(ValueError, match="array 'x' is a scalar"):
        table_from_arrays({"x": np.float32(1)}, "a.npz")  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="dtype |S1.*store text as str"):
        table_from_arrays({"x": np.array([b"a"])}, "a.npz")
    with pytest.raises(ValueError, match="holds no records"):
        table_from_arrays({"x": np.zeros((0, 3))}, "a.npz")


def test_a_nullable_field_may_not_clash_with_a_mask_name() -> None:
    with pytest.raises(ValueError, match=r"'a\?' would clash"):
        _table([{"a": 1, "a?": 2}, {"a?": 3}])


# -- chunks ------------------------------------------------------------------------------------


def _decoded(t: Table, chunks: list[DatasetChunk]) -> dict[str, np.ndarray]:
    parts = [decode_chunk(t.fields, c).arrays() for c in chunks]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_chunks_cut_at_the_record_limit() -> None:
    t = _features(1000)
    bounds = chunk_bounds(t, chunk_bytes=1 << 20, chunk_records=300)
    assert bounds == [(0, 300), (300, 300), (600, 300), (900, 100)]


def test_chunks_cut_at_the_byte_limit_and_round_trip() -> None:
    t = _features(1000)
    per_record = 16 * 4 + 8  # x and y; tag adds its JSON text
    bounds = chunk_bounds(t, chunk_bytes=10_000, chunk_records=1 << 20)
    assert len(bounds) > 1
    assert sum(c for _, c in bounds) == 1000
    assert [f for f, _ in bounds] == [0, *np.cumsum([c for _, c in bounds])[:-1].tolist()]
    chunks = list(table_chunks(t, chunk_bytes=10_000, chunk_records=1 << 20))
    assert all(c.nbytes <= 10_000 for c in chunks)
    assert all(c.count < 10_000 // per_record + 1 for c in chunks)
    assert max(c.nbytes for c in chunks) > 10_000 - per_record - 40  # the chunks are full
    _assert_tables_equal(_decoded(t, chunks), t.arrays())


def test_a_record_larger_than_a_chunk_gets_its_own_and_one_past_the_limit_is_refused() -> None:
    t = table_from_arrays({"x": np.zeros((3, 1000), dtype=np.float32)}, "a.npz")
    assert chunk_bounds(t, chunk_bytes=100) == [(0, 1), (1, 1), (2, 1)]
    huge = table_from_arrays({"x": np.zeros((2, MAX_DATASET_CHUNK_BYTES // 8), np.float64)}, "h")
    with pytest.raises(ValueError, match="record 0 is .* bytes; a chunk holds at most"):
        chunk_bounds(huge)


def test_nullable_fields_round_trip_through_chunks() -> None:
    rows = [{"a": i, **({"b": [i, i]} if i % 3 else {}), **({"s": "é" * i} if i % 2 else {})}
            for i in range(50)]  # fmt: skip
    t = _table(rows)
    chunks = list(table_chunks(t, chunk_bytes=64, chunk_records=7))
    assert len(chunks) >= 8 and all(c.count <= 7 for c in chunks)
    _assert_tables_equal(_decoded(t, chunks), t.arrays())


def test_buffers_pack_into_one_blob() -> None:
    buffers = (b"", b"abc", bytes(range(256)) * 3)
    assert unpack_buffers(pack_buffers(buffers)) == buffers
    with pytest.raises(ValueError, match="after its buffers"):
        unpack_buffers(pack_buffers(buffers) + b"x")


# -- every backend -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    name: str
    open: Callable[[], Store]
    chunk_rows: Callable[[], int]  # dataset chunks stored, published or not
    clock: FakeClock


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    path = tmp_path / "tether.db"
    clock = FakeClock()

    def rows() -> int:
        conn = sqlite3.connect(path)
        try:
            return int(conn.execute("SELECT count(*) FROM dataset_chunks").fetchone()[0])
        finally:
            conn.close()

    return Backend("sqlite", lambda: SQLiteStore(path, clock=clock), rows, clock)


def _mongo(uri: str, factory: Callable[[], Any] | None, db: Callable[[], Any]) -> Backend:
    clock = FakeClock()

    def open_() -> Store:
        return MongoStore(uri, client_factory=factory, clock=clock)

    return Backend("mongo", open_, lambda: int(db().dataset_chunks.count_documents({})), clock)


def _mongomock(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    client: Any = mongomock.MongoClient()
    uri = "mongodb://mongomock.invalid/tether_test?replicaSet=rs0"
    return _mongo(uri, lambda: client, lambda: client["tether_test"])


def _mongodb(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    from pymongo import MongoClient

    uri = with_database(request.getfixturevalue("mongodb_uri"), fresh_database_name())
    client: MongoClient[dict[str, Any]] = MongoClient(uri)
    request.addfinalizer(client.close)
    request.addfinalizer(lambda: drop_database(uri))
    return _mongo(uri, None, client.get_default_database)


BACKENDS = {"sqlite": _sqlite, "mongomock": _mongomock, "mongodb": _mongodb}


@pytest.fixture(params=sorted(BACKENDS))
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Backend:
    # Small write batches, so that an import of a few hundred KiB takes several writes and a
    # failure midway leaves written chunks behind to remove.
    monkeypatch.setattr(sqlite_backend, "_DATASET_TX_BYTES", 32 << 10)
    monkeypatch.setattr(mongo_backend, "_DATASET_BATCH_BYTES", 32 << 10)
    return BACKENDS[request.param](request, tmp_path)


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    s = backend.open()
    yield s
    s.close()


def _put(store: Store, name: str, t: Table, **kwargs: Any) -> Any:
    kwargs.setdefault("chunk_bytes", 16 << 10)
    return import_table(store, name, t, source="src.npz", **kwargs)


def test_a_dataset_bigger_than_a_chunk_round_trips(backend: Backend, store: Store) -> None:
    t = _features(3000, dim=32)
    info = _put(store, "feat", t)
    assert info.chunks > 5 and info.records == 3000
    assert (info.name, info.source, info.created_at) == ("feat", "src.npz", 1_000.0)
    assert [(f.name, f.type_name, f.shape) for f in info.fields] == [
        ("x", "float32", (32,)),
        ("y", "int64", ()),
        ("tag", "str", ()),
    ]
    other = backend.open()  # another connection, as another process would have
    try:
        assert other.dataset_info("feat") == info
        chunks = other.read_dataset_chunks(info, 0, info.chunks)
        assert [c.index for c in chunks] == list(range(info.chunks))
        assert info.nbytes == sum(c.nbytes for c in chunks)
        _assert_tables_equal(_decoded(t, chunks), t.arrays())
        # any range of records, across chunk boundaries
        part = read_records(other, info, 1234, 2345)
        _assert_tables_equal(part.arrays(), {k: v[1234:2345] for k, v in t.arrays().items()})
        assert read_records(other, info, 7, 7).records == 0
    finally:
        other.close()
    assert backend.chunk_rows() == info.chunks


def test_datasets_are_listed_by_name_and_deleted_with_their_chunks(
    backend: Backend, store: Store
) -> None:
    assert store.list_datasets() == []
    b = _put(store, "b", _features(100))
    a = _put(store, "a", _table([{"v": 1}, {"v": 2}]))
    assert [d.name for d in store.list_datasets()] == ["a", "b"]
    assert store.list_datasets() == [a, b]
    store.delete_dataset("b")
    assert backend.chunk_rows() == a.chunks
    with pytest.raises(UnknownDataset) as err:
        store.delete_dataset("b")
    assert str(err.value) == f"dataset 'b' not found in store {err.value.store_uri}; it holds 'a'"
    store.delete_dataset("a")
    with pytest.raises(UnknownDataset, match="it holds no datasets .*tether data import"):
        store.dataset_info("a")
    assert backend.chunk_rows() == 0


def test_an_existing_name_is_refused_unless_replaced(backend: Backend, store: Store) -> None:
    first = _put(store, "d", _features(500))
    with pytest.raises(DatasetExists, match="dataset 'd' already exists .*--replace"):
        _put(store, "d", _features(10))
    assert store.dataset_info("d") == first
    assert backend.chunk_rows() == first.chunks
    backend.clock.now = 2_000.0
    second = _put(store, "d", _features(40, seed=1), replace=True)
    assert (second.records, second.created_at) == (40, 2_000.0)
    assert store.dataset_info("d") == second
    assert backend.chunk_rows() == second.chunks  # the replaced import's chunks are gone
    # a reader still holding the old header gets a clear error, never the new records
    with pytest.raises(StoreError, match="replaced or deleted while it was read"):
        store.read_dataset_chunks(first, 0, 1)


def _failing(chunks: Iterator[DatasetChunk], after: int) -> Iterator[DatasetChunk]:
    for n, chunk in enumerate(chunks):
        if n == after:
            raise OSError("disk gone (injected)")
        yield chunk


def test_an_import_that_fails_midway_leaves_nothing(backend: Backend, store: Store) -> None:
    t = _features(2000)
    kept = _put(store, "kept", _features(300, seed=3))
    rows = backend.chunk_rows()
    with pytest.raises(OSError, match="injected"):
        store.put_dataset("new", t.fields, _failing(table_chunks(t, 8 << 10), after=5))
    with pytest.raises(OSError, match="injected"):  # a replacement that fails keeps the old one
        store.put_dataset(
            "kept", t.fields, _failing(table_chunks(t, 8 << 10), after=5), replace=True
        )
    assert [d.name for d in store.list_datasets()] == ["kept"]
    assert store.dataset_info("kept") == kept
    assert backend.chunk_rows() == rows
    _assert_tables_equal(
        read_records(store, kept, 0, 300).arrays(), _features(300, seed=3).arrays()
    )


def test_a_bad_chunk_is_refused_and_nothing_is_stored(backend: Backend, store: Store) -> None:
    t = _features(200)
    good = list(table_chunks(t, 4 << 10))
    bad = DatasetChunk(2, good[2].first, good[2].count, (b"\0", *good[2].buffers[1:]))
    with pytest.raises(ValueError, match="chunk 2: field 'x' has 1 bytes"):
        store.put_dataset("d", t.fields, [good[0], good[1], bad, *good[3:]])
    skipped = [good[0], good[2]]
    with pytest.raises(ValueError, match="chunks must come in order"):
        store.put_dataset("d", t.fields, skipped)
    with pytest.raises(ValueError, match="has no records"):
        store.put_dataset("d", t.fields, [])
    with pytest.raises(ValueError, match="a dataset name is"):
        store.put_dataset("no spaces", t.fields, good)
    with pytest.raises(ValueError, match="appears twice"):
        store.put_dataset("d", [FieldSpec("a", "<f4"), FieldSpec("a", "<i8")], [])
    assert store.list_datasets() == [] and backend.chunk_rows() == 0


def test_mongo_chunk_writes_cut_off_leave_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mongo_backend, "_DATASET_BATCH_BYTES", 64 << 10)
    client: Any = mongomock.MongoClient()
    uri = "mongodb://mongomock.invalid/tether_test?replicaSet=rs0"
    store = MongoStore(uri, client_factory=lambda: client)
    real = store._dataset_chunks.insert_many
    calls = []

    def flaky(docs: Any, **kwargs: Any) -> Any:
        calls.append(len(docs))
        if len(calls) == 2:
            raise AutoReconnect("connection closed (injected)")
        return real(docs, **kwargs)

    store._dataset_chunks.insert_many = flaky  # type: ignore[method-assign]
    t = _features(2000, dim=64)  # ~0.5 MiB: several batches of chunk inserts
    with pytest.raises(StoreUnavailable, match="put_dataset failed: AutoReconnect"):
        _put(store, "d", t)
    assert len(calls) == 2
    assert client["tether_test"].dataset_chunks.count_documents({}) == 0
    assert store.list_datasets() == []
    store.close()


def test_sqlite_upgrade_from_version_4_adds_datasets(tmp_path: Path) -> None:
    path = tmp_path / "v4.db"
    conn = sqlite3.connect(path)
    with conn:
        for stmt in sqlite_schema.SCHEMA[
            : -len(sqlite_schema.DATASET_TABLES) - len(sqlite_schema.SECRETS_SCHEMA)
        ]:
            conn.execute(stmt)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '4')")
        conn.execute("INSERT INTO runs VALUES ('r', '{}', 1.0, 0, NULL, '{}')")
    conn.close()
    with SQLiteStore(path) as s:
        assert s.get_run("r").config == {}
        info = _put(s, "d", _features(10))
        assert s.dataset_info("d") == info
    conn = sqlite3.connect(path)
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    conn.close()
    assert version == (str(sqlite_schema.SCHEMA_VERSION),) == ("7",)


# -- the command line --------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if "--json" in argv and lines else None), err


def _write_files(tmp_path: Path) -> dict[str, Path]:
    npz = tmp_path / "digits.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, x=rng.random((300, 8), dtype=np.float32), y=np.arange(300) % 10)
    jsonl = tmp_path / "people.jsonl"
    jsonl.write_text(
        '{"name": "ann", "age": 31, "scores": [1.5, 2]}\n'
        "\n"
        '{"name": "bob", "age": 40, "scores": [3, 4], "city": "Oslo"}\n'
    )
    csv = tmp_path / "t.csv"
    csv.write_text("id,w,label\n1,0.5,cat\n2,,dog\n3,7,\n")
    return {"npz": npz, "jsonl": jsonl, "csv": csv}


def test_cli_imports_lists_shows_and_deletes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _write_files(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'tether.db'}"
    code, out, err = _cli(
        capsys, "data", "import", str(files["npz"]), "--name", "digits", "--store", uri,
        "--chunk-records", "64", "--json",
    )  # fmt: skip
    assert code == 0 and "imported dataset 'digits'" in err
    assert out["store"] == uri and out["records"] == 300 and out["chunks"] == 5
    assert out["fields"] == [
        {"name": "x", "dtype": "float32", "shape": [8], "nullable": False},
        {"name": "y", "dtype": "int64", "shape": [], "nullable": False},
    ]
    code, out, _ = _cli(capsys, "data", "import", str(files["jsonl"]), "--name", "people",
                        "--store", uri, "--json")  # fmt: skip
    assert code == 0 and out["records"] == 2
    assert [(f["name"], f["dtype"], f["nullable"]) for f in out["fields"]] == [
        ("name", "str", False),
        ("age", "int64", False),
        ("scores", "float32", False),
        ("city", "str", True),  # only the second record has it: kept
    ]
    code, out, _ = _cli(capsys, "data", "import", str(files["csv"]), "--name", "t",
                        "--store", uri, "--json")  # fmt: skip
    assert code == 0
    assert [(f["name"], f["dtype"], f["nullable"]) for f in out["fields"]] == [
        ("id", "int64", False),
        ("w", "float32", True),
        ("label", "str", False),
    ]

    code, out, _ = _cli(capsys, "data", "list", "--store", uri, "--json")
    assert code == 0 and [d["name"] for d in out["datasets"]] == ["digits", "people", "t"]
    assert [d["records"] for d in out["datasets"]] == [300, 2, 3]
    assert all(d["nbytes"] > 0 and d["created_at"] > 0 for d in out["datasets"])

    code, out, _ = _cli(capsys, "data", "show", "people", "--store", uri, "--json")
    assert code == 0 and out["dataset"]["name"] == "people"
    assert out["head"] == [
        {"name": "ann", "age": 31, "scores": [1.5, 2.0], "city": None},
        {"name": "bob", "age": 40, "scores": [3.0, 4.0], "city": "Oslo"},
    ]
    code, out, _ = _cli(capsys, "data", "show", "t", "--store", uri, "--json", "--head", "2")
    assert out["head"] == [
        {"id": 1, "w": 0.5, "label": "cat"},
        {"id": 2, "w": None, "label": "dog"},
    ]
    code, out, _ = _cli(capsys, "data", "show", "digits", "--store", uri, "--json", "--head", "70")
    with np.load(files["npz"]) as npz:  # float32 in its shortest form reads back exactly
        assert np.array_equal(np.array([r["x"] for r in out["head"]], np.float32), npz["x"][:70])
    code = main(["data", "show", "digits", "--store", uri])
    text = capsys.readouterr().out
    assert code == 0 and "x                    float32  8" in text and text.count("\n[") == 5

    code, out, _ = _cli(capsys, "data", "delete", "t", "--store", uri, "--json")
    assert code == 0 and out["deleted"]["name"] == "t"
    code, out, _ = _cli(capsys, "data", "list", "--store", uri, "--json")
    assert [d["name"] for d in out["datasets"]] == ["digits", "people"]


def test_cli_bad_input_is_one_sentence_and_stores_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _write_files(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'tether.db'}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": [1, 2]}\n{"x": [3, 4]}\n\n{"x": [5]}\n')
    code, _, err = _cli(capsys, "data", "import", str(bad), "--name", "bad", "--store", uri)
    assert code == 2
    assert err.strip() == (
        f"tether data: {bad}: record 2 (line 4): field 'x' is a number of shape (1,), but "
        "record 0 (line 1) made it a number of shape (2,)"
    )
    assert not (tmp_path / "store").exists()  # the store was not even opened
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("a,b\n1,2\n3\n")
    code, _, err = _cli(capsys, "data", "import", str(bad_csv), "--name", "b", "--store", uri)
    assert code == 2 and "line 3 has 1 cells; the header has 2" in err
    code, _, err = _cli(capsys, "data", "import", str(tmp_path / "x.txt"), "--name", "b")
    assert code == 2 and "cannot import a .txt file" in err

    assert _cli(capsys, "data", "import", str(files["csv"]), "--name", "t", "--store", uri)[0] == 0
    code, _, err = _cli(capsys, "data", "import", str(files["npz"]), "--name", "t", "--store", uri)
    assert code == 2 and "dataset 't' already exists" in err
    code, out, _ = _cli(capsys, "data", "show", "t", "--store", uri, "--json")
    assert out["dataset"]["source"] == "t.csv"
    code, out, _ = _cli(capsys, "data", "import", str(files["npz"]), "--name", "t",
                        "--store", uri, "--replace", "--json")  # fmt: skip
    assert code == 0 and out["source"] == "digits.npz" and out["records"] == 300
    code, _, err = _cli(capsys, "data", "show", "nope", "--store", uri)
    assert code == 2 and err.strip() == (
        f"tether data: dataset 'nope' not found in store {uri}; it holds 't'"
    )


def test_read_file_names_the_file_for_pickled_npz(tmp_path: Path) -> None:
    path = tmp_path / "o.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="holds Python objects"):
        read_file(path)
    with pytest.raises(ValueError, match="no such file"):
        read_file(tmp_path / "missing.csv")


# -- StoredDataset ------------------------------------------------------------------------------


def _ctx(uri: str, w: int = 0, workers: int = 1, **kwargs: Any) -> TaskContext:
    kwargs.setdefault("batch_size", 16)
    return TaskContext(seed=7, worker_id=w, num_workers=workers, steps=10, store_uri=uri, **kwargs)


@pytest.fixture
def stored(tmp_path: Path) -> tuple[str, Table]:
    uri = f"sqlite:///{tmp_path / 'data.db'}"
    rows = [{"x": [i, -i], "y": i % 10, **({"w": i / 2} if i % 4 else {})} for i in range(1001)]
    t = _table(rows)
    with open_store(uri) as s:
        import_table(s, "nums", t, chunk_records=37)
    return uri, t


def test_partitions_are_contiguous_disjoint_and_cover_the_dataset(
    stored: tuple[str, Table],
) -> None:
    uri, t = stored
    ds = StoredDataset("nums")
    parts = [ds.partition(_ctx(uri, w, 3)) for w in range(3)]
    assert [len(p["y"]) for p in parts] == [333, 334, 334]
    assert [record_range(1001, 3, w) for w in range(3)] == [(0, 333), (333, 667), (667, 1001)]
    whole = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    _assert_tables_equal(whole, t.arrays())
    _assert_tables_equal(ds.all(_ctx(uri, 2, 3, role="driver")), t.arrays())
    assert sorted(parts[0]) == ["w", "w?", "x", "y"]
    assert not parts[0]["x"].flags.writeable  # shared with later batches: read-only
    assert len(ds) == 1001 and ds.info(_ctx(uri, 1, 3)).records == 1001


def test_batches_are_a_pure_function_of_seed_worker_and_clock(stored: tuple[str, Table]) -> None:
    uri, t = stored
    ctx = _ctx(uri, 1, 2)
    a, b = StoredDataset("nums"), StoredDataset("nums")  # two processes' objects
    start, stop = record_range(1001, 2, 1)
    for clock in (0, 1, 17, 40):  # 40: a later epoch
        got = a.batch(ctx, clock)
        assert sorted(got) == ["w", "w?", "x", "y"] and got["x"].dtype == np.int64
        _assert_tables_equal(got, b.batch(ctx, clock))
        idx = start + batch_indices(np.arange(stop - start), 16, 7, 1, clock)
        _assert_tables_equal(got, {k: v[idx] for k, v in t.arrays().items()})
    assert not np.array_equal(a.batch(ctx, 0)["y"], a.batch(ctx, 1)["y"])
    assert len(a.batch(ctx, 3, size=5)["y"]) == 5
    with pytest.raises(ValueError, match="larger than this worker's partition"):
        a.batch(ctx, 0, size=10_000)


def test_reads_happen_on_a_background_thread_started_at_first_use(
    stored: tuple[str, Table], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    uri, t = stored
    opened: list[threading.Thread] = []
    real = tdata.open_store

    def spy(u: str, **kwargs: Any) -> Store:
        opened.append(threading.current_thread())
        return real(u, **kwargs)

    monkeypatch.setattr(tdata, "open_store", spy)
    ds = StoredDataset("nums", store=uri)
    assert opened == []  # construction does no I/O
    elsewhere = tmp_path / "elsewhere.db"
    ds.batch(_ctx(f"sqlite:///{elsewhere}"), 0)  # store= wins over ctx.store_uri
    assert len(opened) == 1 and opened[0] is not threading.current_thread()
    assert opened[0].name.startswith("tether-data-nums")
    assert not elsewhere.exists()


def test_the_header_is_served_before_the_chunks_arrive(
    stored: tuple[str, Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, t = stored
    reached, release = threading.Event(), threading.Event()
    real = SQLiteStore.read_dataset_chunks

    def slow(self: SQLiteStore, info: Any, first: int, last: int) -> Any:
        if first >= 3:
            reached.set()
            assert release.wait(60), "never released"
        return real(self, info, first, last)

    monkeypatch.setattr(SQLiteStore, "read_dataset_chunks", slow)
    ds = StoredDataset("nums", timeout_s=0.2)
    ctx = _ctx(uri)
    assert ds.info(ctx).records == 1001  # the header does not wait for the chunks
    assert reached.wait(60)  # chunks 0 to 2 are in, chunk 3 is held back
    with pytest.raises(TimeoutError, match=r"'nums' .*the partition not read within 0.2s \(3 of"):
        ds.partition(ctx)
    release.set()
    _assert_tables_equal(StoredDataset("nums").partition(ctx), t.arrays())


def test_unknown_names_and_failed_reads_are_clear_errors(
    stored: tuple[str, Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, _ = stored
    with pytest.raises(UnknownDataset) as err:
        StoredDataset("digits").batch(_ctx(uri), 0)
    assert (
        str(err.value)
        == f"dataset 'digits' not found in store {uri[:10]}{uri[10:]}; it holds 'nums'"
    )
    with pytest.raises(ValueError, match="ctx.store_uri is empty; pass store=URI"):
        StoredDataset("nums").batch(_ctx(""), 0)
    with pytest.raises(ValueError, match="worker_id must be < num_workers=2"):
        StoredDataset("nums").batch(_ctx(uri, 2, 2), 0)
    with pytest.raises(ValueError, match="a dataset name is"):
        StoredDataset("bad name")

    def broken(u: str, **kwargs: Any) -> Store:
        raise StoreError(f"store {u} is not a tether store (injected)")

    monkeypatch.setattr(tdata, "open_store", broken)
    with pytest.raises(StoreError, match="is not a tether store"):
        StoredDataset("nums").batch(_ctx(uri), 0)


def test_stored_dataset_reads_a_mongo_store(monkeypatch: pytest.MonkeyPatch) -> None:
    client: Any = mongomock.MongoClient()
    uri = "mongodb://mongomock.invalid/tether_test?replicaSet=rs0"
    t = _features(500)
    with MongoStore(uri, client_factory=lambda: client) as s:
        import_table(s, "feat", t, chunk_bytes=4 << 10)
    monkeypatch.setattr(
        tdata, "open_store", lambda u, **kw: MongoStore(u, client_factory=lambda: client)
    )
    ds = StoredDataset("feat")
    parts = [ds.partition(_ctx(uri, w, 4)) for w in range(4)]
    whole = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    _assert_tables_equal(whole, t.arrays())

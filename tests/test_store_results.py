"""Results in the store (DESIGN §8): run meta, per-step metrics and artifacts, on every backend.

The backend-generic tests reuse test_store.py's ``backend``/``store_factory``/``store`` fixtures
(SQLite, mongomock, and a real replica set when one is available -- skipped with a reason
otherwise). Then the backend-specific parts: the SQLite schema upgrade from version 3 and its
query plans; MongoDB's indexes, old run documents and the fault seam.
"""

from __future__ import annotations

import itertools
import math
import sqlite3
from pathlib import Path
from typing import Any

import mongomock
import numpy as np
import pytest
import test_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store import Backend, FakeClock, StoreFactory, _register, _snapshot

import tether.store.sqlite_schema as sqlite_schema
from tether.store import (
    MAX_ARTIFACT_BYTES,
    ArtifactInfo,
    ArtifactNotFound,
    MetricRow,
    MongoStore,
    RunRecord,
    SQLiteStore,
    Store,
    StoreError,
    StoreUnavailable,
    UnknownRun,
)
from tether.store.sqlite_results import RESULTS_SCHEMA
from tether.store.sqlite_schema import SCHEMA_VERSION
from tether.store.testing import FaultPlan

# test_store.py's fixtures, found by pytest under these names: every backend (DESIGN §6).
backend = test_store.backend
store_factory = test_store.store_factory
store = test_store.store
clock = test_store.clock
mongodb_uri = test_store.mongodb_uri  # asked for by the real-replica-set backend

RUN = test_store.RUN  # test_store's _register and _snapshot write to this run
OTHER = "run-2"

# Floats that a text or a float32 round trip would change.
AWKWARD = [0.1, 1 / 3, -0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1e16, 7]


# -- run meta --------------------------------------------------------------------------------


def test_run_meta_starts_empty_and_merges_shallowly(store: Store) -> None:
    store.create_run(RUN, {"seed": 1})
    assert store.get_run(RUN).meta == {}
    store.set_run_meta(RUN, {"experiment": "consistency", "tags": ["ssp"], "versions": {"a": 1}})
    store.set_run_meta(RUN, {"tags": ["ssp", "quick"], "versions": {"b": 2}, "status": None})
    store.set_run_meta(RUN, {})  # nothing to merge
    expected = {
        "experiment": "consistency",
        "tags": ["ssp", "quick"],
        "versions": {"b": 2},  # a top-level key is replaced whole
        "status": None,
    }
    assert store.get_run(RUN).meta == expected
    assert [r.meta for r in store.list_runs()] == [expected]
    assert store.get_run(RUN).config == {"seed": 1}


def test_run_meta_is_json_and_bad_keys_change_nothing(store: Store) -> None:
    store.create_run(RUN, {})
    store.set_run_meta(RUN, {"shape": (2, 3), "ids": {1: "x"}})
    assert store.get_run(RUN).meta == {"shape": [2, 3], "ids": {"1": "x"}}
    for bad, match in [
        ({"a.b": 1}, "'.'"),
        ({"$set": 1}, "'\\$'"),
        ({"": 1}, "non-empty"),
        ({1: 1}, "non-empty string"),
        ({"k": object()}, "JSON"),
    ]:
        with pytest.raises(ValueError, match=match):
            store.set_run_meta(RUN, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dict"):
        store.set_run_meta(RUN, [("a", 1)])  # type: ignore[arg-type]
    assert store.get_run(RUN).meta == {"shape": [2, 3], "ids": {"1": "x"}}


def test_run_record_meta_defaults_to_empty() -> None:
    assert RunRecord("r", {}, 0.0, False, None).meta == {}


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_round_trip_exactly(store: Store) -> None:
    store.create_run(RUN, {})
    values = {f"v{i}": x for i, x in enumerate(AWKWARD)}
    from_numpy: dict[str, Any] = {"loss": np.float32(0.25), "n": np.int64(3)}
    rows = [
        MetricRow("worker:0", 0, 1_700_000_000.123456, values),
        MetricRow("worker:0", 1, 1_700_000_001.5, from_numpy),
        MetricRow("shard:0", 7, 1e9, {}),
    ]
    store.log_metrics(RUN, rows)
    got = store.metrics(RUN)
    assert [(r.source, r.step) for r in got] == [("shard:0", 7), ("worker:0", 0), ("worker:0", 1)]
    assert got[1] == MetricRow("worker:0", 0, 1_700_000_000.123456, values)
    assert got[2].values == {"loss": 0.25, "n": 3.0}
    for row in got:
        assert type(row.step) is int and type(row.t) is float
        assert all(type(v) is float for v in row.values.values())
    # bit for bit: -0.0 stays negative, the smallest subnormal survives
    assert math.copysign(1.0, got[1].values["v2"]) == -1.0
    assert got[1].values["v3"] == 5e-324
    assert list(got[1].values) == list(values)  # names keep their order


def test_a_step_written_again_replaces_the_row(store: Store) -> None:
    store.create_run(RUN, {})
    store.log_metrics(RUN, [MetricRow("worker:0", 3, 1.0, {"loss": 2.0, "acc": 0.1})])
    store.log_metrics(RUN, [MetricRow("worker:1", 3, 1.0, {"loss": 9.0})])
    # a restarted worker redoes step 3: its row replaces the earlier one, names and all
    store.log_metrics(RUN, [MetricRow("worker:0", 3, 2.0, {"loss": 1.5})])
    # within one batch the last row of a step wins
    store.log_metrics(
        RUN, [MetricRow("worker:0", 4, 3.0, {"loss": 1.0}), MetricRow("worker:0", 4, 4.0, {})]
    )
    assert store.metrics(RUN) == [
        MetricRow("worker:0", 3, 2.0, {"loss": 1.5}),
        MetricRow("worker:0", 4, 4.0, {}),
        MetricRow("worker:1", 3, 1.0, {"loss": 9.0}),
    ]


def test_metrics_sorted_by_source_and_step_and_filtered(store_factory: StoreFactory) -> None:
    store = store_factory()
    store.create_run(RUN, {})
    store.create_run(OTHER, {})
    keys = [("worker:10", 2), ("launcher", 5), ("worker:2", 1), ("worker:10", 1), ("shard:0", 9)]
    keys += [("worker:2", 0), ("launcher", 0), ("worker:2", 10)]
    store.log_metrics(RUN, [MetricRow(s, n, float(n), {"x": float(n)}) for s, n in keys])
    store.log_metrics(OTHER, [MetricRow("worker:2", 99, 0.0, {})])
    reader = store_factory()  # another handle sees the committed rows
    assert [(r.source, r.step) for r in reader.metrics(RUN)] == sorted(keys)
    assert [r.step for r in reader.metrics(RUN, source="worker:2")] == [0, 1, 10]
    assert reader.metrics(RUN, source="worker:3") == []
    assert [r.step for r in reader.metrics(OTHER)] == [99]


def test_a_large_batch_is_one_call(backend: Backend, store: Store) -> None:
    store.create_run(RUN, {})
    steps = 100 if backend.name == "mongomock" else 2500  # mongomock's upserts are O(n) each
    rows = [
        MetricRow(f"worker:{w}", s, 0.5 * s, {"loss": 1 / (s + 1), "w": w})
        for w in range(4)
        for s in range(steps)
    ]
    store.log_metrics(RUN, rows)
    got = store.metrics(RUN)
    assert len(got) == 4 * steps and got == sorted(rows, key=lambda r: (r.source, r.step))


BAD_ROWS: list[tuple[object, type[Exception], str]] = [
    (MetricRow("", 0, 0.0, {}), ValueError, "source"),
    (MetricRow("w" * 65, 0, 0.0, {}), ValueError, "64"),
    (MetricRow(None, 0, 0.0, {}), ValueError, "source"),  # type: ignore[arg-type]
    (MetricRow("w", -1, 0.0, {}), ValueError, "step"),
    (MetricRow("w", 2**63, 0.0, {}), ValueError, "step"),
    (MetricRow("w", True, 0.0, {}), ValueError, "step"),
    (MetricRow("w", 1.0, 0.0, {}), ValueError, "step"),  # type: ignore[arg-type]
    (MetricRow("w", 0, math.nan, {}), ValueError, "t must be finite"),
    (MetricRow("w", 0, math.inf, {}), ValueError, "t must be finite"),
    (MetricRow("w", 0, "now", {}), ValueError, "t must be a real"),  # type: ignore[arg-type]
    (MetricRow("w", 0, 0.0, {"loss": math.nan}), ValueError, "'loss' must be finite"),
    (MetricRow("w", 0, 0.0, {"loss": -math.inf}), ValueError, "'loss' must be finite"),
    (MetricRow("w", 0, 0.0, {"loss": 10**400}), ValueError, "float64"),
    (MetricRow("w", 0, 0.0, {"loss": "1.0"}), ValueError, "real number"),  # type: ignore[dict-item]
    (MetricRow("w", 0, 0.0, {"ok": True}), ValueError, "real number"),
    (MetricRow("w", 0, 0.0, {"": 1.0}), ValueError, "metric name"),
    (MetricRow("w", 0, 0.0, {"train.loss": 1.0}), ValueError, "'/'"),
    (MetricRow("w", 0, 0.0, {"$loss": 1.0}), ValueError, "'\\$'"),
    (MetricRow("w", 0, 0.0, {7: 1.0}), ValueError, "metric name"),  # type: ignore[dict-item]
    (MetricRow("w", 0, 0.0, [("loss", 1.0)]), TypeError, "dict"),  # type: ignore[arg-type]
    ({"source": "w", "step": 0, "t": 0.0, "values": {}}, TypeError, "MetricRow"),
]


@pytest.mark.parametrize(("bad", "error", "match"), BAD_ROWS)
def test_a_bad_row_rejects_the_whole_batch(
    store: Store, bad: object, error: type[Exception], match: str
) -> None:
    store.create_run(RUN, {})
    kept = MetricRow("worker:0", 0, 1.0, {"loss": 3.0})
    store.log_metrics(RUN, [kept])
    good = [MetricRow("worker:0", 0, 2.0, {"loss": 1.0}), MetricRow("worker:0", 1, 2.0, {})]
    with pytest.raises(error, match=match) as info:
        store.log_metrics(RUN, [*good, bad])  # type: ignore[list-item]
    assert "metric row 2" in str(info.value)
    assert store.metrics(RUN) == [kept]  # nothing of the batch, not even the good rows


def test_log_metrics_takes_a_sequence_of_rows(store: Store) -> None:
    store.create_run(RUN, {})
    with pytest.raises(TypeError, match="sequence"):
        store.log_metrics(RUN, MetricRow("w", 0, 0.0, {}))  # type: ignore[arg-type]
    store.log_metrics(RUN, ())  # an empty batch writes nothing
    assert store.metrics(RUN) == []
    with pytest.raises(ValueError, match="source"):
        store.metrics(RUN, source="")


_names = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters=".$\0"), min_size=1
).filter(lambda s: len(s) <= 128)
_rows = st.builds(
    MetricRow,
    source=st.sampled_from(["worker:0", "worker:1", "shard:0", "launcher", "ü"]),
    step=st.integers(0, 2**63 - 1),
    t=st.floats(allow_nan=False, allow_infinity=False),
    values=st.dictionaries(
        _names,
        st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53),
        max_size=6,
    ),
)
_run_ids = itertools.count()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=st.lists(st.lists(_rows, max_size=8), min_size=1, max_size=3))
def test_metrics_round_trip_property(store: Store, batches: list[list[MetricRow]]) -> None:
    run_id = f"prop-{next(_run_ids)}"
    store.create_run(run_id, {})
    expected: dict[tuple[str, int], MetricRow] = {}
    for batch in batches:
        store.log_metrics(run_id, batch)
        expected |= {(r.source, r.step): r for r in batch}  # the last write of a step wins
    got = store.metrics(run_id)
    assert [(r.source, r.step) for r in got] == sorted(expected)
    for row in got:
        want = expected[row.source, row.step]
        assert row.t == want.t
        assert list(row.values) == list(want.values)
        for name, v in want.values.items():
            assert row.values[name] == float(v)
            assert math.copysign(1, row.values[name]) == math.copysign(1, v)
    store.delete_run(run_id)


# -- artifacts -------------------------------------------------------------------------------


def test_artifacts_put_list_get_replace(store: Store, clock: FakeClock) -> None:
    store.create_run(RUN, {})
    png = bytes(range(256)) * 40
    store.put_artifact(RUN, "report.md", b"# Report\n", "text/markdown; charset=utf-8")
    store.put_artifact(RUN, "plots/loss.png", png, "image/png")
    empty: Any = bytearray()  # any bytes-like object
    store.put_artifact(RUN, "empty.txt", empty, "text/plain")
    t0 = clock.now
    assert store.artifacts(RUN) == [
        ArtifactInfo("empty.txt", "text/plain", 0, t0),
        ArtifactInfo("plots/loss.png", "image/png", len(png), t0),
        ArtifactInfo("report.md", "text/markdown; charset=utf-8", 9, t0),
    ]
    assert store.get_artifact(RUN, "plots/loss.png") == png
    assert store.get_artifact(RUN, "empty.txt") == b""
    t1 = clock.advance()
    view: Any = memoryview(b"# Report v2\n")
    store.put_artifact(RUN, "report.md", view, "text/markdown")
    assert store.artifacts(RUN)[-1] == ArtifactInfo("report.md", "text/markdown", 12, t1)
    assert store.get_artifact(RUN, "report.md") == b"# Report v2\n"
    assert len(store.artifacts(RUN)) == 3


def test_artifacts_are_per_run(store: Store) -> None:
    store.create_run(RUN, {})
    store.create_run(OTHER, {})
    store.put_artifact(RUN, "a.txt", b"run 1", "text/plain")
    assert store.artifacts(OTHER) == []
    with pytest.raises(ArtifactNotFound, match="'a.txt' not found in run 'run-2'") as info:
        store.get_artifact(OTHER, "a.txt")
    assert isinstance(info.value, StoreError)
    assert (info.value.run_id, info.value.name) == (OTHER, "a.txt")
    with pytest.raises(ArtifactNotFound):
        store.get_artifact(RUN, "b.txt")


@pytest.mark.parametrize(
    "name",
    ["", "/etc/passwd", "../x", "a/../b", "a/./b", ".", "..", "a//b", "a/", "a b", "ä.md",
     "a\\b", "x" * 256, None],
)  # fmt: skip
def test_bad_artifact_names_are_refused(store: Store, name: Any) -> None:
    store.create_run(RUN, {})
    with pytest.raises(ValueError, match="artifact name"):
        store.put_artifact(RUN, name, b"x", "text/plain")
    with pytest.raises(ValueError, match="artifact name"):
        store.get_artifact(RUN, name)
    assert store.artifacts(RUN) == []


def test_bad_artifacts_are_refused(store: Store) -> None:
    store.create_run(RUN, {})
    for content_type in ["", "text", "text/", 7, "text/plain\n"]:
        with pytest.raises(ValueError, match="content_type"):
            store.put_artifact(RUN, "a.txt", b"x", content_type)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes"):
        store.put_artifact(RUN, "a.txt", "text", "text/plain")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="8 MiB"):
        store.put_artifact(RUN, "big.bin", bytes(MAX_ARTIFACT_BYTES + 1), "application/x-npy")
    assert store.artifacts(RUN) == []
    biggest = np.random.default_rng(0).bytes(MAX_ARTIFACT_BYTES)
    store.put_artifact(RUN, "big.bin", biggest, "application/octet-stream")
    assert store.get_artifact(RUN, "big.bin") == biggest


# -- delete_run --------------------------------------------------------------------------------


def _fill(store: Store, run_id: str) -> None:
    """A run with something in every place the store keeps: members, shard state, results."""
    store.create_run(run_id, {"run": run_id})
    store.register(run_id, "server", 0, address="127.0.0.1:1", pid=1, host="h")
    store.register(run_id, "worker", 0, address="", pid=2, host="h")
    store.claim_shard(run_id, 0, 1)
    store.save_shard_state(_snapshot(1, 1, run_id=run_id, n=50_000))
    store.set_run_meta(run_id, {"experiment": run_id})
    store.log_metrics(run_id, [MetricRow("worker:0", s, 0.0, {"loss": 1.0}) for s in range(5)])
    store.put_artifact(run_id, "report.md", b"# " + run_id.encode(), "text/markdown")


def test_delete_run_removes_everything_under_it(backend: Backend, store: Store) -> None:
    _fill(store, RUN)
    _fill(store, OTHER)
    chunks_per_run = backend.chunk_count() // 2
    store.delete_run(RUN)
    with pytest.raises(UnknownRun):
        store.get_run(RUN)
    with pytest.raises(UnknownRun):
        store.delete_run(RUN)  # a second delete finds nothing
    assert [r.run_id for r in store.list_runs()] == [OTHER]
    assert backend.chunk_count() == chunks_per_run
    # A new run of the same id starts from nothing: no row of the old one is left behind.
    store.create_run(RUN, {})
    rec = store.get_run(RUN)
    assert (rec.config, rec.meta, rec.finished) == ({}, {}, False)
    assert store.members(RUN) == [] and store.member(RUN, "server", 0) is None
    assert _register(store) == 1  # epochs start again
    assert store.shard_heads(RUN) == {} and store.load_shard_state(RUN, 0) is None
    assert store.metrics(RUN) == [] and store.artifacts(RUN) == []
    # The other run is untouched.
    assert store.get_run(OTHER).meta == {"experiment": OTHER}
    assert [m.role for m in store.members(OTHER)] == ["server", "worker"]
    loaded = store.load_shard_state(OTHER, 0)
    assert loaded is not None and loaded.version == 1
    assert len(store.metrics(OTHER)) == 5
    assert store.get_artifact(OTHER, "report.md") == b"# run-2"


# -- SQLite: schema version 4 and its query plans ------------------------------------------------


def test_sqlite_upgrade_from_version_3_keeps_runs(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    conn = sqlite3.connect(path)
    with conn:
        # Exactly what version 3 created: everything but what version 4 adds.
        for stmt in sqlite_schema.SCHEMA[
            : -len(RESULTS_SCHEMA)
            - len(sqlite_schema.DATASET_TABLES)
            - len(sqlite_schema.SECRETS_SCHEMA)
        ]:
            conn.execute(stmt)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '3')")
        conn.execute(
            "INSERT INTO runs VALUES (?, '{\"seed\": 4}', 1.0, 1, '{\"loss\": 0.5}')", (RUN,)
        )
        conn.execute(
            "INSERT INTO members VALUES (?, 'worker', 0, 2, '', 7, 'h', 1.0, 2.0, 'exited', '{}')",
            (RUN,),
        )
    conn.close()
    with SQLiteStore(path) as s:
        rec = s.get_run(RUN)
        assert (rec.config, rec.finished, rec.summary, rec.meta) == (
            {"seed": 4},
            True,
            {"loss": 0.5},
            {},
        )
        member = s.member(RUN, "worker", 0)
        assert member is not None and (member.epoch, member.state) == (2, "exited")
        s.set_run_meta(RUN, {"status": "done"})
        s.log_metrics(RUN, [MetricRow("worker:0", 1, 1.0, {"loss": 0.5})])
        s.put_artifact(RUN, "report.md", b"#", "text/markdown")
        assert s.get_run(RUN).meta == {"status": "done"}
        assert s.metrics(RUN)[0].values == {"loss": 0.5}
        s.delete_run(RUN)
    with SQLiteStore(tmp_path / "new.db"):
        pass

    def layout(p: Path) -> list[Any]:
        c = sqlite3.connect(p)
        try:
            version = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            tables = c.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall()
            columns = [c.execute(f"PRAGMA table_info({t})").fetchall() for (t,) in tables]
            return [version, tables, columns]
        finally:
            c.close()

    # an upgraded file and a new one have the same version, tables and columns
    assert layout(path) == layout(tmp_path / "new.db")
    assert layout(path)[0] == (str(SCHEMA_VERSION),) == ("7",)


def test_sqlite_results_queries_use_the_primary_keys(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "t.db") as s:
        s.create_run(RUN, {})
    conn = sqlite3.connect(tmp_path / "t.db")
    try:
        for query in [
            "SELECT source, step, t, vals FROM metrics WHERE run_id = 'r' ORDER BY source, step",
            "SELECT step FROM metrics WHERE run_id = 'r' AND source = 'w' ORDER BY step",
            "SELECT name FROM artifacts WHERE run_id = 'r' ORDER BY name",
        ]:
            plan = " ".join(r[-1] for r in conn.execute(f"EXPLAIN QUERY PLAN {query}"))
            assert "PRIMARY KEY" in plan or "autoindex" in plan, plan
            assert "TEMP B-TREE" not in plan, plan  # no sort: rows come in key order
    finally:
        conn.close()


# -- MongoDB: indexes, old documents, the fault seam ------------------------------------------

URI = "mongodb://h1,h2,h3/tether_test?replicaSet=rs0"


@pytest.fixture
def mongomock_client() -> mongomock.MongoClient:
    return mongomock.MongoClient()


def _mongo(client: mongomock.MongoClient, faults: FaultPlan | None = None) -> MongoStore:
    return MongoStore(URI, client_factory=lambda: client, faults=faults)


def test_mongo_results_indexes(mongomock_client: mongomock.MongoClient) -> None:
    with _mongo(mongomock_client):
        db = mongomock_client["tether_test"]
        metric_keys = {
            tuple(i["key"]): i.get("unique") for i in db.metrics.index_information().values()
        }
        assert metric_keys[(("run_id", 1), ("source", 1), ("step", 1))] is True
        artifact_keys = {
            tuple(i["key"]): i.get("unique") for i in db.artifacts.index_information().values()
        }
        assert artifact_keys[(("run_id", 1), ("name", 1))] is True


def test_mongo_runs_written_before_meta_read_as_empty(
    mongomock_client: mongomock.MongoClient,
) -> None:
    with _mongo(mongomock_client) as s:
        s.create_run(RUN, {})
        mongomock_client["tether_test"].runs.update_one({"_id": RUN}, {"$unset": {"meta": ""}})
        assert s.get_run(RUN).meta == {}
        s.set_run_meta(RUN, {"status": "running"})
        assert s.get_run(RUN).meta == {"status": "running"}


@pytest.mark.parametrize("error", ["not_primary", "auto_reconnect", "write_concern_timeout"])
def test_mongo_results_writes_fail_as_unavailable_and_retry(
    mongomock_client: mongomock.MongoClient, error: str
) -> None:
    faults = FaultPlan()
    with _mongo(mongomock_client, faults) as s:
        s.create_run(RUN, {})
        rows = [MetricRow("worker:0", n, 0.0, {"loss": 1.0}) for n in range(3)]
        for point, call in [
            ("log_metrics", lambda: s.log_metrics(RUN, rows)),
            ("put_artifact", lambda: s.put_artifact(RUN, "a.txt", b"a", "text/plain")),
            ("set_run_meta", lambda: s.set_run_meta(RUN, {"k": 1})),
        ]:
            faults.fail(point, error)
            with pytest.raises(StoreUnavailable, match=point):
                call()
            call()  # the retry succeeds, and repeating the write is harmless
            call()
        assert s.metrics(RUN) == rows
        assert s.get_artifact(RUN, "a.txt") == b"a" and s.get_run(RUN).meta == {"k": 1}
        faults.fail("delete_run", error)
        with pytest.raises(StoreUnavailable):
            s.delete_run(RUN)
        assert s.metrics(RUN) == rows  # nothing was deleted
        s.delete_run(RUN)
        assert s.list_runs() == []
        for name in ("metrics", "artifacts", "members", "shard_heads", "shard_chunks"):
            assert mongomock_client["tether_test"][name].count_documents({}) == 0, name

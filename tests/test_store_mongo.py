"""The MongoDB backend's own contract: options from the URI, error translation, the fault seam.

The backend-generic contract runs in test_store.py (mongomock and a real replica set). Here:
failure handling through :class:`tether.store.testing.FaultPlan` on mongomock -- a fault before
the head switch leaves the previous state loadable, a retry after AutoReconnect writes exactly the
new state, write-concern errors are StoreUnavailable, fencing holds -- then the real replica set
(skipped with a reason without one), and ``tether mongo up|down``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mongomock
import numpy as np
import pytest
from mongo_fixture import (  # noqa: F401  (mongodb_uri is a fixture)
    SKIP_REASON,
    drop_database,
    fresh_database_name,
    mongodb_uri,
    with_database,
)
from pymongo.errors import BulkWriteError, PyMongoError
from pymongo.read_preferences import Primary, SecondaryPreferred

import tether.store.mongo as mongo_backend
from tether.devtools import replica_set as mongo_up
from tether.store import (
    Fenced,
    MongoStore,
    ShardSnapshot,
    StoreError,
    StoreUnavailable,
    UnknownRun,
    open_store,
)
from tether.store.base import TornState
from tether.store.mongo_errors import translate_error
from tether.store.mongo_uri import (
    DEFAULT_OPTIONS,
    client_options,
    database_name,
    read_preference_of,
)
from tether.store.testing import ERRORS, POINTS, FaultPlan

RUN = "run-m"
CHUNK = 64 << 10
URI = "mongodb://h1,h2,h3/tether_test?replicaSet=rs0"


def _snapshot(epoch: int, version: int, n: int = 200_000) -> ShardSnapshot:
    arrays: dict[str, np.ndarray] = {
        "params": np.full(n, version, dtype=np.float32),  # 800 KB: 13 chunks, 2 insert batches
        "opt.count": np.full(3, version, dtype=np.int64),
    }
    return ShardSnapshot(RUN, 0, epoch, version, {"version": version}, arrays)


def _same(loaded: ShardSnapshot | None, saved: ShardSnapshot) -> bool:
    assert loaded is not None
    return (loaded.epoch, loaded.version, loaded.meta) == (
        saved.epoch,
        saved.version,
        saved.meta,
    ) and all(loaded.arrays[k].tobytes() == a.tobytes() for k, a in saved.arrays.items())


@pytest.fixture
def client() -> mongomock.MongoClient:
    return mongomock.MongoClient()


@pytest.fixture
def faults() -> FaultPlan:
    return FaultPlan()


@pytest.fixture
def make(client: mongomock.MongoClient, faults: FaultPlan) -> Iterator[Any]:
    """Handles on one mongomock database; each handle may get its own fault plan."""
    opened: list[MongoStore] = []

    def open_(plan: FaultPlan | None = faults, **kw: Any) -> MongoStore:
        s = MongoStore(URI, client_factory=lambda: client, faults=plan, chunk_bytes=CHUNK, **kw)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def store(make: Any) -> MongoStore:
    s: MongoStore = make()
    s.create_run(RUN, {})
    s.claim_shard(RUN, 0, 1)
    return s


def _chunk_docs(client: mongomock.MongoClient) -> int:
    return int(client["tether_test"].shard_chunks.count_documents({}))


# -- options from the URI -----------------------------------------------------------------------


def test_defaults_are_safe_and_fail_fast() -> None:
    opts = client_options("mongodb://h1,h2,h3/?replicaSet=rs0")
    assert opts == DEFAULT_OPTIONS
    assert opts["w"] == "majority" and opts["readConcernLevel"] == "majority"
    assert opts["retryWrites"] is True
    assert opts["serverSelectionTimeoutMS"] <= 5000 and opts["connectTimeoutMS"] <= 5000


def test_the_uri_wins_over_every_default() -> None:
    uri = (
        "mongodb://h1,h2/db?replicaSet=rs0&W=1&readPreference=secondaryPreferred"
        "&readconcernlevel=local&serverSelectionTimeoutMS=100&retryWrites=false"
    )
    opts = client_options(uri)
    for key in ("w", "readConcernLevel", "serverSelectionTimeoutMS", "retryWrites"):
        assert key not in opts  # pymongo takes it from the URI (a keyword would override it)
    assert opts["connectTimeoutMS"] == 5000  # what the URI leaves unset keeps the default
    # with client-side operation timeouts, the legacy per-socket/write timeouts are left out
    csot = client_options("mongodb://h/?timeoutMS=2000")
    assert "socketTimeoutMS" not in csot and "wTimeoutMS" not in csot
    with pytest.raises(ValueError, match="w=0"):
        client_options("mongodb://u:secret@h/?w=0")


def test_database_name_comes_from_the_uri_path() -> None:
    assert database_name("mongodb://h1,h2/?replicaSet=rs0") == "tether"
    assert database_name("mongodb://h1") == "tether"
    assert database_name("mongodb://u:p@h1:27017,h2/experiments?replicaSet=rs0") == "experiments"
    assert database_name("mongodb+srv://cluster.example.com/my%2Ddb") == "my-db"


def test_open_store_returns_a_mongo_store(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_client(uri: str, **kwargs: Any) -> mongomock.MongoClient:
        seen.update(uri=uri, kwargs=kwargs)
        return mongomock.MongoClient()

    monkeypatch.setattr(mongo_backend, "MongoClient", fake_client)
    uri = "mongodb://h1,h2,h3/runs?replicaSet=rs0&w=1"
    with open_store(uri) as s:
        assert isinstance(s, MongoStore)
        assert s.uri == uri and s.database_name == "runs"
        s.create_run(RUN, {"k": 1})
        assert s.get_run(RUN).config == {"k": 1}
    assert seen["uri"] == uri and "w" not in seen["kwargs"]
    assert seen["kwargs"]["readConcernLevel"] == "majority"
    with open_store("mongodb+srv://cluster.example.com/") as s:
        assert isinstance(s, MongoStore) and s.database_name == "tether"


def test_recovery_reads_are_majority_on_the_primary_and_status_reads_configurable(
    client: mongomock.MongoClient,
) -> None:
    s = MongoStore(URI, client_factory=lambda: client, read_preference="secondaryPreferred")
    assert s._heads_primary.read_concern.level == "majority"
    assert s._chunks_primary.read_preference == Primary()
    assert s._members_status.read_preference == SecondaryPreferred()
    assert s._runs_status.read_preference == SecondaryPreferred()
    s.close()
    local = MongoStore(URI + "&readConcernLevel=local", client_factory=lambda: client)
    assert local._chunks_primary.read_concern.level == "local"  # the URI's level is respected
    local.close()
    with pytest.raises(ValueError, match="read preference"):
        read_preference_of("closest")


def test_a_store_is_not_pickled_nor_used_after_close(store: MongoStore) -> None:
    import pickle

    with pytest.raises(TypeError, match="store.uri"):
        pickle.dumps(store)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.load_shard_state(RUN, 0)


def test_config_keys_round_trip_like_json(store: MongoStore) -> None:
    config: dict[Any, Any] = {"a": (1, 2), 3: {"nested.key": 1}}
    store.create_run("r2", config)
    assert store.get_run("r2").config == {"a": [1, 2], "3": {"nested.key": 1}}
    epoch = store.register("r2", "worker", 0, address="", pid=1, host="h")
    store.heartbeat("r2", "worker", 0, epoch, {"clock": 1, "a.b": 2})  # not a field path
    store.heartbeat("r2", "worker", 0, epoch, {"loss": 0.5, "$x": 3})
    m = store.member("r2", "worker", 0)
    assert m is not None and m.info == {"clock": 1, "a.b": 2, "loss": 0.5, "$x": 3}
    with pytest.raises(Fenced):
        store.heartbeat("r2", "worker", 0, epoch + 1, {"a.b": 9})
    with pytest.raises(UnknownRun):
        store.heartbeat("nope", "worker", 0, epoch, {"a.b": 9})


# -- error translation --------------------------------------------------------------------------

_UNAVAILABLE = {
    "auto_reconnect",
    "not_primary",
    "network_timeout",
    "server_selection_timeout",
    "write_concern_timeout",
    "write_concern_error",
    "execution_timeout",
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_pymongo_errors_map_to_the_store_vocabulary(name: str) -> None:
    error = translate_error(ERRORS[name]("here"), "save", "mongodb://h/")  # type: ignore[arg-type]
    expected = StoreUnavailable if name in _UNAVAILABLE else StoreError
    assert type(error) is expected
    # the message names the operation and the pymongo error
    assert "save failed" in str(error) and type(ERRORS[name]("x")).__name__ in str(error)


def test_bulk_write_errors_are_retryable_only_for_write_concern() -> None:
    wc = BulkWriteError({"writeErrors": [], "writeConcernErrors": [{"code": 64}]})
    dup = BulkWriteError({"writeErrors": [{"code": 11000}], "writeConcernErrors": []})
    assert type(translate_error(wc, "save", "m")) is StoreUnavailable
    assert type(translate_error(dup, "save", "m")) is StoreError


# -- the fault seam (mongomock) -----------------------------------------------------------------


def test_fault_plan_rejects_unknown_points_and_errors() -> None:
    plan = FaultPlan()
    with pytest.raises(ValueError, match="fault point"):
        plan.fail("before_chunk")
    with pytest.raises(ValueError, match="unknown error"):
        plan.fail("save", "disk_full")
    assert {"before_chunks", "after_chunks", "before_head", "after_head"} <= POINTS


@pytest.mark.parametrize("point", ["before_chunks", "chunks", "after_chunks", "before_head"])
def test_a_fault_before_the_head_switch_leaves_the_previous_state(
    store: MongoStore, faults: FaultPlan, client: mongomock.MongoClient, point: str
) -> None:
    v1 = _snapshot(1, 1)
    store.save_shard_state(v1)
    faults.fail(point, "not_primary", skip=1 if point == "chunks" else 0)
    with pytest.raises(StoreUnavailable, match="save failed: NotPrimaryError"):
        store.save_shard_state(_snapshot(1, 2))
    assert _same(store.load_shard_state(RUN, 0), v1)
    assert store.shard_heads(RUN)[0]["version"] == 1
    # a retry (the caller's, after StoreUnavailable) writes exactly the new state
    v2 = _snapshot(1, 2)
    store.save_shard_state(v2)
    assert _same(store.load_shard_state(RUN, 0), v2)
    assert _chunk_docs(client) == 2 * 14  # v2 and v1 only: the orphans were collected


def test_a_lost_reply_after_the_head_switch_is_safe_to_retry(
    store: MongoStore, faults: FaultPlan, client: mongomock.MongoClient
) -> None:
    store.save_shard_state(_snapshot(1, 1))
    faults.fail("after_head", "auto_reconnect")  # applied, but the caller hears an error
    v2 = _snapshot(1, 2)
    with pytest.raises(StoreUnavailable, match="AutoReconnect"):
        store.save_shard_state(v2)
    assert _same(store.load_shard_state(RUN, 0), v2)
    store.save_shard_state(v2)  # the retry: same version, a rewrite
    assert _same(store.load_shard_state(RUN, 0), v2)
    assert _chunk_docs(client) == 2 * 14


@pytest.mark.parametrize("error", ["write_concern_timeout", "write_concern_error"])
@pytest.mark.parametrize("point", ["register", "heartbeat", "claim", "chunks", "before_head"])
def test_write_concern_errors_are_unavailable(
    store: MongoStore, faults: FaultPlan, error: str, point: str
) -> None:
    epoch = store.register(RUN, "server", 0, address="a:1", pid=1, host="h")
    faults.fail(point, error)
    with pytest.raises(StoreUnavailable, match="WriteConcernError|WTimeoutError"):
        if point == "register":
            store.register(RUN, "server", 0, address="a:1", pid=1, host="h")
        elif point == "heartbeat":
            store.heartbeat(RUN, "server", 0, epoch, {"clock": 1})
        elif point == "claim":
            store.claim_shard(RUN, 0, 2)
        else:
            store.save_shard_state(_snapshot(1, 1))


def test_a_retried_register_takes_exactly_one_more_epoch(
    store: MongoStore, faults: FaultPlan
) -> None:
    assert store.register(RUN, "worker", 0, address="", pid=1, host="h") == 1
    faults.fail("register", "server_selection_timeout", times=2)
    for _ in range(2):
        with pytest.raises(StoreUnavailable, match="ServerSelectionTimeoutError"):
            store.register(RUN, "worker", 0, address="", pid=1, host="h")
    assert store.register(RUN, "worker", 0, address="", pid=1, host="h") == 2


def test_fencing_holds_through_faults(make: Any, faults: FaultPlan) -> None:
    zombie_faults = FaultPlan()
    zombie, successor = make(zombie_faults), make()
    zombie.create_run(RUN, {})
    zombie.claim_shard(RUN, 0, 1)
    zombie.save_shard_state(_snapshot(1, 1))
    # The successor's claim is retried after a lost reply; the claim is idempotent.
    faults.fail("claim", "network_timeout")
    with pytest.raises(StoreUnavailable):
        successor.claim_shard(RUN, 0, 2)
    successor.claim_shard(RUN, 0, 2)
    # The zombie's save got its chunks in before it was fenced: refused, the head unchanged.
    with pytest.raises(Fenced, match="epoch 2"):
        zombie.save_shard_state(_snapshot(1, 5))
    loaded = successor.load_shard_state(RUN, 0)
    assert _same(loaded, _snapshot(1, 1))
    # A zombie write that fails and is retried is still fenced.
    zombie_faults.fail("before_head", "not_primary")
    with pytest.raises(StoreUnavailable):
        zombie.save_shard_state(_snapshot(1, 6))
    with pytest.raises(Fenced):
        zombie.save_shard_state(_snapshot(1, 6))
    successor.save_shard_state(_snapshot(2, 2))
    assert _same(zombie.load_shard_state(RUN, 0), _snapshot(2, 2))


def test_a_failed_collection_does_not_fail_the_save(
    store: MongoStore, faults: FaultPlan, client: mongomock.MongoClient, caplog: Any
) -> None:
    store.save_shard_state(_snapshot(1, 1))
    store.save_shard_state(_snapshot(1, 2))
    faults.fail("gc", "network_timeout")
    with caplog.at_level(logging.WARNING, logger="tether.store.mongo"):
        store.save_shard_state(_snapshot(1, 3))  # durable: the save succeeds
    assert "not deleted" in caplog.text and "NetworkTimeout" in caplog.text
    assert _same(store.load_shard_state(RUN, 0), _snapshot(1, 3))
    assert _chunk_docs(client) == 3 * 14
    store.save_shard_state(_snapshot(1, 4))  # the next save collects what was left
    assert _chunk_docs(client) == 2 * 14


def test_a_load_retries_when_the_head_moves_under_it(make: Any, faults: FaultPlan) -> None:
    writer_faults = FaultPlan()
    writer, reader = make(writer_faults), make()
    writer.create_run(RUN, {})
    writer.claim_shard(RUN, 0, 1)
    writer.save_shard_state(_snapshot(1, 1))

    def two_saves(_point: str) -> None:  # the head moves twice: v1's chunks are collected
        writer.save_shard_state(_snapshot(1, 2))
        writer.save_shard_state(_snapshot(1, 3))

    faults.on("read_chunks", two_saves)  # after the reader read the head (v1)
    assert _same(reader.load_shard_state(RUN, 0), _snapshot(1, 3))
    assert faults.hits["read"] == 2  # it read the head again


def test_a_state_with_lost_chunks_is_an_error_not_a_torn_load(
    store: MongoStore, client: mongomock.MongoClient, faults: FaultPlan
) -> None:
    store.save_shard_state(_snapshot(1, 1))
    chunks = client["tether_test"].shard_chunks
    chunks.delete_one({"name": "params", "idx": 3})
    with pytest.raises(TornState, match="missing"):
        store.load_shard_state(RUN, 0)
    assert faults.hits["read"] == 2  # re-read once; the head had not moved, so it gave up


def test_reads_fail_fast_and_recover(store: MongoStore, faults: FaultPlan) -> None:
    store.save_shard_state(_snapshot(1, 1))
    faults.fail("read", "server_selection_timeout")
    with pytest.raises(StoreUnavailable, match="load failed"):
        store.load_shard_state(RUN, 0)
    assert _same(store.load_shard_state(RUN, 0), _snapshot(1, 1))
    faults.fail("members", "not_primary")
    with pytest.raises(StoreUnavailable, match="members failed"):
        store.members(RUN)
    assert store.members(RUN) == []
    faults.fail("get_run", "operation_failure")
    with pytest.raises(StoreError, match="get_run failed: OperationFailure") as err:
        store.get_run(RUN)
    assert not isinstance(err.value, StoreUnavailable)  # not retryable


def test_a_hook_cannot_hide_errors(store: MongoStore, faults: FaultPlan) -> None:
    # Errors other than pymongo's are not translated or swallowed.
    def boom(_point: str) -> None:
        raise RuntimeError("bug")

    faults.on("save", boom)
    with pytest.raises(RuntimeError, match="bug"):
        store.save_shard_state(_snapshot(1, 1))
    assert not issubclass(RuntimeError, PyMongoError)


# -- a real replica set (skipped without mongod / TETHER_TEST_MONGODB_URI) ----------------------


@pytest.fixture
def real_uri(mongodb_uri: str) -> Iterator[str]:  # noqa: F811
    uri = with_database(mongodb_uri, fresh_database_name())
    yield uri
    drop_database(uri)


def test_real_set_uses_majority_and_round_trips_16_mib(real_uri: str) -> None:
    with MongoStore(real_uri) as s:
        assert s.db.write_concern.document.get("w") == "majority"
        assert s.client.options.read_concern.level == "majority"
        s.create_run(RUN, {})
        s.claim_shard(RUN, 0, 1)
        snap = ShardSnapshot(RUN, 0, 1, 1, {}, {"p": np.arange(4 << 20, dtype=np.float32)})
        s.save_shard_state(snap)
        assert _same(s.load_shard_state(RUN, 0), snap)
        chunk_sizes = [len(d["data"]) for d in s.db.shard_chunks.find({}, {"data": 1})]
        assert len(chunk_sizes) == 4 and max(chunk_sizes) == 4 << 20  # well under 16 MiB


def test_real_set_survives_a_primary_stepdown(real_uri: str) -> None:
    import time

    with MongoStore(real_uri, chunk_bytes=CHUNK) as s:
        s.create_run(RUN, {})
        s.claim_shard(RUN, 0, 1)
        s.save_shard_state(_snapshot(1, 1))
        try:
            s.client.admin.command("replSetStepDown", 5, secondaryCatchUpPeriodSecs=2)
        except PyMongoError:
            pass  # the primary closes connections as it steps down
        deadline = time.monotonic() + 60
        while True:  # the caller's bounded retry after StoreUnavailable
            try:
                s.save_shard_state(_snapshot(1, 2))
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "no new primary within 60 s"
        assert _same(s.load_shard_state(RUN, 0), _snapshot(1, 2))


# -- tether mongo up|down -----------------------------------------------------------------------


def _mongo_cli(*args: str, path: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=path)
    return subprocess.run(
        [sys.executable, "-m", "tether.cli.mongo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )


def test_mongo_up_without_mongod_says_so_and_exits_2(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = _mongo_cli("mongo", "up", "--dir", str(tmp_path / "rs"), path=str(empty), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"tether mongo up: {mongo_up.NO_MONGOD}"
    assert proc.stdout == ""
    assert not (tmp_path / "rs").exists()


def test_mongo_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    proc = _mongo_cli("mongo", "up", "--ports", "1,2", path=os.environ["PATH"], cwd=tmp_path)
    assert proc.returncode == 2 and "three distinct ports" in proc.stderr
    proc = _mongo_cli("mongo", "down", "--dir", "nowhere", path=os.environ["PATH"], cwd=tmp_path)
    assert proc.returncode == 2 and "pids.json" in proc.stderr


@pytest.mark.skipif(mongo_up.shutil.which("mongod") is None, reason=SKIP_REASON)
def test_mongo_up_and_down_with_a_real_mongod(tmp_path: Path) -> None:
    path = os.environ["PATH"]
    rs_dir = tmp_path / "rs"
    up = _mongo_cli("mongo", "up", "--dir", str(rs_dir), "--json", path=path, cwd=tmp_path)
    try:
        assert up.returncode == 0, up.stderr
        result = json.loads(up.stdout.strip().splitlines()[-1])
        assert (
            result["uri"].startswith("mongodb://127.0.0.1:") and "replicaSet=rs0" in result["uri"]
        )
        assert len(result["pids"]) == 3 and result["dir"] == str(rs_dir.resolve())
        uri = with_database(result["uri"], "tether_cli_test")
        with MongoStore(uri) as s:
            s.create_run(RUN, {"ok": True})
            assert s.get_run(RUN).config == {"ok": True}
        again = _mongo_cli("mongo", "up", "--dir", str(rs_dir), path=path, cwd=tmp_path)
        assert again.returncode == 0 and again.stdout.strip() == result["uri"]  # still running
    finally:
        down = _mongo_cli("mongo", "down", "--dir", str(rs_dir), "--json", path=path, cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert sorted(json.loads(down.stdout.strip().splitlines()[-1])["stopped"]) == sorted(
        result["pids"]
    )
    for pid in result["pids"]:
        assert not mongo_up._is_our_mongod(pid, rs_dir)
    assert not (rs_dir / "pids.json").exists()


def test_mongo_up_reports_a_member_that_does_not_start(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mongod"  # stands in for a mongod that rejects its options
    fake.write_text(
        "#!/bin/sh\necho 'Error parsing command line: unrecognised option' >&2\nexit 3\n"
    )
    fake.chmod(0o755)
    rs_dir = tmp_path / "rs"
    proc = _mongo_cli("mongo", "up", "--dir", str(rs_dir), path=str(bin_dir), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "exited with code 3" in proc.stderr and "unrecognised option" in proc.stderr
    assert not (rs_dir / "pids.json").exists()


def test_mongo_down_signals_only_the_recorded_mongods(tmp_path: Path) -> None:
    rs_dir = tmp_path / "rs"
    (rs_dir / "27017").mkdir(parents=True)
    fake = tmp_path / "bin" / "mongod"  # a process whose argv[0] is mongod, data under rs_dir
    fake.parent.mkdir()
    fake.symlink_to(sys.executable)
    sleeper = [str(fake), "-c", "import time; time.sleep(120)"]
    ours = subprocess.Popen([*sleeper, "--dbpath", str(rs_dir / "27017")])
    elsewhere = subprocess.Popen([*sleeper, "--dbpath", str(tmp_path / "other")])
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        pids = [ours.pid, elsewhere.pid, stranger.pid]
        (rs_dir / "pids.json").write_text(json.dumps({"uri": "u", "pids": pids, "ports": []}))
        assert mongo_up._is_our_mongod(ours.pid, rs_dir)
        assert not mongo_up._is_our_mongod(elsewhere.pid, rs_dir)
        assert not mongo_up._is_our_mongod(stranger.pid, rs_dir)
        assert mongo_up.mongo_down(rs_dir, timeout_s=20) == [ours.pid]
        assert ours.wait(20) is not None
        assert elsewhere.poll() is None and stranger.poll() is None  # never signalled
        assert not (rs_dir / "pids.json").exists()
    finally:
        for p in (ours, elsewhere, stranger):
            p.kill()
            p.wait(20)


def test_messages_never_show_the_password(client: mongomock.MongoClient) -> None:
    with MongoStore(
        "mongodb://alice:s3cret@h1,h2/db?replicaSet=rs0", client_factory=lambda: client
    ) as s:
        assert "s3cret" in s.uri  # a child process needs it to connect
        for call in (lambda: s.get_run("nope"), lambda: s.load_shard_state("nope", 0)):
            with pytest.raises(UnknownRun) as err:
                call()
            assert "s3cret" not in str(err.value) and "***@h1,h2" in str(err.value)
        assert "s3cret" not in repr(s)


@pytest.mark.parametrize("skip", [1, 2], ids=["chunk-insert", "publish"])
def test_a_fault_during_a_dataset_import_leaves_nothing_behind(
    store: MongoStore, faults: FaultPlan, client: mongomock.MongoClient, skip: int
) -> None:
    """A dataset import that fails while writing its chunks or publishing its header leaves
    no dataset and no chunks (DESIGN §11: all or nothing); a retry then succeeds."""
    from tether.data import import_table
    from tether.data.schema import table_from_arrays
    from tether.store import UnknownDataset

    table = table_from_arrays({"x": np.arange(40, dtype=np.float32)}, "test arrays")
    faults.fail("put_dataset", "not_primary", skip=skip)  # pass 0 is the existence check
    with pytest.raises(StoreUnavailable, match="NotPrimaryError"):
        import_table(store, "d", table, chunk_records=8)
    with pytest.raises(UnknownDataset):
        store.dataset_info("d")
    assert client["tether_test"].dataset_chunks.count_documents({}) == 0
    info = import_table(store, "d", table, chunk_records=8)
    assert info.records == 40 and info.chunks == 5

"""The member contract for any scheduler (DESIGN §12): `tether run create`, member ids from the
environment, `--advertise`, `--store-db`, and members that exit 0 on their own once the run is
finished, here with every member on its own loopback address as if on its own host."""

from __future__ import annotations

import json

import pytest

from tether.cli.common import UsageError, member_id, store_uri
from tether.cli.main import build_parser
from tether.member.join import advertised_address, split_host_port
from tether.store import open_store
from tether.store.mongo_uri import client_options, database_name, pymongo_uri, with_database

RUN_FLAGS = ["--steps", "25", "--seed", "3", "--no-shared-memory"]


def test_member_id_comes_from_the_flag_then_the_schedulers_variables():
    assert member_id(4, "--shard-id", {"JOB_COMPLETION_INDEX": "1"}) == 4
    assert member_id(None, "--shard-id", {"JOB_COMPLETION_INDEX": "2", "SLURM_PROCID": "0"}) == 2
    assert member_id(None, "--shard-id", {"SLURM_PROCID": "3"}) == 3
    env = {"TETHER_MEMBER_ID": "5", "JOB_COMPLETION_INDEX": "1", "SLURM_PROCID": "0"}
    assert member_id(None, "--worker-id", env) == 5
    with pytest.raises(UsageError, match="TETHER_MEMBER_ID, JOB_COMPLETION_INDEX, SLURM_PROCID"):
        member_id(None, "--worker-id", {})
    with pytest.raises(UsageError, match="JOB_COMPLETION_INDEX='x'"):
        member_id(None, "--worker-id", {"JOB_COMPLETION_INDEX": "x"})


def test_the_advertised_address_is_one_others_can_dial():
    assert advertised_address("0.0.0.0:0", 7001, "10.1.2.3") == "10.1.2.3:7001"
    assert advertised_address("0.0.0.0:7000", 7000, "pod-3.svc:9000") == "pod-3.svc:9000"
    assert advertised_address("127.0.0.2:0", 7001, None) == "127.0.0.2:7001"
    wildcard_host = advertised_address("0.0.0.0:0", 7001, None).rsplit(":", 1)[0]
    assert wildcard_host not in ("0.0.0.0", "")
    assert split_host_port("[::1]:7000", "x") == ("[::1]", 7000)
    for bad in ("", "::1", "host:port", "[::1", "h:70000"):
        with pytest.raises(ValueError, match="--advertise"):
            split_host_port(bad, "--advertise")
    with pytest.raises(ValueError, match="port 0"):
        advertised_address("0.0.0.0:0", 7001, "h:0")


def test_store_db_names_the_database_and_keeps_the_auth_database_in_the_path():
    operator_uri = "mongodb+srv://u:p@rs.example/admin?replicaSet=rs0&ssl=true"
    uri = with_database(operator_uri, "training")
    assert database_name(uri) == "training"
    assert pymongo_uri(uri) == operator_uri  # what pymongo sees: the path is still /admin
    assert "tetherdb" not in {k.lower() for k in client_options(uri)}
    assert database_name(with_database("mongodb://h1,h2", "x")) == "x"
    assert database_name(with_database(uri, "other")) == "other"  # replaced, not doubled
    assert database_name("mongodb://h/admin?tetherDb=runs") == "runs"
    assert database_name("mongodb://h/admin") == "admin"
    with pytest.raises(ValueError, match="not a MongoDB database name"):
        with_database(operator_uri, "a.b")
    args = build_parser().parse_args(
        ["server", "--store", "sqlite:///x.db", "--run", "r", "--store-db", "d"]
    )
    with pytest.raises(UsageError, match="not MongoDB"):
        store_uri(args)


def test_run_create_is_idempotent_and_refuses_another_config(tether_cli, tmp_path):
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    first = tether_cli("run", "create", "--store", store, "--run-id", "r1", *RUN_FLAGS, "--json")
    assert first.json() == {"run_id": "r1", "created": True}
    again = tether_cli("run", "create", "--store", store, "--run-id", "r1", *RUN_FLAGS, "--json")
    assert again.json() == {"run_id": "r1", "created": False}
    other = tether_cli("run", "create", "--store", store, "--run-id", "r1", "--steps", "26")
    rc, _, err = other.finish()
    assert rc == 2 and "steps" in err and "another config" in err
    with open_store(store) as s:
        assert s.get_run("r1").config["steps"] == 25  # unchanged by the refused create
    fresh = tether_cli("run", "create", "--store", store, *RUN_FLAGS)
    rc, out, _ = fresh.finish()
    assert rc == 0 and out.strip() and out.strip() != "r1"


@pytest.mark.parametrize("command", [["server", "--shard-id", "0"], ["run", "wait"]])
def test_a_store_that_cannot_be_reached_exits_1_so_a_scheduler_retries(tether_cli, command):
    # Nothing listens on port 9 of loopback: a replica set that is not up yet.
    store = "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=300&connectTimeoutMS=300"
    rc, _, err = tether_cli(*command, "--store", store, "--run", "r1").finish()
    assert rc == 1 and "127.0.0.1:9" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_members_on_their_own_hosts_complete_a_run_and_exit_by_themselves(tether_cli, tmp_path):
    """As a scheduler would: members started before the run exists, each on its own loopback
    host, ids from the environment, shards listening on every interface or on their host only
    and dialled at the address they advertise; the last worker concludes the run and every
    member exits 0 on its own. The result is bit for bit that of `tether launch`."""
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    env = {"TETHER_STORE": store, "TETHER_RUN": "hosts"}
    members = {
        # shard 0 binds every interface and is dialled where it advertises itself
        "server 0": tether_cli(
            "server", "--listen", "0.0.0.0:0", "--advertise", "127.0.0.2",
            env={**env, "JOB_COMPLETION_INDEX": "0"},
        ),
        # shard 1 is reachable on its own host's address only
        "server 1": tether_cli(
            "server", "--listen", "127.0.0.3:0", env={**env, "SLURM_PROCID": "1"}
        ),
        "worker 0": tether_cli(
            "worker", "--listen", "127.0.0.4:0", env={**env, "TETHER_MEMBER_ID": "0"}
        ),
        "worker 1": tether_cli(
            "worker", "--listen", "0.0.0.0:0", "--advertise", "127.0.0.5",
            env={**env, "JOB_COMPLETION_INDEX": "1"},
        ),
    }  # fmt: skip
    created = tether_cli("run", "create", "--run-id", "hosts", *RUN_FLAGS, env=env)
    assert created.finish()[0] == 0
    waited = tether_cli("run", "wait", "--timeout", "400", "--json", env=env).json(450)
    logs = {}
    for name, proc in members.items():
        rc, _, logs[name] = proc.finish(120)
        assert rc == 0, f"{name} exited {rc}:\n{logs[name][-2000:]}"
    assert all("has finished" in logs[f"server {i}"] for i in range(2))  # told by the store
    assert any("concluded run hosts" in logs[f"worker {i}"] for i in range(2))
    with open_store(store) as s:
        record = s.get_run("hosts")
        addresses = {(m.role, m.member_id): m.address for m in s.members("hosts")}
        states = {m.state for m in s.members("hosts")}
    assert record.finished and record.summary == waited
    assert states == {"exited"}
    assert addresses[("server", 0)].startswith("127.0.0.2:")
    assert addresses[("server", 1)].startswith("127.0.0.3:")
    assert addresses[("worker", 0)].startswith("127.0.0.4:")
    assert addresses[("worker", 1)].startswith("127.0.0.5:")
    assert waited["updates_applied"] == 25 and waited["segment_pulls"] == 0
    assert waited["ledger"]["ok"] and waited["lost_updates"] == 0
    # A member a scheduler starts again after the end has nothing to do.
    late = tether_cli("worker", "--worker-id", "0", env=env)
    rc, _, err = late.finish(120)
    assert rc == 0 and "has finished" in err
    # The same run driven by `tether launch`: the same parameters, bit for bit (BSP).
    launched = tether_cli("launch", *RUN_FLAGS, "--run-dir", str(tmp_path / "launch"), "--json")
    assert launched.json(400)["params_sha256"] == waited["params_sha256"]
    json.dumps(waited)  # the stored summary is plain JSON

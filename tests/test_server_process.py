"""`tether server` on its own, as a cluster scheduler would start it (DESIGN §1, §9)."""

from __future__ import annotations

import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import wait_until
from tether.worker.client import ShardClient

from tether.config import RunConfig
from tether.launcher import resolve_config
from tether.store import default_store_uri, open_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def run_in_store(tmp_path):
    uri = default_store_uri(tmp_path / "run")
    config = resolve_config(RunConfig(run_id="cluster-run", shards=2, workers=3, model="logreg"))
    store = open_store(uri)
    store.create_run(config.run_id, config.to_dict())
    yield uri, config, store
    store.close()


def test_a_shard_registers_serves_health_and_stops_gracefully_on_sigterm(tether_cli, run_in_store):
    uri, config, store = run_in_store
    server = tether_cli("server", "--store", uri, "--run", config.run_id, "--shard-id", "1")
    wait_until(lambda: store.member(config.run_id, "server", 1) is not None, 60, "registration")
    member = store.member(config.run_id, "server", 1)
    assert member.epoch == 1 and member.address.startswith("127.0.0.1:")
    assert member.pid == server.proc.pid
    channel = grpc.insecure_channel(member.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tether.v1.ParameterServer"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    client = ShardClient(member.address, config.run_id)
    info = client.info()
    client.close()
    half = config.num_params // 2
    assert (info.shard_id, info.offset, info.length) == (1, half, config.num_params - half)
    assert [w.clock for w in info.workers] == [0, 0, 0]
    server.proc.send_signal(signal.SIGTERM)
    rc, _, err = server.finish(60)
    assert rc == 0, err
    assert store.member(config.run_id, "server", 1).state == "exited"


def test_a_second_shard_with_the_same_id_takes_the_next_epoch(tether_cli, run_in_store):
    uri, config, store = run_in_store
    args = ("server", "--store", uri, "--run", config.run_id, "--shard-id", "0")
    first = tether_cli(*args)
    wait_until(lambda: store.member(config.run_id, "server", 0) is not None, 60, "first shard")
    second = tether_cli(*args)
    wait_until(
        lambda: store.member(config.run_id, "server", 0).pid == second.proc.pid, 60, "second"
    )
    assert store.member(config.run_id, "server", 0).epoch == 2
    # The first shard learns from its next heartbeat that it was replaced, and exits.
    rc, _, err = first.finish(60)
    assert rc == 1 and "fenced" in err
    second.proc.send_signal(signal.SIGTERM)
    assert second.finish(60)[0] == 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["--shard-id", "2"], "outside 0..1"),
        (["--shard-id", "0", "--run", "nope"], "nope"),
    ],
)
def test_bad_server_arguments_exit_2_with_one_sentence(tether_cli, run_in_store, args, words):
    uri, config, _ = run_in_store
    base = ["server", "--store", uri, "--run", config.run_id]
    rc, _, err = tether_cli(*base, *args).finish(60)
    assert rc == 2 and words in err and "Traceback" not in err

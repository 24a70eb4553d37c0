"""`tether server` on its own, as a cluster scheduler would start it (DESIGN §1, §9)."""

from __future__ import annotations

import signal

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers import wait_until
from tether.config import RunConfig
from tether.store import default_store_uri, open_store
from tether.tasks.build import resolve_config
from tether.transport import run_security
from tether.worker.client import ShardClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def run_in_store(tmp_path):
    uri = default_store_uri(tmp_path / "run")
    config = resolve_config(
        RunConfig.of("cluster-run", shards=2, workers=3, model="logreg", replication="off")
    )
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
    client = ShardClient(member.address, config.run_id, security=run_security(store, uri, config))
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
        (["--shard-id", "0", "--run", "nope", "--wait-for-run", "0"], "nope"),
    ],
)
def test_bad_server_arguments_exit_2_with_one_sentence(tether_cli, run_in_store, args, words):
    uri, config, _ = run_in_store
    base = ["server", "--store", uri, "--run", config.run_id]
    rc, _, err = tether_cli(*base, *args).finish(60)
    assert rc == 2 and words in err and "Traceback" not in err


def test_a_paused_shard_that_was_replaced_is_fenced_when_it_resumes(tether_cli, tmp_path):
    """SIGSTOP a shard, start its replacement, SIGCONT the old one (DESIGN §5, zombies)."""
    uri = default_store_uri(tmp_path / "run")
    config = resolve_config(
        RunConfig.of("zombie", shards=1, workers=1, mode="asp", replication="sync")
    )
    store = open_store(uri)
    store.create_run(config.run_id, config.to_dict())
    args = ("server", "--store", uri, "--run", config.run_id, "--shard-id", "0")

    def serving(pid: int):
        m = store.member(config.run_id, "server", 0)
        return m if m is not None and m.pid == pid and "serving_since" in m.info else None

    old = tether_cli(*args)
    wait_until(lambda: serving(old.proc.pid), 60, "the first shard to serve")
    old_address = serving(old.proc.pid).address
    client = ShardClient(old_address, config.run_id, security=run_security(store, uri, config))
    grad = np.full(config.num_params, 0.5, dtype=np.float32)
    ack = client.push(grad, worker_id=0, clock=0, seq=0, read_version=0, epoch=1)
    assert ack.applied and ack.version == 1  # sync: durable in the store before this ack

    old.proc.send_signal(signal.SIGSTOP)
    new = tether_cli(*args)
    wait_until(lambda: serving(new.proc.pid), 60, "the replacement to serve")
    replacement = serving(new.proc.pid)
    assert replacement.epoch == 2
    new_client = ShardClient(
        replacement.address, config.run_id, security=run_security(store, uri, config)
    )
    info = new_client.info()
    assert info.version == 1 and info.restored_version == 1  # the acknowledged push survived

    old.proc.send_signal(signal.SIGCONT)
    with pytest.raises(grpc.RpcError) as err:
        client.push(grad, worker_id=0, clock=1, seq=1, read_version=1, epoch=1, timeout_s=30)
    assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE)
    rc, _, stderr = old.finish(60)
    assert rc == 1 and "fenced" in stderr
    assert new_client.info().version == 1  # the zombie's push was applied nowhere
    assert store.shard_heads(config.run_id)[0]["last"] == 1  # its log ends at version 1
    client.close()
    new_client.close()
    new.proc.send_signal(signal.SIGTERM)
    assert new.finish(60)[0] == 0
    store.close()

"""The transport choke point (DESIGN §13): run tokens, TLS and mutual TLS over real sockets.

Every refusal is checked twice: the caller sees it (UNAUTHENTICATED for a token, UNAVAILABLE for
a failed handshake), and the shard's version and parameters are what they were.
"""

from __future__ import annotations

import ast
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers import REPO, RUN, wait_until
from tether.config import OptimizerConfig, RunConfig
from tether.consistency import Consistency, Mode
from tether.devtools.certs import create_certs
from tether.proto import ps_pb2
from tether.server.host import ShardHost
from tether.server.main import add_services, create_server
from tether.server.servicer import ShardServicer
from tether.server.state import ShardSpec, ShardState
from tether.store import RunToken, open_store
from tether.store.secrets import accepted, current, rotated
from tether.transport import (
    AuthError,
    Security,
    TlsFiles,
    TokenBook,
    run_security,
    unauthenticated_refusal,
)
from tether.worker.client import ShardClient

N = 256


class Served:
    """One in-process shard behind a server made with ``security``."""

    def __init__(self, security: Security) -> None:
        spec = ShardSpec(
            RUN, 0, 0, N, 1, Consistency(Mode.ASP), OptimizerConfig("sgd", lr=0.1), 1 << 12
        )
        self.state = ShardState(spec, np.linspace(-1, 1, N, dtype=np.float32))
        self.server, port = create_server("127.0.0.1:0", max_workers=8, security=security)
        add_services(self.server, ShardServicer(ShardHost(self.state), wait_timeout_s=5))
        self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.clients: list[ShardClient] = []

    def client(self, security: Security) -> ShardClient:
        c = ShardClient(self.address, RUN, security=security, chunk_bytes=1 << 12)
        self.clients.append(c)
        return c

    def fingerprint(self) -> tuple[int, str]:
        return self.state.version, hashlib.sha256(self.state.params.tobytes()).hexdigest()

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.server.stop(grace=0).wait()


@pytest.fixture
def serve() -> Iterator[Callable[[Security], Served]]:
    started: list[Served] = []

    def start(security: Security) -> Served:
        started.append(Served(security))
        return started[-1]

    yield start
    for s in started:
        s.close()


def push(client: ShardClient, seq: int = 0) -> ps_pb2.PushReply:
    grad = np.full(N, 0.01, dtype=np.float32)
    return client.push(grad, worker_id=0, clock=seq, seq=seq, read_version=0, epoch=1, timeout_s=10)


def refused_with(code: grpc.StatusCode, call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    return str(caught.value.details())


def every_call(client: ShardClient) -> list[Callable[[], object]]:
    out = np.empty(N, dtype=np.float32)
    return [
        lambda: client.info(timeout_s=10),
        lambda: client.pull_into(out, timeout_s=10),
        lambda: push(client),
    ]


# -- run tokens ----------------------------------------------------------------------------------


def test_calls_without_or_with_a_wrong_token_are_refused_and_change_nothing(serve):
    shard = serve(Security(TokenBook.fixed("right")))
    assert push(shard.client(Security(TokenBook.fixed("right")))).applied
    before = shard.fingerprint()
    for who in (Security.insecure(), Security(TokenBook.fixed("wrong"))):
        client = shard.client(who)
        for call in every_call(client):
            details = refused_with(grpc.StatusCode.UNAUTHENTICATED, call)
            assert "wrong" not in details and "right" not in details  # no token echoed
        assert shard.fingerprint() == before
    # The raw-bytes bench service sits behind the same door.
    raw = ps_pb2_grpc_raw(shard.client(Security.insecure()))
    refused_with(
        grpc.StatusCode.UNAUTHENTICATED,
        lambda: list(raw.Source(ps_pb2.RawRequest(nbytes=64, chunk_bytes=64), timeout=10)),
    )
    assert shard.fingerprint() == before


def ps_pb2_grpc_raw(client: ShardClient):
    from tether.proto import ps_pb2_grpc

    return ps_pb2_grpc.RawBytesStub(client.channel)


def test_the_health_service_answers_without_a_token(serve):
    shard = serve(Security(TokenBook.fixed("right")))
    channel = Security.insecure().channel(shard.address)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()


def test_a_same_host_pull_without_a_token_maps_no_segment(serve, monkeypatch):
    from tether.server import servicer as servicer_module

    mapped: list[object] = []
    monkeypatch.setattr(
        servicer_module.ShardServicer, "PullInto", lambda *a: mapped.append(a) or None
    )
    shard = serve(Security(TokenBook.fixed("right")))
    client = shard.client(Security.insecure())
    request = ps_pb2.PullRequest(run_id=RUN, segment=ps_pb2.Segment(name="/tether-x", size=N * 4))
    refused_with(grpc.StatusCode.UNAUTHENTICATED, lambda: client.stub.PullInto(request, timeout=10))
    assert mapped == []  # the handler never ran


@pytest.fixture
def run_store(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/tether.db"
    store = open_store(uri)
    config = RunConfig.of(RUN, shards=1, workers=1, num_params=N, replication="off")
    store.create_run(RUN, config.to_dict())
    yield uri, store, config
    store.close()


def test_a_rotated_out_token_is_refused_after_the_grace_period(serve, run_store):
    uri, store, config = run_store
    shard = serve(run_security(store, uri, config))
    old = Security(TokenBook.fixed(current(store.run_tokens(RUN), time.time())))
    assert push(shard.client(old), 0).applied
    tokens = store.run_tokens(RUN)
    grace = 1.0
    assert store.swap_run_tokens(
        RUN, tokens, rotated(tokens, time.time(), grace_s=grace, propagate_s=0)
    )
    new = Security(TokenBook.fixed(store.run_tokens(RUN)[-1].token))
    # The shard meets the new token before its periodic re-read: it re-reads and accepts.
    assert push(shard.client(new), 1).applied
    # The old one is still accepted within the grace period ...
    assert push(shard.client(old), 2).applied
    wait_until(lambda: time.time() > store.run_tokens(RUN)[0].expires_at, 30, "the grace period")
    before = shard.fingerprint()
    # ... and refused after it, over a new channel and on the one already open.
    for client in (shard.client(old), shard.clients[0]):
        refused_with(grpc.StatusCode.UNAUTHENTICATED, lambda c=client: push(c, 3))
    assert shard.fingerprint() == before
    assert push(shard.client(new), 3).applied


def test_a_member_learns_a_rotated_token_from_the_store(run_store):
    uri, store, config = run_store
    book = TokenBook(store.run_tokens(RUN), lambda: store.run_tokens(RUN), refresh_s=0.05)
    first = book.presented()
    tokens = store.run_tokens(RUN)
    store.swap_run_tokens(RUN, tokens, rotated(tokens, time.time(), grace_s=5, propagate_s=0))
    wait_until(lambda: book.presented() != first, 30, "the client to present the new token")
    assert book.presented() == store.run_tokens(RUN)[-1].token
    assert book.accepts(first)  # still within the grace period


def test_a_shard_rereads_the_store_at_most_every_so_often_for_unknown_tokens():
    loads: list[int] = []

    def load() -> list[RunToken]:
        loads.append(1)
        return [RunToken("right", 0.0, 0.0)]

    book = TokenBook([RunToken("right", 0.0, 0.0)], load, refresh_s=3600)
    assert book.accepts("right") and not loads
    results = [book.accepts(f"guess-{i}") for i in range(200)]
    assert not any(results)
    assert len(loads) <= 1  # a flood of wrong tokens costs the store at most one read so far


def test_a_run_without_a_token_is_refused_or_served_only_when_allowed(run_store, capsys):
    uri, store, config = run_store
    with store._tx(write=True) as conn:  # a run as a store from before tokens holds it
        conn.execute("DELETE FROM run_tokens WHERE run_id = ?", (RUN,))
    assert store.run_tokens(RUN) == []
    with pytest.raises(AuthError) as refused:
        run_security(store, uri, config)
    assert str(refused.value) == unauthenticated_refusal(RUN)
    assert "--allow-unauthenticated" in str(refused.value)
    security = run_security(store, uri, config, allow_unauthenticated=True, who="tether server")
    assert security.tokens is None
    assert "WITHOUT AUTHENTICATION" in capsys.readouterr().err


def test_token_rotation_rules():
    t0 = [RunToken("a", 100.0, 100.0)]
    t1 = rotated(t0, 200.0, grace_s=60, propagate_s=5, token="b")
    assert current(t1, 201.0) == "a"  # the new token is not used before it has propagated
    assert current(t1, 206.0) == "b"
    assert accepted(t1, 201.0) == ["a", "b"]  # but accepted at once
    assert accepted(t1, 261.0) == ["b"]
    t2 = rotated(t1, 210.0, grace_s=30, propagate_s=5, token="c")
    assert [t.expires_at for t in t2] == [240.0, 240.0, None]  # never later than before
    assert [t.token for t in rotated(t2, 300.0, token="d")] == ["c", "d"]  # expired dropped
    with pytest.raises(ValueError, match="grace period"):
        rotated(t0, 0.0, grace_s=1, propagate_s=5)
    assert "s3cret" not in repr(RunToken("s3cret", 0.0, 0.0))  # a record never prints it


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path: Path) -> TlsFiles:
    files = create_certs(tmp_path / "certs")
    return TlsFiles(str(files.cert), str(files.key), str(files.ca))


def test_mutual_tls_serves_a_client_with_a_certificate_and_refuses_others(serve, certs):
    token = TokenBook.fixed("right")
    shard = serve(Security(token, certs))
    assert push(shard.client(Security(token, certs)), 0).applied
    before = shard.fingerprint()
    no_client_cert = TlsFiles(ca=certs.ca, cert="", key="")
    refusals = [
        Security(token),  # plaintext to a TLS port
        Security(token, TlsFiles(certs.cert, certs.key, "")),  # no CA: cannot verify the shard
    ]
    for security in refusals:
        refused_with(grpc.StatusCode.UNAVAILABLE, lambda s=security: push(shard.client(s), 1))
    # A client presenting no certificate: the handshake fails.
    channel = grpc.secure_channel(
        shard.address, grpc.ssl_channel_credentials(Path(no_client_cert.ca).read_bytes())
    )
    stub = health_pb2_grpc.HealthStub(channel)
    refused_with(
        grpc.StatusCode.UNAVAILABLE, lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    )
    channel.close()
    assert shard.fingerprint() == before


def test_a_client_certificate_from_another_ca_is_refused(serve, certs, tmp_path):
    shard = serve(Security(TokenBook.fixed("t"), certs))
    other = create_certs(tmp_path / "other")
    stranger = TlsFiles(str(other.cert), str(other.key), certs.ca)
    before = shard.fingerprint()
    refused_with(
        grpc.StatusCode.UNAVAILABLE,
        lambda: push(shard.client(Security(TokenBook.fixed("t"), stranger))),
    )
    assert shard.fingerprint() == before


def test_rotated_certificates_apply_to_new_connections_without_a_restart(serve, certs, tmp_path):
    shard = serve(Security(TokenBook.fixed("t"), certs))
    assert push(shard.client(Security(TokenBook.fixed("t"), certs)), 0).applied
    # A new CA and certificate written over the same files, as a Secret's update would.
    create_certs(Path(certs.cert).parent, reuse_ca=False)
    fresh = shard.client(Security(TokenBook.fixed("t"), certs))  # reads the new files
    assert push(fresh, 1).applied  # the shard re-read its files for this new connection


def test_tls_files_are_checked_with_the_flag_named(tmp_path):
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        TlsFiles(ca=str(tmp_path / "ca.crt")).check()
    with pytest.raises(ValueError, match=r"--tls-key .*no readable file"):
        TlsFiles(str(tmp_path), str(tmp_path / "missing.key")).check()
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        RunConfig.of(RUN, tls_ca="x")


def test_certs_create_keeps_keys_private_and_names_the_hosts(tmp_path):
    from cryptography import x509

    files = create_certs(tmp_path / "c", ["shard-0.tether", "10.0.0.7"])
    assert files.key.stat().st_mode & 0o777 == 0o600
    assert files.ca_key.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "shard-0.tether" in san.get_values_for_type(x509.DNSName)
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} >= {"10.0.0.7", "127.0.0.1"}


# -- one choke point -----------------------------------------------------------------------------

MAKERS = {"server", "insecure_channel", "secure_channel", "add_insecure_port", "add_secure_port"}


def test_only_the_transport_module_makes_grpc_servers_and_channels():
    offenders = []
    for folder in ("tether", "server", "worker", "chaos", "consistency"):
        for path in (REPO / folder).rglob("*.py"):
            if path == REPO / "tether" / "transport.py" or "_pb2" in path.name:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in MAKERS
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in ("grpc", "server")
                ):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_an_idle_client_rereads_the_tokens_before_its_next_call(run_store, monkeypatch):
    import tether.transport as transport

    uri, store, config = run_store
    book = TokenBook(store.run_tokens(RUN), lambda: store.run_tokens(RUN), refresh_s=3600)
    old = book.presented()
    tokens = store.run_tokens(RUN)
    store.swap_run_tokens(RUN, tokens, rotated(tokens, time.time(), grace_s=0, propagate_s=0))
    monkeypatch.setattr(transport, "STALE_S", 0.0)  # as if it had been idle for a while
    assert book.presented() == store.run_tokens(RUN)[-1].token != old


def test_same_host_segments_are_private_to_the_user_and_unguessable():
    from tether import shm

    segment = shm.Segment.create(RUN, "worker-0", 16)
    try:
        path = shm.SHM_DIR / segment.ref.name
        assert path.stat().st_mode & 0o777 == 0o600
        random_part = segment.ref.name.rsplit("-", 1)[1]
        assert len(random_part) == 32 and int(random_part, 16) >= 0  # 128 random bits
    finally:
        segment.unlink()
    assert not path.exists()


def test_clients_check_the_certificate_against_the_server_name_when_one_is_given(serve, tmp_path):
    files = create_certs(tmp_path / "named", ["members.tether"])
    tls = TlsFiles(str(files.cert), str(files.key), str(files.ca))
    shard = serve(Security(TokenBook.fixed("t"), tls))
    named = Security(TokenBook.fixed("t"), TlsFiles(tls.cert, tls.key, tls.ca, "members.tether"))
    assert push(shard.client(named), 0).applied  # the name, not the dialled 127.0.0.1
    wrong = Security(TokenBook.fixed("t"), TlsFiles(tls.cert, tls.key, tls.ca, "other.example"))
    before = shard.fingerprint()
    refused_with(grpc.StatusCode.UNAVAILABLE, lambda: push(shard.client(wrong), 1))
    assert shard.fingerprint() == before

"""Run tokens and TLS in whole runs (DESIGN §13): real processes, real sockets.

- BSP with mutual TLS gives the digest of the same run without it; ASP with it finishes.
- A token rotated while the run trains loses no push (the ledger is clean), and once its grace
  period is over the old token is refused by every shard.
- The token appears in no log, status output or summary of the run.
- A run from before tokens is refused with one sentence, or served with a warning when allowed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from helpers import RunWatch, wait_until
from tether.devtools.certs import create_certs
from tether.store import open_store
from tether.transport import Security, TokenBook, unauthenticated_refusal
from tether.worker.client import ShardClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _digest(tether_cli, tmp_path: Path, name: str, *flags: str) -> dict:
    return tether_cli(
        "launch", "--run-dir", str(tmp_path / name), "--steps", "30", "--seed", "3",
        "--json", *flags,
    ).json()  # fmt: skip


def test_runs_with_mutual_tls_finish_and_bsp_keeps_its_digest(tether_cli, tmp_path):
    files = create_certs(tmp_path / "certs")
    tls = ("--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca))
    plain = _digest(tether_cli, tmp_path, "plain")
    secured = _digest(tether_cli, tmp_path, "tls", *tls)
    assert secured["params_sha256"] == plain["params_sha256"]
    log = (tmp_path / "tls" / "logs" / "server-0.log").read_text()
    assert "run token, mutual TLS" in log
    asp = _digest(tether_cli, tmp_path, "asp", "--mode", "asp", *tls)
    assert asp["ledger"]["ok"] and asp["updates_applied"] > 0


def test_a_token_rotated_while_training_loses_no_push_and_the_old_one_ends(tether_cli, tmp_path):
    run_dir = tmp_path / "run"
    launch = tether_cli(
        "launch", "--run-dir", str(run_dir), "--mode", "asp", "--steps", "600",
        "--straggler", "0:40", "--straggler", "1:40", "--json",
    )  # fmt: skip
    watch = RunWatch(run_dir)
    wait_until(lambda: watch.min_clock() >= 20, 240, "the workers to train")
    store = open_store(f"sqlite:///{run_dir / 'tether.db'}")
    run_id = store.list_runs()[0].run_id
    (old,) = store.run_tokens(run_id)
    rotate = tether_cli(
        "run", "rotate-token", "--store", store.uri, "--run", run_id, "--grace", "10", "--json"
    ).json()
    assert rotate["tokens"] == 2 and "token" not in rotate  # printed only when asked
    new = store.run_tokens(run_id)[-1]
    shards = store.members(run_id, "server")
    # After the grace period, while the run still trains, the old token is refused everywhere.
    wait_until(lambda: time.time() > rotate["old_expires_at"] + 0.5, 60, "the grace period")
    assert watch.min_clock() < 600, "the run ended before the old token expired: slow it down"
    for m in shards:
        client = ShardClient(m.address, run_id, security=Security(TokenBook.fixed(old.token)))
        try:
            with pytest.raises(grpc.RpcError) as refused:
                client.info(timeout_s=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            out = np.empty(1, dtype=np.float32)
            with pytest.raises(grpc.RpcError):
                client.pull_into(out, observer=True, timeout_s=10)
        finally:
            client.close()
    summary = launch.json(300)
    assert summary["ledger"]["ok"], summary["ledger"]
    assert summary["ledger"]["lost_acked_pushes"] == 0
    assert summary["updates_applied"] == 600 * 2
    # The secret is nowhere a user or a log collector would read it.
    status = tether_cli("status", "--store", store.uri, "--run", run_id, "--json").finish(60)
    texts = [status[1], status[2], json.dumps(summary)]
    texts += [p.read_text(errors="replace") for p in (run_dir / "logs").iterdir()]
    for token in (old.token, new.token):
        assert not any(token in t for t in texts)
    store.close()


def test_a_run_from_before_tokens_is_refused_or_served_when_allowed(tether_cli, tmp_path):
    uri = f"sqlite:///{tmp_path}/tether.db"
    created = tether_cli("run", "create", "--store", uri, "--run-id", "old", "--json").json()
    assert created["created"] and "token" not in created
    with open_store(uri) as store, store._tx(write=True) as conn:
        conn.execute("DELETE FROM run_tokens WHERE run_id = 'old'")  # as before tokens
    args = ("server", "--store", uri, "--run", "old", "--shard-id", "0")
    rc, _, err = tether_cli(*args).finish(120)
    assert rc == 2 and unauthenticated_refusal("old") in err
    allowed = tether_cli(*args, "--allow-unauthenticated")
    with open_store(uri) as store:
        wait_until(lambda: store.member("old", "server", 0) is not None, 120, "the shard")
        member = store.member("old", "server", 0)
    client = ShardClient(member.address, "old", security=Security.insecure())
    try:
        wait_until(lambda: _answers(client), 120, "the shard to serve without a token")
    finally:
        client.close()
    allowed.proc.terminate()
    rc, _, err = allowed.finish(60)
    assert "WITHOUT AUTHENTICATION" in err


def _answers(client: ShardClient) -> bool:
    try:
        client.info(timeout_s=5)
        return True
    except grpc.RpcError:
        return False


def test_run_create_prints_the_token_only_when_asked(tether_cli, tmp_path):
    uri = f"sqlite:///{tmp_path}/tether.db"
    shown = tether_cli(
        "run", "create", "--store", uri, "--run-id", "r", "--show-token", "--json"
    ).json()
    with open_store(uri) as store:
        assert shown["token"] == store.run_tokens("r")[0].token
    rc, out, err = tether_cli("run", "create", "--store", uri, "--run-id", "r").finish(60)
    assert rc == 0 and shown["token"] not in out + err

"""The shard over real gRPC on loopback, port 0 (STYLE §8 tier 2; DESIGN §2, §3, §10)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from helpers import RUN, wait_until
from tether.consistency import Mode
from tether.proto import ps_pb2
from tether.wire import MAX_MESSAGE_BYTES

pytestmark = pytest.mark.timeout(60)


def grad(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def snapshot(shard):
    info = shard.client().info()
    return (info.version, [w.clock for w in info.workers], [w.last_seq for w in info.workers],
            shard.state.params.tobytes())  # fmt: skip


def raw_push(client, header: ps_pb2.PushHeader, chunks: list[bytes], with_header=True):
    def messages():
        for i, data in enumerate(chunks):
            if i == 0 and with_header:
                yield ps_pb2.PushChunk(header=header, data=data)
            else:
                yield ps_pb2.PushChunk(data=data)

    return client.stub.Push(messages(), timeout=10)


def test_pull_and_push_stream_raw_bytes_in_chunks(live_shard):
    n = 300_000  # 1.2 MB in 4 KiB chunks: hundreds of messages each way
    shard = live_shard(Mode.ASP, workers=1, n=n)
    client = shard.client()
    params, pulled = client.pull(n, worker_id=0, clock=0)
    assert pulled.version == 0 and pulled.epoch == 1
    assert params.tobytes() == shard.state.params.tobytes()
    g = grad(n)
    before = params.copy()
    reply = client.push(g, worker_id=0, clock=0, seq=0, read_version=0, epoch=1)
    assert reply.applied and reply.version == 1 and not reply.duplicate
    after, _ = client.pull(n, worker_id=0, clock=1)
    np.testing.assert_array_equal(after, before - np.float32(0.1) * g)


def test_a_retried_push_with_the_same_seq_is_applied_once(live_shard):
    shard = live_shard(Mode.ASP, workers=1)
    client = shard.client()
    g = grad(1000)
    first = client.push(g, worker_id=0, clock=0, seq=0, read_version=0, epoch=1)
    before = snapshot(shard)
    again = client.push(g, worker_id=0, clock=0, seq=0, read_version=0, epoch=1)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.version == first.version == 1
    assert snapshot(shard) == before


def header(**kw) -> ps_pb2.PushHeader:
    fields = dict(run_id=RUN, worker_id=0, clock=0, seq=0, read_version=0, epoch=1, length=1000)
    fields.update(kw)
    return ps_pb2.PushHeader(**fields)


def ok_chunks(n=1000, bad=None):
    g = grad(n)
    if bad is not None:
        g[n // 2] = bad
    b = g.tobytes()
    return [b[i : i + 1024] for i in range(0, len(b), 1024)]


BAD = {
    "wrong size": (header(length=999), ok_chunks(999), "INVALID_ARGUMENT", "elements"),
    "NaN": (header(), ok_chunks(bad=np.nan), "INVALID_ARGUMENT", "NaN or Inf"),
    "Inf": (header(), ok_chunks(bad=np.inf), "INVALID_ARGUMENT", "NaN or Inf"),
    "unknown worker": (header(worker_id=9), ok_chunks(), "INVALID_ARGUMENT", "unknown worker"),
    "unknown run": (header(run_id="x"), ok_chunks(), "INVALID_ARGUMENT", "unknown run"),
    "stale epoch": (header(epoch=0), ok_chunks(), "FAILED_PRECONDITION", "stale epoch"),
    "future clock": (header(clock=4, seq=4), ok_chunks(), "FAILED_PRECONDITION", "future"),
    "truncated": (header(), ok_chunks()[:-1], "INVALID_ARGUMENT", "truncated"),
    "oversized": (header(), ok_chunks() + [b"\0" * 64], "INVALID_ARGUMENT", "more than"),
    "repeated header": (header(), "repeat", "INVALID_ARGUMENT", "exactly one header"),
    "no header": (header(), "none", "INVALID_ARGUMENT", "must start with its header"),
    "huge message": (header(), [b"\0" * (MAX_MESSAGE_BYTES + 1)], "RESOURCE_EXHAUSTED", ""),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pushes_get_a_precise_status_change_nothing_and_the_shard_keeps_serving(
    live_shard, case
):
    shard = live_shard(Mode.ASP, workers=1)
    client = shard.client()
    before = snapshot(shard)
    h, chunks, code, words = BAD[case]
    with pytest.raises(grpc.RpcError) as err:
        if chunks == "repeat":
            msgs = [ps_pb2.PushChunk(header=h, data=c) for c in ok_chunks()]
            client.stub.Push(iter(msgs), timeout=10)
        elif chunks == "none":
            raw_push(client, h, ok_chunks(), with_header=False)
        else:
            raw_push(client, h, chunks)
    assert err.value.code().name == code
    assert words in err.value.details()
    assert snapshot(shard) == before
    # Still serving: a good push goes through afterwards.
    reply = client.push(grad(1000), worker_id=0, clock=0, seq=0, read_version=0, epoch=1)
    assert reply.applied and reply.version == 1


def test_bad_pulls_get_a_precise_status(live_shard):
    shard = live_shard(Mode.SSP, staleness=1, workers=2)
    client = shard.client()
    cases = [
        (dict(worker_id=5), grpc.StatusCode.INVALID_ARGUMENT, "unknown worker"),
        (dict(run_id="x"), grpc.StatusCode.INVALID_ARGUMENT, "unknown run"),
        (dict(clock=3), grpc.StatusCode.FAILED_PRECONDITION, "future"),
    ]
    for overrides, code, words in cases:
        request = ps_pb2.PullRequest(**({"run_id": RUN, "worker_id": 0, "clock": 0} | overrides))
        with pytest.raises(grpc.RpcError) as err:
            list(client.stub.Pull(request, timeout=10))
        assert err.value.code() == code and words in err.value.details()
    assert client.info().pulls_served == 0


def test_waiting_pulls_do_not_starve_the_push_that_releases_them(live_shard):
    """W-1 workers block on SSP(0) pulls; Info and the last worker's push still get threads."""
    workers = 6
    shard = live_shard(Mode.SSP, staleness=0, workers=workers)
    clients = [shard.client() for _ in range(workers)]
    g = grad(1000)
    for w in range(workers - 1):
        clients[w].push(g, worker_id=w, clock=0, seq=0, read_version=0, epoch=1)
    with ThreadPoolExecutor(workers) as pool:
        blocked = [
            pool.submit(clients[w].pull, 1000, worker_id=w, clock=1) for w in range(workers - 1)
        ]
        wait_until(lambda: shard.servicer.waiting == workers - 1, what="pulls to start waiting")
        assert not any(f.done() for f in blocked)
        assert clients[-1].info().version == 5  # a unary call is served meanwhile
        clients[-1].push(g, worker_id=workers - 1, clock=0, seq=0, read_version=0, epoch=1)
        results = [f.result(timeout=10) for f in blocked]
    assert all(p.version == workers and p.clock_gap == 0 for _, p in results)


def test_a_pull_that_waits_past_its_deadline_names_the_missing_workers(live_shard):
    shard = live_shard(Mode.BSP, workers=3)
    client = shard.client()
    client.push(grad(1000), worker_id=0, clock=0, seq=0, read_version=0, epoch=1)
    with pytest.raises(grpc.RpcError) as err:
        client.pull(1000, worker_id=0, clock=1, wait_timeout_s=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    details = err.value.details()
    assert "worker 1 at clock 0" in details and "worker 2 at clock 0" in details
    assert "under bsp" in details
    assert shard.servicer.waiting == 0


def test_observer_pull_reads_without_joining_the_clock_protocol(live_shard):
    shard = live_shard(Mode.BSP, workers=2)
    client = shard.client()
    params, pulled = client.pull(1000, observer=True)
    assert params.tobytes() == shard.state.params.tobytes()
    info = client.info()
    assert info.pulls_served == 0 and [w.clock for w in info.workers] == [0, 0]


@pytest.mark.parametrize("s", [1, 2])
def test_ssp_worker_blocks_s_plus_one_ahead_and_resumes_when_the_straggler_catches_up(
    live_shard, s
):
    shard = live_shard(Mode.SSP, staleness=s, workers=2)
    fast, slow = shard.client(), shard.client()
    g = grad(1000)
    for clock in range(s + 1):
        _, pulled = fast.pull(1000, worker_id=0, clock=clock)
        assert pulled.clock_gap == clock
        fast.push(g, worker_id=0, clock=clock, seq=clock, read_version=pulled.version, epoch=1)
    with ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(fast.pull, 1000, worker_id=0, clock=s + 1)
        wait_until(lambda: shard.servicer.waiting == 1, what="the fast worker to block")
        assert not blocked.done()
        _, pulled = slow.pull(1000, worker_id=1, clock=0)  # the straggler is never blocked
        slow.push(g, worker_id=1, clock=0, seq=0, read_version=pulled.version, epoch=1)
        _, resumed = blocked.result(timeout=10)
    assert resumed.clock_gap == s and resumed.version == s + 2
    assert fast.info().max_clock_gap == s


def test_closing_a_client_ends_its_waiting_pull_with_channel_closed(live_shard):
    """A worker drops the channel to a replaced shard: the call waiting there ends at once."""
    from tether.worker.client import ChannelClosed

    shard = live_shard(Mode.BSP, workers=2)
    client = shard.client()
    client.push(grad(1000), worker_id=0, clock=0, seq=0, read_version=0, epoch=1)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.pull, 1000, worker_id=0, clock=1, wait_timeout_s=30)
        wait_until(lambda: shard.servicer.waiting == 1, what="the pull to wait")
        client.close()
        with pytest.raises(ChannelClosed, match="was closed"):
            waiting.result(timeout=10)
    with pytest.raises(ChannelClosed):  # and a new call on it is refused the same way
        client.info()


@pytest.mark.parametrize(
    "fenced, code",
    [(False, grpc.StatusCode.UNAVAILABLE), (True, grpc.StatusCode.FAILED_PRECONDITION)],
)
def test_a_stop_fails_the_waiting_pull_and_refuses_new_calls_with_the_cores_status(
    live_shard, fenced, code
):
    shard = live_shard(Mode.BSP, workers=2)
    client = shard.client()
    client.push(grad(1000), worker_id=0, clock=0, seq=0, read_version=0, epoch=1)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.pull, 1000, worker_id=0, clock=1, wait_timeout_s=30)
        wait_until(lambda: shard.servicer.waiting == 1, what="the pull to wait")
        refusal = shard.servicer.host.stop(fenced=fenced).refusal
        with pytest.raises(grpc.RpcError) as err:
            waiting.result(timeout=10)
    assert err.value.code() == code and err.value.details() == refusal.message
    before = snapshot(shard)  # status reads are still answered
    for call in (
        lambda: client.pull(1000, worker_id=1, clock=0),
        lambda: client.push(grad(1000), worker_id=1, clock=0, seq=0, read_version=0, epoch=1),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code and err.value.details() == refusal.message
    assert snapshot(shard) == before

"""The same-host data path (DESIGN §2): segments, and the shard's PullInto / PushFrom over gRPC."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from helpers import RUN
from tether import shm
from tether.consistency import Mode
from tether.proto import ps_pb2
from tether.shm import Segment, SegmentRef, SegmentUnavailable
from tether.worker.client import InSegment, prefetched
from tether.worker.local import GRADS, PARAMS, LocalPath

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not shm.SHM_DIR.is_dir(), reason="this machine has no /dev/shm"),
]


@pytest.fixture
def local() -> Iterator[Callable[..., LocalPath]]:
    """A worker's segment for 1000 parameters, unlinked at the end whatever happened."""
    made: list[LocalPath] = []

    def make(n: int = 1000, worker_id: int = 0) -> LocalPath:
        path = LocalPath(RUN, worker_id, n, enabled=True)
        path.renew()
        made.append(path)
        return path

    yield make
    for path in made:
        path.close()


def names() -> set[str]:
    return {p.name for p in shm.SHM_DIR.glob(f"{shm.run_prefix(RUN)}*")}


# ---- segments ---------------------------------------------------------------------------------


def test_a_segment_maps_the_same_memory_in_its_creator_and_a_reader():
    seg = Segment.create(RUN, "w0", 1000)
    try:
        params = seg.region(PARAMS, 1000)
        assert params.ctypes.data % 64 == 0  # JAX reads the parameter leaves in place
        reader = Segment.attach(seg.ref)
        params[:] = np.arange(1000, dtype=np.float32)
        view = reader.floats(seg.region_offset(PARAMS, 1000, 10), 5)
        np.testing.assert_array_equal(view, np.arange(10, 15, dtype=np.float32))
        view[:] = -1  # and the other way
        assert (params[10:15] == -1).all()
        assert seg.region(GRADS, 1000).ctypes.data >= params.ctypes.data + params.nbytes
    finally:
        seg.unlink()


def test_unlinking_the_name_keeps_the_mappings_and_leaves_nothing_in_dev_shm():
    seg = Segment.create(RUN, "w0", 100)
    reader = Segment.attach(seg.ref)
    assert seg.ref.name in names()
    seg.unlink()
    assert seg.ref.name not in names()
    seg.region(PARAMS, 100)[:] = 7
    assert (reader.floats(seg.region_offset(PARAMS, 100, 0), 100) == 7).all()
    with pytest.raises(SegmentUnavailable, match="cannot open"):
        Segment.attach(seg.ref)  # gone by name: a later reader streams bytes instead


def test_a_reader_refuses_a_segment_that_is_not_the_one_named():
    seg = Segment.create(RUN, "w0", 100)
    try:
        with pytest.raises(SegmentUnavailable, match="not the segment"):
            Segment.attach(SegmentRef(seg.ref.name, b"x" * shm.TOKEN_BYTES, seg.ref.size))
        with pytest.raises(SegmentUnavailable, match="is not"):
            Segment.attach(SegmentRef(seg.ref.name, seg.ref.token, seg.ref.size + 4096))
        with pytest.raises(SegmentUnavailable, match="not a segment name"):
            Segment.attach(SegmentRef("../etc/passwd", seg.ref.token, seg.ref.size))
        reader = Segment.attach(seg.ref)
        with pytest.raises(ValueError, match="outside"):
            reader.floats(0, 10)  # the header is not data
        with pytest.raises(ValueError, match="outside"):
            reader.floats(seg.ref.size - 8, 10)
    finally:
        seg.unlink()


def test_no_segment_is_made_without_room_for_it_and_the_worker_streams_instead(monkeypatch):
    real = os.statvfs
    monkeypatch.setattr(
        shm.os, "statvfs", lambda p: SimpleNamespace(f_bavail=10, f_frsize=real(p).f_frsize)
    )
    before = names()
    with pytest.raises(SegmentUnavailable, match="MiB free"):
        Segment.create(RUN, "w0", 1000)
    path = LocalPath(RUN, 0, 1000, enabled=True)
    flat = path.renew()
    assert path.segment is None and path.ref(PARAMS, 0) is None
    assert flat.size == 1000 and flat.ctypes.data % 64 == 0
    assert names() == before


def test_leftovers_of_one_run_are_removed_and_other_runs_kept():
    mine, other = Segment.create(RUN, "w0", 10), Segment.create(RUN + "x", "w0", 10)
    try:
        assert shm.remove_leftovers(RUN) == [mine.ref.name]
        assert other.ref.name in {p.name for p in shm.SHM_DIR.iterdir()}
    finally:
        other.unlink()


# ---- the shard's side, over gRPC ---------------------------------------------------------------


def pull_into(client, path: LocalPath, *, clock=0, request_id=1, worker_id=0):
    return client.pull_into(
        path.segment.region(PARAMS, path.num_params),
        worker_id=worker_id,
        clock=clock,
        segment=path.ref(PARAMS, 0),
        request_id=request_id,
    )


def push_from(client, path: LocalPath, g, *, clock=0, worker_id=0, read_version=0, **kw):
    path.grads[:] = g
    return client.push(
        InSegment(path.ref(GRADS, 0), g.size),
        worker_id=worker_id, clock=clock, seq=clock, read_version=read_version, epoch=1, **kw,
    )  # fmt: skip


def test_a_pull_into_the_segment_writes_the_slice_there_and_carries_no_bytes(live_shard, local):
    shard = live_shard(Mode.ASP, workers=1)
    path = local()
    got = pull_into(shard.client(), path)
    assert got.in_segment and got.version == 0
    assert path.segment.region(PARAMS, 1000).tobytes() == shard.state.params.tobytes()
    assert shard.client().info().segment_pulls == 1


def test_a_shard_that_cannot_map_the_segment_says_so_and_the_client_streams(live_shard, local):
    shard = live_shard(Mode.ASP, workers=1)
    path = local()
    wrong = path.ref(PARAMS, 0)
    wrong.token = b"y" * shm.TOKEN_BYTES
    header = shard.client().stub.PullInto(ps_pb2.PullRequest(run_id=RUN, segment=wrong))
    assert not header.in_segment
    assert shard.state.stats.pulls_served == 0  # declined before serving anything
    out = np.zeros(1000, dtype=np.float32)
    got = shard.client().pull_into(out, segment=wrong, request_id=1)
    assert not got.in_segment and out.tobytes() == shard.state.params.tobytes()


def test_a_delayed_pull_request_never_overwrites_a_later_pulls_data(live_shard, local):
    shard = live_shard(Mode.ASP, workers=1)
    path = local()
    client = shard.client()
    assert pull_into(client, path, request_id=5).in_segment
    region = path.segment.region(PARAMS, 1000)
    region[:] = 42  # what the worker computes from now on
    with pytest.raises(grpc.RpcError) as e:
        pull_into(client, path, request_id=4)
    assert e.value.code() == grpc.StatusCode.ABORTED and "later pull" in e.value.details()
    assert (region == 42).all()
    assert pull_into(client, path, request_id=6).in_segment  # a newer one is served
    assert region.tobytes() == shard.state.params.tobytes()


def test_a_push_from_the_segment_applies_what_a_streamed_push_applies(live_shard, local):
    g = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    streamed, same_host = live_shard(Mode.ASP, workers=1), live_shard(Mode.ASP, workers=1)
    streamed.client().push(g, worker_id=0, clock=0, seq=0, read_version=0, epoch=1)
    reply = push_from(same_host.client(), local(), g)
    assert reply.applied and reply.version == 1 and not reply.duplicate
    assert same_host.state.params.tobytes() == streamed.state.params.tobytes()
    assert same_host.client().info().segment_pushes == 1


def test_a_duplicate_push_from_the_segment_is_not_read(live_shard, local):
    shard = live_shard(Mode.ASP, workers=1)
    path = local()
    g = np.ones(1000, dtype=np.float32)
    push_from(shard.client(), path, g)
    before = shard.state.params.copy()
    # The worker moved on and rewrote the region; a late duplicate of clock 0 must not apply
    # it, nor be refused for what it would read.
    again = push_from(shard.client(), path, np.full(1000, np.nan, dtype=np.float32))
    assert again.duplicate
    assert shard.state.params.tobytes() == before.tobytes()


def test_a_bsp_gradient_held_for_the_others_is_copied_out_of_the_segment(live_shard, local):
    shard = live_shard(Mode.BSP, workers=2)
    p0, p1 = local(worker_id=0), local(worker_id=1)
    g0 = np.full(1000, 2.0, dtype=np.float32)
    g1 = np.full(1000, 4.0, dtype=np.float32)
    start = shard.state.params.copy()
    assert not push_from(shard.client(), p0, g0, worker_id=0).applied
    p0.grads[:] = 1e6  # worker 0 reuses its region before worker 1 has pushed
    assert push_from(shard.client(), p1, g1, worker_id=1).applied
    np.testing.assert_array_equal(shard.state.params, start - np.float32(0.1) * np.float32(3.0))


def test_a_push_can_bring_back_the_next_pull_under_asp_but_not_under_bsp(live_shard, local):
    shard = live_shard(Mode.ASP, workers=1)
    path = local()
    nxt = ps_pb2.PullRequest(
        run_id=RUN, worker_id=0, clock=1, segment=path.ref(PARAMS, 0), request_id=9
    )
    reply = push_from(shard.client(), path, np.ones(1000, dtype=np.float32), then_pull=nxt)
    got = prefetched(reply)
    assert got is not None and got.version == 1
    assert path.segment.region(PARAMS, 1000).tobytes() == shard.state.params.tobytes()

    bsp = live_shard(Mode.BSP, workers=1)
    path = local()
    nxt.segment.CopyFrom(path.ref(PARAMS, 0))
    reply = push_from(bsp.client(), path, np.ones(1000, dtype=np.float32), then_pull=nxt)
    assert reply.applied and prefetched(reply) is None


def test_a_push_from_a_segment_the_shard_cannot_map_changes_nothing(live_shard, local):
    shard = live_shard(Mode.ASP, workers=1)
    path = local()
    bad = path.ref(GRADS, 0)
    bad.token = b"z" * shm.TOKEN_BYTES
    before = shard.state.params.copy()
    with pytest.raises(grpc.RpcError) as e:
        shard.client().push(
            InSegment(bad, 1000), worker_id=0, clock=0, seq=0, read_version=0, epoch=1
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert shard.state.params.tobytes() == before.tobytes()
    assert shard.state.workers[0].clock == 0

"""Client side of the shard protocol: pull and push flat float32 slices over gRPC.

Used by workers, the driver (final parameters: `read_params`) and `tether bench`. Calls that
fail with UNAVAILABLE are retried through `tether.retry` (STYLE §6); pushes are idempotent
because they carry `(worker_id, seq)` and the shard de-duplicates (DESIGN §5).
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from tether.config import RunConfig
from tether.proto import ps_pb2, ps_pb2_grpc
from tether.proto.ps_pb2 import InfoReply
from tether.retry import RetryPolicy, with_retry
from tether.store import Member
from tether.transport import Security
from tether.wire import (
    CHANNEL_OPTIONS,
    DEFAULT_CHUNK_BYTES,
    FLOAT,
    Assembler,
    Pieces,
    iter_chunk_bytes,
)


@dataclass(frozen=True, slots=True)
class Pulled:
    epoch: int
    version: int
    offset: int
    clock_gap: int
    in_segment: bool = False  # the shard wrote the slice into the request's segment


@dataclass(frozen=True, slots=True)
class InSegment:
    """A gradient slice the caller wrote into a same-host segment (DESIGN §2): `size` floats at
    `segment.offset`, left unchanged until its push returns."""

    segment: ps_pb2.Segment
    size: int


class ChannelClosed(RuntimeError):
    """The channel was closed under a call because its shard was replaced: resolve it again."""


class ShardClient:
    """One channel to one shard."""

    def __init__(
        self,
        address: str,
        run_id: str,
        *,
        security: Security,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        self.address = address
        self.run_id = run_id
        self.chunk_bytes = chunk_bytes
        self.channel = security.channel(address, options=CHANNEL_OPTIONS)
        self.stub = ps_pb2_grpc.ParameterServerStub(self.channel)
        self.closed = False

    def close(self) -> None:
        """Close the channel; calls in progress end with ChannelClosed (from any thread)."""
        self.closed = True
        self.channel.close()

    @contextlib.contextmanager
    def _calling(self) -> Iterator[None]:
        try:
            yield
        except (grpc.RpcError, ValueError) as e:
            # gRPC cancels the calls of a closed channel and refuses new ones with ValueError.
            if self.closed:
                raise ChannelClosed(f"the channel to {self.address} was closed") from e
            raise

    def pull_into(
        self,
        out: np.ndarray,
        *,
        worker_id: int = 0,
        clock: int = 0,
        observer: bool = False,
        wait_timeout_s: float = 0.0,
        timeout_s: float | None = None,
        segment: ps_pb2.Segment | None = None,
        request_id: int = 0,
    ) -> Pulled:
        """The shard's slice into `out` (a float32 view of its range); one copy. Given the
        same-host `segment` that `out` is a view of (DESIGN §2), the shard writes it there
        (`PullInto`); when it cannot map the segment, the bytes are streamed (`in_segment` is
        then false in the result)."""
        request = ps_pb2.PullRequest(
            run_id=self.run_id,
            worker_id=worker_id,
            clock=clock,
            observer=observer,
            wait_timeout_ms=int(wait_timeout_s * 1000),
        )
        with self._calling():
            if segment is not None:
                into = ps_pb2.PullRequest(segment=segment, request_id=request_id)
                into.MergeFrom(request)
                h = self.stub.PullInto(into, timeout=timeout_s)
                if h.in_segment:
                    if h.length != out.size:
                        raise ValueError(
                            f"shard at {self.address} serves {h.length} parameters, expected "
                            f"{out.size}"
                        )
                    return Pulled(h.epoch, h.version, h.offset, h.clock_gap, in_segment=True)
            stream = self.stub.Pull(request, timeout=timeout_s)
            first = next(stream)
            h = first.header
            if h.length != out.size:
                stream.cancel()
                raise ValueError(
                    f"shard at {self.address} serves {h.length} parameters, expected {out.size}"
                )
            assembler = Assembler(h.length, out)
            assembler.add(first.data)
            for msg in stream:
                assembler.add(msg.data)
            assembler.result()
        return Pulled(h.epoch, h.version, h.offset, h.clock_gap)

    def pull(self, length: int, **kwargs) -> tuple[np.ndarray, Pulled]:  # type: ignore[no-untyped-def]
        out = np.empty(length, dtype=FLOAT)
        return out, self.pull_into(out, **kwargs)

    def push(
        self,
        grad: np.ndarray | Pieces | InSegment,
        *,
        worker_id: int,
        clock: int,
        seq: int,
        read_version: int,
        epoch: int,
        loss: float = 0.0,
        timeout_s: float | None = None,
        then_pull: ps_pb2.PullRequest | None = None,
    ) -> ps_pb2.PushReply:
        """Push a gradient: its values, or where in a same-host segment the caller wrote them.
        With the segment, `then_pull` (a pull into the segment) may be served in the same call:
        `prefetched(reply)` says whether it was."""
        header = ps_pb2.PushHeader(
            run_id=self.run_id,
            worker_id=worker_id,
            clock=clock,
            seq=seq,
            read_version=read_version,
            epoch=epoch,
            length=grad.size,
            loss=loss,
        )
        if isinstance(grad, InSegment):
            header.segment.CopyFrom(grad.segment)
            if then_pull is not None:
                header.next.CopyFrom(then_pull)
            with self._calling():
                return self.stub.PushFrom(header, timeout=timeout_s)  # type: ignore[no-any-return]

        def messages() -> Iterator[ps_pb2.PushChunk]:
            # Copied chunk by chunk as gRPC asks for them (the caller keeps `grad` unchanged
            # until the push returns).
            for k, data in enumerate(iter_chunk_bytes(grad, self.chunk_bytes)):
                yield (
                    ps_pb2.PushChunk(header=header, data=data)
                    if k == 0
                    else ps_pb2.PushChunk(data=data)
                )

        with self._calling():
            return self.stub.Push(messages(), timeout=timeout_s)  # type: ignore[no-any-return]

    def info(self, timeout_s: float | None = 10.0) -> ps_pb2.InfoReply:
        with self._calling():
            return self.stub.Info(  # type: ignore[no-any-return]
                ps_pb2.InfoRequest(run_id=self.run_id), timeout=timeout_s
            )


def prefetched(reply: ps_pb2.PushReply) -> Pulled | None:
    """The pull a push's reply carries (`then_pull`, served into the segment), if any."""
    if not reply.HasField("pulled"):
        return None
    h = reply.pulled
    return Pulled(h.epoch, h.version, h.offset, h.clock_gap, in_segment=True)


def read_params(
    config: RunConfig, shards: list[Member], security: Security
) -> tuple[np.ndarray, list[InfoReply]]:
    """Read the whole flat vector and each shard's statistics, outside the clock protocol."""
    flat = np.empty(config.num_params, dtype=FLOAT)
    infos = []
    for m in sorted(shards, key=lambda m: m.member_id):
        client = ShardClient(
            m.address, config.run_id, security=security, chunk_bytes=config.chunk_bytes
        )
        rng = random.Random(m.member_id)
        try:
            info = with_retry(client.info, RetryPolicy(), rng)
            view = flat[info.offset : info.offset + info.length]
            with_retry(
                functools.partial(client.pull_into, view, observer=True, timeout_s=60),
                RetryPolicy(),
                rng,
            )
            infos.append(info)
        finally:
            client.close()
    return flat, infos

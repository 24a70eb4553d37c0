"""gRPC adapter around the sans-I/O shard state (STYLE §2: thin servicers over typed functions).

It only translates: wire messages into events for ``ShardState``, its instructions into replies,
waits or statuses. The lock (a Condition) is the ``ShardHost``'s, shared with the replicator; no
I/O happens while holding it except copying bytes (and mapping a worker's same-host segment the
first time a request names it, `SegmentCache`). A waiting pull sleeps on the condition with a
deadline, so pushes from other workers (which notify it) are never starved; the server's thread
pool is sized above the number of workers so every worker can have a pull waiting and a push in
flight at once (DESIGN §3).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc
import numpy as np

from tether.member.report import Recovered, ShardNumbers, parse
from tether.proto import ps_pb2, ps_pb2_grpc
from tether.server.host import ShardHost
from tether.server.messages import Ack, Code, PushHeader, Reject, Serve, Wait
from tether.server.report import ServingCounters, ShardReport
from tether.server.segments import SegmentCache
from tether.server.state import DENSE
from tether.wire import Assembler, WireError

# How often a waiting pull checks that its client is still there (a cancelled pull must not keep
# a server thread until its deadline).
_LIVENESS_CHECK_S = 0.5


def _abort(context: grpc.ServicerContext, rejected: Reject) -> NoReturn:
    """The one place an error becomes a gRPC status (STYLE §5)."""
    context.abort(grpc.StatusCode[rejected.code.value], rejected.message)
    raise AssertionError("grpc's abort raises")  # for type checkers: abort never returns


class ShardServicer(ps_pb2_grpc.ParameterServerServicer):
    def __init__(
        self,
        host: ShardHost,
        *,
        wait_timeout_s: float,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self._wait_timeout_s = wait_timeout_s
        self._now = now
        # The workers' same-host segments (DESIGN §2).
        self.segments = SegmentCache(host.state.spec.shard_id)
        self.counters = ServingCounters()  # changed under the shard's lock
        self.serving_since: float | None = None  # set by the process once it serves
        self._last_report: ShardReport | None = None

    @property
    def waiting(self) -> int:
        """Pulls waiting for slower workers right now."""
        return self.counters.waiting

    def heartbeat_info(self, lock_timeout_s: float) -> dict[str, Any]:
        """What the shard's heartbeat reports. Never waits long on the shard's lock: when a long
        apply or state copy holds it, the last report is published again, so the beat (the
        proof of life) goes out on time (DESIGN §5 Liveness)."""
        with self.host.locked_within(lock_timeout_s) as state:
            if state is not None:
                self._last_report = state.report(self.counters)
        if self._last_report is None:  # the lock was never had: what is fixed since it was built
            state = self.host.state
            numbers = ShardNumbers(
                restored_version=state.restored_version,
                recovered=parse(Recovered.from_info, state.recovered),
                serving_since=self.serving_since,
            )
            return {**numbers.to_info(), "phase": "serving"}
        return {**self._last_report.heartbeat(self.serving_since), "phase": "serving"}

    # -- Pull -----------------------------------------------------------------------------

    def Pull(
        self, request: ps_pb2.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[ps_pb2.PullChunk]:
        if request.observer:
            with self.host.locked() as state:
                decision: Serve | Wait | Reject = state.observe()
        else:
            decision = self._wait_for_read(request, context, None)
        if isinstance(decision, Reject):
            _abort(context, decision)
            return
        assert isinstance(decision, Serve)
        yield ps_pb2.PullChunk(header=self._pull_header(decision), data=decision.chunks[0])
        for data in decision.chunks[1:]:
            yield ps_pb2.PullChunk(data=data)

    def PullInto(
        self, request: ps_pb2.PullRequest, context: grpc.ServicerContext
    ) -> ps_pb2.PullHeader:
        """A pull served into the worker's same-host segment (DESIGN §2). When the segment
        cannot be mapped here, the reply says so (in_segment = false) before anything is served,
        and the worker pulls the bytes instead."""
        spec = self.host.state.spec
        with self.host.locked():
            mappable = self.segments.view(request.worker_id, request.segment, spec.length)
        if mappable is None or request.observer:
            return ps_pb2.PullHeader(shard_id=spec.shard_id, offset=spec.offset, in_segment=False)
        decision = self._wait_for_read(request, context, request.segment)
        if isinstance(decision, Reject):
            _abort(context, decision)
        assert isinstance(decision, Serve) and decision.in_segment
        return self._pull_header(decision)

    def _pull_header(self, decision: Serve) -> ps_pb2.PullHeader:
        spec = self.host.state.spec
        return ps_pb2.PullHeader(
            shard_id=spec.shard_id,
            epoch=decision.epoch,
            version=decision.version,
            offset=spec.offset,
            length=spec.length,
            clock_gap=decision.clock_gap,
            in_segment=decision.in_segment,
        )

    def _wait_for_read(
        self,
        request: ps_pb2.PullRequest,
        context: grpc.ServicerContext,
        segment: ps_pb2.Segment | None,
    ) -> Serve | Wait | Reject:
        timeout = request.wait_timeout_ms / 1000 if request.wait_timeout_ms > 0 else None
        timeout = timeout or self._wait_timeout_s
        start = time.monotonic()
        deadline = start + timeout
        w = request.worker_id
        waited = False
        with self.host.locked() as state:
            while True:
                decision = self._read_once(request, segment)
                if not isinstance(decision, Wait):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    decision = state.pull_timed_out(
                        w, request.clock, time.monotonic() - start, self._now()
                    )
                    break
                if not context.is_active():
                    decision = Reject(Code.ABORTED, "the pull was cancelled by the client")
                    break
                self.counters.waiting += 1
                self.host.wait(min(remaining, _LIVENESS_CHECK_S))
                self.counters.waiting -= 1
                waited = True
            elapsed = time.monotonic() - start
            self.counters.pull_wait_s += elapsed
            if waited:
                self.counters.waited("workers", elapsed)
            self._served(decision, elapsed)
        return decision

    def _served(self, decision: Serve | Wait | Reject, elapsed_s: float) -> None:
        """Count a pull the shard decided on (with the lock held)."""
        if isinstance(decision, Serve):
            self.counters.pull_s.observe(elapsed_s)
            self.counters.pull_bytes += 4 * self.host.state.spec.length

    def _read_once(
        self, request: ps_pb2.PullRequest, segment: ps_pb2.Segment | None
    ) -> Serve | Wait | Reject:
        """One try at serving a pull, with the lock held."""
        state, w = self.host.state, request.worker_id
        into = None
        if segment is not None:
            # Checked and written in one hold of the lock: a delayed request can never
            # overwrite what a later pull of the same worker put there.
            if self.segments.stale_pull(w, segment, request.request_id):
                return Reject(Code.ABORTED, f"a later pull of worker {w} was served")
            into = self.segments.view(w, segment, state.spec.length)
            if into is None:  # remapped meanwhile (a newer segment of this worker)
                return Reject(Code.ABORTED, "the pull's segment was replaced")
        decision = state.pull(request.run_id, w, request.clock, self._now(), into)
        if isinstance(decision, Serve) and segment is not None:
            self.segments.served(w, segment, request.request_id)
            self.counters.segment_pulls += 1
        return decision

    # -- Push -----------------------------------------------------------------------------

    def Push(
        self, request_iterator: Iterator[ps_pb2.PushChunk], context: grpc.ServicerContext
    ) -> ps_pb2.PushReply:
        # Read without the lock: the core repeats the check under it once the header is here.
        started = time.monotonic()
        if rejected := self.host.state.not_serving():
            _abort(context, rejected)
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            _abort(context, Reject(Code.INVALID_ARGUMENT, "a push must start with its header"))
        header = self._checked_header(first.header, context)
        try:
            assembler = Assembler(header.length)
            assembler.add(first.data)
            for msg in request_iterator:
                if msg.HasField("header"):
                    raise WireError("a push carries exactly one header, in its first message")
                assembler.add(msg.data)
            grad = assembler.result()
        except WireError as e:
            _abort(context, Reject(Code.INVALID_ARGUMENT, str(e)))
        return self._accept(header, grad, context, started)

    def PushFrom(
        self, request: ps_pb2.PushHeader, context: grpc.ServicerContext
    ) -> ps_pb2.PushReply:
        """A push whose gradient is in the worker's same-host segment (DESIGN §2).

        Read in place, under the lock, once `ShardState.push` has decided it is no duplicate:
        the worker writes that region again only after this push is acknowledged, or into a new
        segment after a failure, so no write can overlap a push that is applied (a late
        duplicate is discarded unread). A BSP gradient is held until the others arrive, and a
        replicated one becomes a log entry, so those are copied out."""
        started = time.monotonic()
        if rejected := self.host.state.not_serving():
            _abort(context, rejected)
        header = self._checked_header(request, context)

        def read() -> np.ndarray | None:  # called under the lock
            view = self.segments.view(header.worker_id, request.segment, header.length)
            if view is not None:
                self.counters.segment_pushes += 1
                if self.host.state.keeps_gradients:  # the worker reuses its segment
                    view = view.copy()
            return view

        reply = self._accept(header, read, context, started)
        nxt = request.next
        if request.HasField("next") and nxt.worker_id == header.worker_id:
            # The next clock's pull in the same call, served only if it needs no wait: a
            # refusal or a wait is left to the worker's own PullInto, which reports it.
            with self.host.locked() as state:
                if not state.spec.consistency.aggregates and nxt.HasField("segment"):
                    decision = self._read_once(nxt, nxt.segment)
                    self._served(decision, 0.0)
                    if isinstance(decision, Serve):
                        reply.pulled.CopyFrom(self._pull_header(decision))
        return reply

    def _checked_header(self, h: ps_pb2.PushHeader, context: grpc.ServicerContext) -> PushHeader:
        header = PushHeader(
            run_id=h.run_id,
            worker_id=h.worker_id,
            clock=h.clock,
            seq=h.seq,
            read_version=h.read_version,
            epoch=h.epoch,
            length=h.length,
        )
        with self.host.locked() as state:
            rejected = state.check_push_header(header)
        if rejected is not None:
            _abort(context, rejected)
        return header

    def _accept(
        self,
        header: PushHeader,
        gradient: np.ndarray | Callable[[], np.ndarray | None],
        context: grpc.ServicerContext,
        started: float,
    ) -> ps_pb2.PushReply:
        """Apply (or hold, or de-duplicate) a push whose header passed (`ShardState.push`)."""
        with self.host.locked() as state:
            now = self._now()
            result: Ack | Reject = state.push(header, {DENSE: gradient}, now)
            if isinstance(result, Ack) and not result.duplicate:
                self.host.notify_all()  # clocks moved: waiting pulls re-check the read rule
                self.counters.push_bytes += 4 * header.length
                if result.applied:
                    self.counters.last_update_at = now
            if isinstance(result, Ack):
                result = self._wait_durable(header, result)
                self.counters.push_s.observe(time.monotonic() - started)
        if isinstance(result, Reject):
            _abort(context, result)
        assert isinstance(result, Ack)
        return ps_pb2.PushReply(
            version=result.version,
            duplicate=result.duplicate,
            applied=result.applied,
            epoch=result.epoch,
        )

    def _wait_durable(self, header: PushHeader, ack: Ack) -> Ack | Reject:
        """Sync replication: hold the acknowledgement until the core says its version is durable
        (DESIGN §5). Called with the lock held; the replicator notifies the condition."""
        state = self.host.state
        start = time.monotonic()
        deadline = start + self._wait_timeout_s
        decision = state.durable_ack(ack)
        waited = isinstance(decision, Wait)
        while isinstance(decision, Wait):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                decision = state.push_timed_out(
                    header.worker_id, header.clock, time.monotonic() - start
                )
                break
            self.host.wait(min(remaining, _LIVENESS_CHECK_S))
            decision = state.durable_ack(ack, waited=True)
        if waited:
            self.counters.waited("durable", time.monotonic() - start)
        return decision

    # -- Info -----------------------------------------------------------------------------

    def Info(self, request: ps_pb2.InfoRequest, context: grpc.ServicerContext) -> ps_pb2.InfoReply:
        with self.host.locked() as state:
            if rejected := state.check_info(request.run_id):
                _abort(context, rejected)
            report = state.report(self.counters)
        return report.info_reply()


class RawBytesServicer(ps_pb2_grpc.RawBytesServicer):
    """The bare transport, for the baseline of `tether bench pushpull` (DESIGN §9)."""

    def __init__(self) -> None:
        self._source_cache: dict[tuple[int, int], list[bytes]] = {}

    def Sink(
        self, request_iterator: Iterator[ps_pb2.RawChunk], context: grpc.ServicerContext
    ) -> ps_pb2.RawAck:
        return ps_pb2.RawAck(nbytes=sum(len(m.data) for m in request_iterator))

    def Source(
        self, request: ps_pb2.RawRequest, context: grpc.ServicerContext
    ) -> Iterator[ps_pb2.RawChunk]:
        if not 0 <= request.nbytes <= 1 << 30 or not 0 < request.chunk_bytes <= 4 << 20:
            _abort(context, Reject(Code.INVALID_ARGUMENT, "nbytes or chunk_bytes out of range"))
        key = (request.nbytes, request.chunk_bytes)
        if key not in self._source_cache:
            step = request.chunk_bytes
            blob = bytes(request.nbytes)
            self._source_cache = {key: [blob[i : i + step] for i in range(0, len(blob), step)]}
        for data in self._source_cache[key]:
            yield ps_pb2.RawChunk(data=data)

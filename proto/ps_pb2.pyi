from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PullRequest(_message.Message):
    __slots__ = ("run_id", "worker_id", "clock", "wait_timeout_ms", "observer", "segment", "request_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    OBSERVER_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    worker_id: int
    clock: int
    wait_timeout_ms: int
    observer: bool
    segment: Segment
    request_id: int
    def __init__(self, run_id: _Optional[str] = ..., worker_id: _Optional[int] = ..., clock: _Optional[int] = ..., wait_timeout_ms: _Optional[int] = ..., observer: _Optional[bool] = ..., segment: _Optional[_Union[Segment, _Mapping]] = ..., request_id: _Optional[int] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("name", "token", "size", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    token: bytes
    size: int
    offset: int
    def __init__(self, name: _Optional[str] = ..., token: _Optional[bytes] = ..., size: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("shard_id", "epoch", "version", "offset", "length", "clock_gap", "in_segment")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CLOCK_GAP_FIELD_NUMBER: _ClassVar[int]
    IN_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    epoch: int
    version: int
    offset: int
    length: int
    clock_gap: int
    in_segment: bool
    def __init__(self, shard_id: _Optional[int] = ..., epoch: _Optional[int] = ..., version: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., clock_gap: _Optional[int] = ..., in_segment: _Optional[bool] = ...) -> None: ...

class PullChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("run_id", "worker_id", "clock", "seq", "read_version", "epoch", "length", "loss", "segment", "next")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    READ_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    worker_id: int
    clock: int
    seq: int
    read_version: int
    epoch: int
    length: int
    loss: float
    segment: Segment
    next: PullRequest
    def __init__(self, run_id: _Optional[str] = ..., worker_id: _Optional[int] = ..., clock: _Optional[int] = ..., seq: _Optional[int] = ..., read_version: _Optional[int] = ..., epoch: _Optional[int] = ..., length: _Optional[int] = ..., loss: _Optional[float] = ..., segment: _Optional[_Union[Segment, _Mapping]] = ..., next: _Optional[_Union[PullRequest, _Mapping]] = ...) -> None: ...

class PushChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("version", "duplicate", "applied", "epoch", "pulled")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PULLED_FIELD_NUMBER: _ClassVar[int]
    version: int
    duplicate: bool
    applied: bool
    epoch: int
    pulled: PullHeader
    def __init__(self, version: _Optional[int] = ..., duplicate: _Optional[bool] = ..., applied: _Optional[bool] = ..., epoch: _Optional[int] = ..., pulled: _Optional[_Union[PullHeader, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class WorkerClock(_message.Message):
    __slots__ = ("worker_id", "clock", "last_seq", "last_seen")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    clock: int
    last_seq: int
    last_seen: float
    def __init__(self, worker_id: _Optional[int] = ..., clock: _Optional[int] = ..., last_seq: _Optional[int] = ..., last_seen: _Optional[float] = ...) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("shard_id", "epoch", "version", "offset", "length", "mode", "staleness", "updates_applied", "pushes_accepted", "max_clock_gap", "clock_gap_hist", "staleness_hist", "workers", "pulls_served", "pull_wait_s", "replication", "durable_version", "replications", "replication_lag_max_s", "replication_lag_mean_s", "restored_version", "segment_pulls", "segment_pushes")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PUSHES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MAX_CLOCK_GAP_FIELD_NUMBER: _ClassVar[int]
    CLOCK_GAP_HIST_FIELD_NUMBER: _ClassVar[int]
    STALENESS_HIST_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PULLS_SERVED_FIELD_NUMBER: _ClassVar[int]
    PULL_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    DURABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICATIONS_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_LAG_MAX_S_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_LAG_MEAN_S_FIELD_NUMBER: _ClassVar[int]
    RESTORED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_PULLS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_PUSHES_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    epoch: int
    version: int
    offset: int
    length: int
    mode: str
    staleness: int
    updates_applied: int
    pushes_accepted: int
    max_clock_gap: int
    clock_gap_hist: _containers.RepeatedScalarFieldContainer[int]
    staleness_hist: _containers.RepeatedScalarFieldContainer[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerClock]
    pulls_served: int
    pull_wait_s: float
    replication: str
    durable_version: int
    replications: int
    replication_lag_max_s: float
    replication_lag_mean_s: float
    restored_version: int
    segment_pulls: int
    segment_pushes: int
    def __init__(self, shard_id: _Optional[int] = ..., epoch: _Optional[int] = ..., version: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., mode: _Optional[str] = ..., staleness: _Optional[int] = ..., updates_applied: _Optional[int] = ..., pushes_accepted: _Optional[int] = ..., max_clock_gap: _Optional[int] = ..., clock_gap_hist: _Optional[_Iterable[int]] = ..., staleness_hist: _Optional[_Iterable[int]] = ..., workers: _Optional[_Iterable[_Union[WorkerClock, _Mapping]]] = ..., pulls_served: _Optional[int] = ..., pull_wait_s: _Optional[float] = ..., replication: _Optional[str] = ..., durable_version: _Optional[int] = ..., replications: _Optional[int] = ..., replication_lag_max_s: _Optional[float] = ..., replication_lag_mean_s: _Optional[float] = ..., restored_version: _Optional[int] = ..., segment_pulls: _Optional[int] = ..., segment_pushes: _Optional[int] = ...) -> None: ...

class RawChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class RawAck(_message.Message):
    __slots__ = ("nbytes",)
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    nbytes: int
    def __init__(self, nbytes: _Optional[int] = ...) -> None: ...

class RawRequest(_message.Message):
    __slots__ = ("nbytes", "chunk_bytes")
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    nbytes: int
    chunk_bytes: int
    def __init__(self, nbytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

"""What goes in and out of the shard core (STYLE §2): the events' headers, the instructions the
adapters carry out, and the small error vocabulary (STYLE §5).

Apart from `state.py` so that the pieces the core is made of (the membership, the tables) can
answer with the same `Reject` without importing the protocol that holds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class Code(StrEnum):
    """The small error vocabulary, mapped to gRPC status codes once, in the servicer."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # bad input: never retry as is
    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # fenced, stale epoch, clock out of step
    ABORTED = "ABORTED"  # redo pull-compute-push
    UNAVAILABLE = "UNAVAILABLE"  # retry the same call
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # a wait for other workers ran out (DESIGN §3)


# ---- instructions (what the adapter must do) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Reject:
    code: Code
    message: str


@dataclass(frozen=True, slots=True)
class Ack:
    version: int
    epoch: int
    applied: bool  # False: a BSP gradient held until the other workers' arrive
    duplicate: bool = False
    # With sync replication the acknowledgement may only leave once this shard version is
    # durable in the store (DESIGN §5); 0 = nothing to wait for.
    durable_needed: int = 0


@dataclass(frozen=True, slots=True)
class Serve:
    """Send these parameters. The core cuts them into wire chunks itself, under the shard's lock,
    on purpose: it is the one copy a read makes, and no update can interleave with it."""

    version: int
    epoch: int
    clock_gap: int
    chunks: tuple[bytes, ...]  # the shard's slice as little-endian float32 bytes, one snapshot
    # The slice was copied into the buffer the pull named (a same-host segment): no chunks.
    in_segment: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    waiting_for: tuple[int, ...]  # whose clocks hold a pull back; (): an ack awaits durability


# serving -> stopped -> fenced, never back: a stopped shard never serves again (DESIGN §5).
Status = Literal["serving", "stopped", "fenced"]
STATUS_ORDER: tuple[Status, ...] = ("serving", "stopped", "fenced")


@dataclass(frozen=True, slots=True)
class Stop:
    refusal: Reject  # the shard stopped serving: wake every waiting call, each now gets this


# ---- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushHeader:
    run_id: str
    worker_id: int
    clock: int
    seq: int
    read_version: int
    epoch: int
    length: int

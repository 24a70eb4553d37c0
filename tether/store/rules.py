"""The epoch rules every backend enforces, stated once over plain values (DESIGN §5).

A backend reads what it stores (a member's epoch, a shard head's owner epoch and version) and asks
these functions whether a write may go ahead; each returns the error to raise, or None. They do no
I/O, so the SQLite and MongoDB backends cannot drift apart on what a zombie may write. MongoDB
also states each rule as the filter of its conditional update (the write must be one atomic
single-document operation); after such an update matched nothing, it reads the document and asks
the rule here which error that was.

- A registration takes the next epoch: one more than the stored one, 1 for the first.
- A member's write (heartbeat, state) goes ahead only if the stored epoch is the writer's.
- A claim of a shard for epoch e goes ahead unless a newer epoch owns it (an equal one is the same
  claim retried).
- A save goes ahead only if the head's owner epoch is the snapshot's, and its version is not below
  the head's (an equal version rewrites).
- A log append goes ahead only if the head's owner epoch is the writer's and it leaves no gap
  after the head's last position (what it repeats of the log is a retry's, skipped).
"""

from __future__ import annotations

from tether.store.base import (
    Fenced,
    Role,
    ShardSnapshot,
    StoreError,
    log_order_error,
    version_regression,
)


def next_epoch(stored_epoch: int | None) -> int:
    """The epoch of a new registration, given the member's stored epoch (None: never registered)."""
    return 1 if stored_epoch is None else stored_epoch + 1


def member_write_refusal(
    run_id: str, role: Role, member_id: int, epoch: int, stored_epoch: int | None
) -> Fenced | None:
    """Why a member's write by ``epoch`` is refused (None: it may go ahead).

    ``stored_epoch`` is the member's registered epoch, None if it never registered.
    """
    if stored_epoch == epoch:
        return None
    return Fenced(run_id, role, member_id, epoch, stored_epoch)


def claim_refusal(run_id: str, shard_id: int, epoch: int, owner_epoch: int | None) -> Fenced | None:
    """Why a claim of the shard for ``epoch`` is refused (None: it may go ahead).

    ``owner_epoch`` is the head's owner, None if the shard was never claimed.
    """
    if owner_epoch is None or owner_epoch <= epoch:
        return None
    return Fenced(run_id, "server", shard_id, epoch, owner_epoch)


def save_refusal(
    snap: ShardSnapshot, owner_epoch: int | None, head_version: int | None
) -> Fenced | StoreError | None:
    """Why a save of ``snap`` is refused (None: it may go ahead).

    ``owner_epoch`` is the head's owner (None: never claimed) and ``head_version`` the version of
    the state it points at (None: nothing saved yet). Fencing is decided first: a zombie is told
    it was replaced, not that its state is old.
    """
    if owner_epoch != snap.epoch:
        return Fenced(snap.run_id, "server", snap.shard_id, snap.epoch, owner_epoch)
    if head_version is not None and snap.version < head_version:
        return version_regression(snap, head_version)
    return None


def append_refusal(
    run_id: str,
    shard_id: int,
    epoch: int,
    first: int,
    owner_epoch: int | None,
    head_last: int,
) -> Fenced | StoreError | None:
    """Why an append by ``epoch`` whose first position is ``first`` is refused (None: it may go
    ahead). ``head_last`` is the head's last log position (0 before any append). Fencing first;
    then a gap is refused. Entries at or below ``head_last`` are a retry's: the backend skips
    them once it has checked that this epoch wrote them."""
    if owner_epoch != epoch:
        return Fenced(run_id, "server", shard_id, epoch, owner_epoch)
    if first > head_last + 1:
        return log_order_error(run_id, shard_id, first, head_last)
    return None

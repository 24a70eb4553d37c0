"""The store interface: runs and their members, shared by every backend (DESIGN §1, §6).

Processes of one run find each other through the store: the run's config and every member's
address and epoch live here. A backend is any object that satisfies :class:`Store`; today that is
:class:`tether.store.sqlite.SQLiteStore`, and a MongoDB backend implements the same protocol.

Contracts every backend keeps (the shared test suite checks them against each backend):

- ``register`` is atomic: the new epoch is the previous epoch of ``(run, role, member_id)`` plus
  one (1 for the first registration), so two concurrent registrations never get the same epoch.
- Writes by a member (``heartbeat``, ``set_member_state``) are conditional on the writer's epoch
  being the stored one; otherwise they raise :class:`Fenced` and change nothing (DESIGN §5: a
  replaced member that is still alive must not overwrite its successor).
- Times (``created_at``, ``started_at``, ``heartbeat``) are unix seconds taken by the store
  backend at write time, so a reader compares them with the same clock.
- JSON fields (config, info, summary) round-trip through JSON: keys come back as strings, tuples
  as lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Self, runtime_checkable

import numpy as np

Role = Literal["server", "worker", "launcher"]
ROLES: tuple[Role, ...] = ("server", "worker", "launcher")

MEMBER_STATES: tuple[str, ...] = ("running", "exited", "failed")


class StoreError(Exception):
    """Base class of every error a store raises."""


class StoreUnavailable(StoreError):
    """The store could not be reached or stayed busy past its timeout; the call may be retried."""


class UnknownRun(StoreError):
    """The run id is not in the store."""

    def __init__(self, run_id: str, store_uri: str) -> None:
        super().__init__(f"run {run_id!r} not found in store {store_uri}")
        self.run_id = run_id
        self.store_uri = store_uri


class RunExists(StoreError):
    """``create_run`` was called with a run id that is already in the store."""

    def __init__(self, run_id: str, store_uri: str) -> None:
        super().__init__(f"run {run_id!r} already exists in store {store_uri}")
        self.run_id = run_id
        self.store_uri = store_uri


class Fenced(StoreError):
    """A write by a stale epoch: the member was replaced (or never registered) (DESIGN §5)."""

    def __init__(
        self,
        run_id: str,
        role: Role,
        member_id: int,
        epoch: int,
        current_epoch: int | None,
    ) -> None:
        who = f"{role} {member_id} of run {run_id!r}"
        if current_epoch is None:
            msg = f"fenced: {who} is not registered; this writer holds epoch {epoch}"
        else:
            msg = f"fenced: {who} is at epoch {current_epoch}; this writer holds epoch {epoch}"
        super().__init__(msg)
        self.run_id = run_id
        self.role = role
        self.member_id = member_id
        self.epoch = epoch
        self.current_epoch = current_epoch


@dataclass(frozen=True, slots=True)
class Member:
    """One registration of a process in a run, as last written to the store."""

    run_id: str
    role: Role
    member_id: int
    epoch: int
    address: str  # "host:port" for servers, "" for workers
    pid: int
    host: str  # socket.gethostname() of the member
    started_at: float  # unix time of the registration that produced this epoch
    heartbeat: float  # unix time of the last heartbeat (store-side time at write)
    state: str  # "running" | "exited" | "failed"
    info: dict[str, Any]  # free-form fields the member reports: clock, version, loss, ...


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    config: dict[str, Any]
    created_at: float
    finished: bool
    summary: dict[str, Any] | None  # the run summary written at the end


@runtime_checkable
class Store(Protocol):
    """Runs and membership. Every method may also raise :class:`StoreUnavailable`."""

    uri: str
    """A URI that reopens this same store from any process (for sqlite: an absolute path)."""

    def create_run(self, run_id: str, config: dict[str, Any]) -> None:
        """Create a run. Raises :class:`RunExists` if the id is taken."""
        ...

    def get_run(self, run_id: str) -> RunRecord:
        """Raises :class:`UnknownRun`."""
        ...

    def list_runs(self) -> list[RunRecord]:
        """All runs, newest first (by ``created_at``; ties newest-created first)."""
        ...

    def register(
        self, run_id: str, role: Role, member_id: int, *, address: str, pid: int, host: str
    ) -> int:
        """Atomically take the next epoch of ``(run, role, member_id)`` and return it.

        The member's record is replaced: ``state`` is ``"running"``, ``info`` is ``{}``,
        ``started_at`` and ``heartbeat`` are now. Raises :class:`UnknownRun`.
        """
        ...

    def heartbeat(
        self, run_id: str, role: Role, member_id: int, epoch: int, info: dict[str, Any]
    ) -> None:
        """Set the heartbeat time to now and shallow-merge ``info`` into the stored info.

        Top-level keys in ``info`` replace the stored ones; keys not mentioned are kept.
        Raises :class:`Fenced` (changing nothing) unless ``epoch`` is the stored epoch, and
        :class:`UnknownRun` if the run is missing.
        """
        ...

    def set_member_state(
        self, run_id: str, role: Role, member_id: int, epoch: int, state: str
    ) -> None:
        """Set the member's state (``running``/``exited``/``failed``); fenced like heartbeat."""
        ...

    def members(self, run_id: str, role: Role | None = None) -> list[Member]:
        """The run's members (of one role if given), sorted by ``(role, member_id)``.

        Raises :class:`UnknownRun`.
        """
        ...

    def member(self, run_id: str, role: Role, member_id: int) -> Member | None:
        """One member, or None if it never registered. Raises :class:`UnknownRun`."""
        ...

    def finish_run(self, run_id: str, summary: dict[str, Any]) -> None:
        """Mark the run finished and store its summary (a second call replaces the summary)."""
        ...

    # -- replicated shard state (DESIGN §5) ----------------------------------------------------

    def claim_shard(self, run_id: str, shard_id: int, epoch: int) -> None:
        """Take ownership of the shard's state for ``epoch`` before loading it.

        Atomically sets the owner epoch if the stored one is not newer, else raises
        :class:`Fenced`. After the claim every save by an older epoch fails.
        """
        ...

    def save_shard_state(self, snap: ShardSnapshot) -> None:
        """Durably write a complete state, then switch the head to it atomically.

        Only if the head's owner epoch is ``snap.epoch`` (else :class:`Fenced`, nothing
        changes) and the version does not go back (else :class:`StoreError`).
        """
        ...

    def load_shard_state(self, run_id: str, shard_id: int) -> ShardSnapshot | None:
        """The latest complete state (never a torn one), or None if none was saved."""
        ...

    def shard_heads(self, run_id: str) -> dict[int, dict[str, Any]]:
        """Per shard: owner_epoch, epoch, version, saved_at of the replicated state."""
        ...

    def close(self) -> None:
        """Release the connection; idempotent. Later calls raise :class:`StoreError`."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc_info: object) -> None: ...


def check_role(role: str) -> Role:
    """Return ``role`` if it is a valid role, else raise ValueError naming the valid ones."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    return role  # type: ignore[return-value]


def check_member_id(member_id: int) -> int:
    if isinstance(member_id, bool) or not isinstance(member_id, int) or member_id < 0:
        raise ValueError(f"member_id must be a non-negative int; got {member_id!r}")
    return member_id


def check_state(state: str) -> str:
    if state not in MEMBER_STATES:
        raise ValueError(f"member state must be one of {', '.join(MEMBER_STATES)}; got {state!r}")
    return state

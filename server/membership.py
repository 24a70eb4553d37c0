"""Which workers a shard serves, and their clocks (DESIGN §3, §5).

A `Membership` is a versioned set of worker ids, recorded in every log entry, so a recovery
restores the set it was written under. The `ClockTable` keeps, per member, the iterations
received from it, the highest `seq` accepted (the de-duplication table) and when it was last
seen; it is a mapping keyed by worker id, and nothing outside this module assumes the ids are
the positions 0..W-1. The set is fixed for a run today; its version is what a change of members
will bump.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .messages import Code, Reject


@dataclass(frozen=True, slots=True)
class Membership:
    version: int
    ids: tuple[int, ...]  # sorted, distinct, >= 0

    def __post_init__(self) -> None:
        if not self.ids:
            raise ValueError("a membership needs at least one worker")
        if list(self.ids) != sorted(set(self.ids)) or self.ids[0] < 0:
            raise ValueError(f"member ids must be distinct, sorted and >= 0, got {self.ids}")
        if self.version < 0:
            raise ValueError(f"membership version must be >= 0, got {self.version}")

    @classmethod
    def first(cls, num_workers: int, ids: tuple[int, ...] = ()) -> Membership:
        """The membership a run starts with, version 0: workers `ids` (sorted), or
        0..num_workers-1 when none are named."""
        return cls(0, tuple(sorted(ids)) if ids else tuple(range(num_workers)))

    def describe(self) -> str:
        ids = self.ids
        if ids == tuple(range(ids[0], ids[-1] + 1)):
            return f"workers {ids[0]}..{ids[-1]}"
        return "workers " + ", ".join(map(str, ids))

    def to_meta(self) -> dict[str, Any]:
        return {"version": self.version, "ids": list(self.ids)}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Membership:
        return cls(int(meta["version"]), tuple(int(w) for w in meta["ids"]))


@dataclass(slots=True)
class WorkerEntry:
    clock: int = 0  # iterations received from this worker
    last_seq: int = -1  # the de-duplication table: highest seq accepted
    last_seen: float = 0.0  # unix time of the last push or pull, for timeout messages


class ClockTable(Mapping[int, WorkerEntry]):
    """Worker id -> its entry, for the members of one membership, iterated in id order."""

    def __init__(self, membership: Membership) -> None:
        self.membership = membership
        self._entries = {w: WorkerEntry() for w in membership.ids}
        self._validated_seqs = self.seqs()

    def __getitem__(self, worker_id: int) -> WorkerEntry:
        return self._entries[worker_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self.membership.ids)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, worker_id: int) -> Reject | None:
        """A push or pull names a member, or is refused (DESIGN §10)."""
        if worker_id in self._entries:
            return None
        return Reject(
            Code.INVALID_ARGUMENT,
            f"unknown worker {worker_id}: the run has {self.membership.describe()}",
        )

    def clocks(self) -> dict[int, int]:
        return {w: e.clock for w, e in self._entries.items()}

    def seqs(self) -> dict[int, int]:
        return {w: e.last_seq for w, e in self._entries.items()}

    def behind(self, clock: int) -> list[int]:
        """The members that have not pushed `clock` yet."""
        return [w for w, e in self._entries.items() if e.clock <= clock]

    # -- the log's record (DESIGN §5) ---------------------------------------------------------

    def to_meta(self) -> dict[str, Any]:
        """The table as a log entry records it: the membership, and clocks and last seqs in the
        order of its ids."""
        return {
            "membership": self.membership.to_meta(),
            "clocks": [e.clock for e in self._entries.values()],
            "last_seq": [e.last_seq for e in self._entries.values()],
        }

    def load_meta(self, meta: Mapping[str, Any]) -> None:
        """Restore clocks and seqs from a log record. A record written before memberships were
        recorded (no "membership") lists workers 0..W-1 by position."""
        recorded = (
            Membership.from_meta(meta["membership"])
            if "membership" in meta
            else Membership.first(len(meta["clocks"]))
        )
        if recorded != self.membership:
            raise ValueError(
                f"replicated state has {recorded.describe()} (membership version "
                f"{recorded.version}), the shard {self.membership.describe()} (version "
                f"{self.membership.version})"
            )
        for entry, clock, seq in zip(
            self._entries.values(), meta["clocks"], meta["last_seq"], strict=True
        ):
            entry.clock, entry.last_seq = int(clock), int(seq)
        self._validated_seqs = self.seqs()

    # -- invariants (STYLE §3) ----------------------------------------------------------------

    def validate(self) -> None:
        assert tuple(self._entries) == self.membership.ids, (self._entries, self.membership)
        seqs = self.seqs()
        # An accepted seq is never accepted again: the de-dup table only moves forward.
        assert all(seqs[w] >= s for w, s in self._validated_seqs.items()), seqs
        assert all(e.clock >= 0 and e.last_seq >= -1 for e in self._entries.values())
        self._validated_seqs = seqs

    def rebase(self) -> None:
        """Take the seqs as they are now as validate()'s baseline (after a restore)."""
        self._validated_seqs = self.seqs()

"""The worker's ack ledger (DESIGN §5, §7): what the shards acknowledged, and what recoveries lost.

Pure bookkeeping, no I/O. The worker feeds it two events:

- `acked(shard, seq, version)`: the shard acknowledged this worker's push `seq`, answering with
  its version. A retried push acknowledged as a duplicate moves nothing.
- `resolved(shard, epoch=..., served_epoch=..., version=..., last_seq=...)`: the worker looked
  the shard up in the store (at store epoch `epoch`) and asked it for its state. When the store
  names a newer incarnation than the last resolve, the shard was replaced and restored from the
  store; an acknowledged version or push that the restored state does not hold was lost (with
  async replication a crash may lose its window, DESIGN §5; with sync it must lose none).

Its read-outs are what the worker reports in its heartbeats: `acked_seqs` (audited against the
shards' applied logs), `lost_updates` and `lost_acked` (per recovery, keyed "shard:epoch").

Events for different shards may arrive from different threads (the worker pushes to all shards in
parallel); an event only touches its own shard's entries.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Resolution:
    """What one `resolved` event found."""

    shard: int
    replaced: bool  # the store names a newer incarnation than the last resolve
    lost_versions: int = 0  # how far the restored version is behind the highest acked one
    lost_pushes: int = 0  # this worker's acked pushes that are not in the restored log


class AckLedger:
    def __init__(self, shards: int) -> None:
        if shards < 1:
            raise ValueError(f"a ledger needs at least one shard, not {shards}")
        self.shards = shards
        self._epochs: list[int | None] = [None] * shards  # store epoch at the last resolve
        self._acked_versions = [-1] * shards  # highest version a push was acked at
        self._acked_seqs = [-1] * shards  # highest seq of this worker's pushes acked
        self._replacements = [0] * shards  # resolves that found a newer incarnation
        self._lost_updates: dict[str, int] = {}  # "shard:epoch" -> acked versions lost
        self._lost_acked: dict[str, int] = {}  # "shard:epoch" -> this worker's acked pushes lost
        self._validated: tuple[list[int | None], list[int], list[int], list[int]] | None = None

    # ---- events ---------------------------------------------------------------------------

    def acked(self, shard: int, seq: int, version: int) -> bool:
        """Record an acknowledged push; False when it moves nothing (a duplicate, an old ack)."""
        self._check_shard(shard)
        if self._epochs[shard] is None:
            raise ValueError(f"an ack from shard {shard}, which was never resolved")
        if seq < 0 or version < 0:
            raise ValueError(f"an ack needs seq >= 0 and version >= 0, not {seq}, {version}")
        # High-water marks: a restored shard acks at versions below the mark until it passes it,
        # and a later recovery is measured against the mark.
        moved = seq > self._acked_seqs[shard] or version > self._acked_versions[shard]
        self._acked_versions[shard] = max(self._acked_versions[shard], version)
        self._acked_seqs[shard] = max(self._acked_seqs[shard], seq)
        return moved

    def resolved(
        self, shard: int, *, epoch: int, served_epoch: int, version: int, last_seq: int
    ) -> Resolution:
        """Record a (re-)resolve of `shard`, and what a replacement lost.

        `epoch` is the shard's epoch in the store; `served_epoch`, `version` and `last_seq` are
        its reply: its own epoch (which names the recovery), its version, and the last seq of
        this worker in its de-duplication table (-1: none).
        """
        self._check_shard(shard)
        previous = self._epochs[shard]
        if previous is not None and epoch < previous:
            # The worker waits for epochs at least those it resolved before (`wait_for_shards`).
            raise ValueError(f"shard {shard} resolved at epoch {epoch} after epoch {previous}")
        if version < 0 or last_seq < -1:
            raise ValueError(
                f"a reply needs version >= 0 and last_seq >= -1: {version}, {last_seq}"
            )
        self._epochs[shard] = epoch
        if previous is None or epoch == previous:
            return Resolution(shard, replaced=False)
        self._replacements[shard] += 1
        key = f"{shard}:{served_epoch}"
        lost_versions = max(self._acked_versions[shard] - version, 0)
        if lost_versions:
            # The replacement restored an older state than this worker saw acknowledged.
            self._lost_updates[key] = max(self._lost_updates.get(key, 0), lost_versions)
        lost_pushes = max(self._acked_seqs[shard] - last_seq, 0)
        if lost_pushes:
            # Pushes of this worker the shard acknowledged are not in its restored log.
            self._lost_acked[key] = lost_pushes
        return Resolution(shard, True, lost_versions, lost_pushes)

    # ---- read-outs ------------------------------------------------------------------------

    @property
    def acked_versions(self) -> list[int]:
        return list(self._acked_versions)

    @property
    def acked_seqs(self) -> list[int]:
        return list(self._acked_seqs)

    @property
    def lost_updates(self) -> dict[str, int]:
        return dict(self._lost_updates)

    @property
    def lost_acked(self) -> dict[str, int]:
        return dict(self._lost_acked)

    @property
    def epochs(self) -> list[int | None]:
        return list(self._epochs)

    @property
    def replacements(self) -> list[int]:
        return list(self._replacements)

    # ---- invariants -----------------------------------------------------------------------

    def validate(self) -> None:
        """Raise AssertionError when an invariant is broken; tests call it after every event."""
        n = self.shards
        lists = (self._epochs, self._acked_versions, self._acked_seqs, self._replacements)
        assert all(len(values) == n for values in lists), "a per-shard entry is missing"
        assert all(v >= -1 for v in self._acked_versions + self._acked_seqs)
        for i, e in enumerate(self._epochs):
            if e is None:
                # Nothing is acked by, or lost at, a shard this worker never reached.
                assert self._acked_versions[i] == self._acked_seqs[i] == -1, i
                assert self._replacements[i] == 0, i
        if self._validated is not None:
            # Every mark only moves forward: epochs, acked versions and seqs, replacements.
            epochs, versions, seqs, replacements = self._validated
            for before, now in zip(epochs, self._epochs, strict=True):
                assert before is None or (now is not None and now >= before), (before, now)
            assert all(a >= b for a, b in zip(self._acked_versions, versions, strict=True))
            assert all(a >= b for a, b in zip(self._acked_seqs, seqs, strict=True))
            assert all(a >= b for a, b in zip(self._replacements, replacements, strict=True))
        self._validated = (
            list(self._epochs),
            list(self._acked_versions),
            list(self._acked_seqs),
            list(self._replacements),
        )
        recoveries: dict[int, set[str]] = {}
        for key, lost in [*self._lost_updates.items(), *self._lost_acked.items()]:
            shard = _shard_of(key)
            assert 0 <= shard < n, key
            assert lost > 0, (key, lost)
            recoveries.setdefault(shard, set()).add(key)
        # Lost ⊆ acked: a restored version is >= 0 and a restored seq >= -1.
        for key, lost in self._lost_updates.items():
            assert lost <= self._acked_versions[_shard_of(key)], (key, lost)
        for key, lost in self._lost_acked.items():
            assert lost <= self._acked_seqs[_shard_of(key)] + 1, (key, lost)
        for shard, keys in recoveries.items():
            # Every loss was found by a resolve that saw a replacement.
            assert len(keys) <= self._replacements[shard], (shard, keys)

    def _check_shard(self, shard: int) -> None:
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard {shard} is outside 0..{self.shards - 1}")


def _shard_of(key: str) -> int:
    shard, _, _ = key.partition(":")
    return int(shard)

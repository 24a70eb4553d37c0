"""The worker's ack ledger (DESIGN §5, §7) as a pure state object: no sockets, no store.

`validate()` runs after every event; refused and no-op events must leave the state untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.worker.ledger import AckLedger, Resolution


def fingerprint(ledger: AckLedger):
    return (
        tuple(ledger.epochs),
        tuple(ledger.acked_versions),
        tuple(ledger.acked_seqs),
        tuple(ledger.replacements),
        tuple(sorted(ledger.lost_updates.items())),
        tuple(sorted(ledger.lost_acked.items())),
    )


def acked(ledger: AckLedger, shard: int, seq: int, version: int) -> bool:
    moved = ledger.acked(shard, seq=seq, version=version)
    ledger.validate()
    return moved


def resolved(
    ledger: AckLedger,
    shard: int,
    epoch: int,
    version: int,
    last_seq: int,
    served_epoch: int | None = None,
) -> Resolution:
    result = ledger.resolved(
        shard,
        epoch=epoch,
        served_epoch=epoch if served_epoch is None else served_epoch,
        version=version,
        last_seq=last_seq,
    )
    ledger.validate()
    return result


def refused(ledger: AckLedger, event, *args, **kwargs) -> None:
    before = fingerprint(ledger)
    with pytest.raises(ValueError):
        event(*args, **kwargs)
    assert fingerprint(ledger) == before
    ledger.validate()


def started(shards: int = 2) -> AckLedger:
    """A ledger after the worker's first resolve: every shard fresh at epoch 1."""
    ledger = AckLedger(shards)
    ledger.validate()
    for i in range(shards):
        first = resolved(ledger, i, epoch=1, version=0, last_seq=-1)
        assert first == Resolution(i, replaced=False)
    return ledger


def test_a_fresh_ledger_has_acked_nothing_and_lost_nothing():
    ledger = AckLedger(3)
    ledger.validate()
    assert ledger.acked_versions == ledger.acked_seqs == [-1, -1, -1]
    assert ledger.lost_updates == ledger.lost_acked == {}
    assert ledger.epochs == [None, None, None] and ledger.replacements == [0, 0, 0]
    with pytest.raises(ValueError):
        AckLedger(0)


def test_the_first_resolve_is_never_a_replacement_even_of_a_restarted_worker():
    # A restarted worker finds the shards with its earlier pushes in their logs: nothing acked by
    # this process, so nothing it could have lost.
    ledger = AckLedger(1)
    assert resolved(ledger, 0, epoch=3, version=40, last_seq=19) == Resolution(0, replaced=False)
    assert ledger.replacements == [0] and ledger.lost_acked == {}


def test_refused_events_leave_the_ledger_unchanged():
    ledger = started(2)
    acked(ledger, 0, seq=0, version=2)
    refused(ledger, ledger.acked, 2, seq=0, version=1)  # no such shard
    refused(ledger, ledger.acked, -1, seq=0, version=1)
    refused(ledger, ledger.acked, 0, seq=-1, version=1)
    refused(ledger, ledger.acked, 0, seq=1, version=-1)
    refused(ledger, ledger.resolved, 2, epoch=1, served_epoch=1, version=0, last_seq=-1)
    resolved(ledger, 1, epoch=3, version=0, last_seq=-1)
    # The worker waits for epochs at least those it resolved before: an older one is refused.
    refused(ledger, ledger.resolved, 1, epoch=2, served_epoch=2, version=0, last_seq=-1)
    refused(ledger, ledger.resolved, 0, epoch=1, served_epoch=1, version=-1, last_seq=-1)
    refused(ledger, ledger.resolved, 0, epoch=1, served_epoch=1, version=0, last_seq=-2)


def test_an_ack_from_a_shard_never_resolved_is_refused():
    ledger = AckLedger(2)
    resolved(ledger, 0, epoch=1, version=0, last_seq=-1)
    refused(ledger, ledger.acked, 1, seq=0, version=1)


def test_a_duplicate_ack_changes_nothing():
    ledger = started(1)
    assert acked(ledger, 0, seq=4, version=9)
    before = fingerprint(ledger)
    # The retry of an applied push is acknowledged again, as a duplicate, at the same version.
    assert not acked(ledger, 0, seq=4, version=9)
    assert not acked(ledger, 0, seq=3, version=5)  # an older ack arriving late
    assert fingerprint(ledger) == before


def test_resolving_again_at_the_same_epoch_changes_nothing():
    ledger = started(2)
    acked(ledger, 0, seq=5, version=12)
    before = fingerprint(ledger)
    # A transient failure: the shards are looked up again but none was replaced, even though
    # the shard's version (other workers) and log (this worker's pushes) may differ.
    assert resolved(ledger, 0, epoch=1, version=3, last_seq=1) == Resolution(0, replaced=False)
    assert fingerprint(ledger) == before


@dataclass(frozen=True)
class Scenario:
    # ("ack", shard, seq, version) | ("resolve", shard, epoch, version, last_seq[, served_epoch])
    events: tuple[tuple, ...]
    lost_updates: dict[str, int]
    lost_acked: dict[str, int]
    replacements: list[int]


SCENARIOS = {
    "no loss": Scenario(
        (("ack", 0, 0, 1), ("ack", 1, 0, 1), ("ack", 0, 1, 2), ("resolve", 0, 1, 2, 1)),
        {},
        {},
        [0, 0],
    ),
    # Async replication: shard 0 had replicated up to version 7 (this worker's seq 6) when it
    # crashed; its replacement at epoch 2 restores that, three acked updates short.
    "loss after a regression on re-resolve (async)": Scenario(
        (*(("ack", 0, s, s + 1) for s in range(10)), ("resolve", 0, 2, 7, 6)),
        {"0:2": 3},
        {"0:2": 3},
        [1, 0],
    ),
    # Other workers' updates count in the version: the version falls further than this worker's
    # own log, which lost only its last push.
    "other workers' updates lost with one of ours": Scenario(
        (("ack", 1, 0, 3), ("ack", 1, 1, 6), ("ack", 1, 2, 9), ("resolve", 1, 2, 4, 1)),
        {"1:2": 5},
        {"1:2": 1},
        [0, 1],
    ),
    "a duplicate ack": Scenario(
        (("ack", 0, 3, 10), ("ack", 0, 3, 10), ("resolve", 0, 2, 10, 3)),
        {},
        {},
        [1, 0],
    ),
    # Sync replication: the replacement restores every acknowledged update.
    "an epoch change without regression (sync)": Scenario(
        (("ack", 0, 0, 2), ("ack", 0, 1, 4), ("resolve", 0, 2, 4, 1), ("resolve", 1, 5, 0, -1)),
        {},
        {},
        [1, 1],
    ),
    # The high-water mark stays after a loss: acks below it from the restored shard do not
    # lower it, and the next recovery is measured against it.
    "two recoveries measured against the high-water mark": Scenario(
        (
            ("ack", 0, 5, 6),
            ("resolve", 0, 2, 4, 3),
            ("ack", 0, 4, 5),
            ("resolve", 0, 3, 5, 4),
        ),
        {"0:2": 2, "0:3": 1},
        {"0:2": 2, "0:3": 1},
        [2, 0],
    ),
    # Two resolves that name one recovery ("shard:epoch" from the served epoch) with different
    # findings: the version loss keeps the largest, the push loss the latest.
    "one recovery found twice": Scenario(
        (
            ("ack", 0, 6, 8),
            ("resolve", 0, 2, 3, 2, 4),
            ("resolve", 0, 3, 6, 5, 4),
        ),
        {"0:4": 5},
        {"0:4": 1},
        [2, 0],
    ),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenarios(name):
    scenario = SCENARIOS[name]
    ledger = started(2)
    for kind, shard, *rest in scenario.events:
        if kind == "ack":
            acked(ledger, shard, *rest)
        else:
            resolved(ledger, shard, *rest)
    assert ledger.lost_updates == scenario.lost_updates
    assert ledger.lost_acked == scenario.lost_acked
    assert ledger.replacements == scenario.replacements


def test_a_resolve_reports_what_it_found():
    ledger = started(1)
    acked(ledger, 0, seq=9, version=30)
    found = resolved(ledger, 0, epoch=2, version=25, last_seq=7)
    assert found == Resolution(0, replaced=True, lost_versions=5, lost_pushes=2)


def test_the_recovery_is_named_by_the_epoch_the_shard_serves():
    ledger = started(1)
    acked(ledger, 0, seq=2, version=3)
    resolved(ledger, 0, epoch=2, version=1, last_seq=0, served_epoch=7)
    assert ledger.lost_updates == {"0:7": 2} and ledger.lost_acked == {"0:7": 2}


def test_read_outs_are_copies():
    ledger = started(1)
    acked(ledger, 0, seq=0, version=1)
    ledger.acked_seqs.append(5)
    ledger.lost_updates["0:9"] = 1
    assert ledger.acked_seqs == [0] and ledger.lost_updates == {}
    ledger.validate()


# ---- a property over random event sequences ------------------------------------------------


class Reference:
    """The bookkeeping as the worker did it inline: a whole resolve of all shards at once."""

    def __init__(self, shards: int) -> None:
        self.epochs: list[int | None] = [None] * shards
        self.acked_versions = [-1] * shards
        self.acked_seqs = [-1] * shards
        self.lost_updates: dict[str, int] = {}
        self.lost_acked: dict[str, int] = {}

    def ack(self, i: int, seq: int, version: int) -> None:
        self.acked_versions[i] = max(self.acked_versions[i], version)
        self.acked_seqs[i] = max(self.acked_seqs[i], seq)

    def resolve(self, i: int, epoch: int, served_epoch: int, version: int, last_seq: int) -> None:
        previous = self.epochs[i]
        if previous is not None and epoch > previous:
            key = f"{i}:{served_epoch}"
            if self.acked_versions[i] > version:
                lost = self.acked_versions[i] - version
                self.lost_updates[key] = max(self.lost_updates.get(key, 0), lost)
            if self.acked_seqs[i] > last_seq:
                self.lost_acked[key] = self.acked_seqs[i] - last_seq
        self.epochs[i] = epoch


SHARDS = 3
ack_events = st.tuples(
    st.just("ack"),
    st.integers(-1, SHARDS),
    st.integers(-1, 12),
    st.integers(-1, 30),
)
resolve_events = st.tuples(
    st.just("resolve"),
    st.integers(-1, SHARDS),
    st.integers(1, 5),  # store epoch
    st.integers(1, 3),  # served epoch: few values, so that recoveries share a key at times
    st.integers(-1, 30),  # version
    st.integers(-2, 12),  # last seq
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(ack_events, resolve_events), max_size=40))
def test_random_event_sequences_keep_the_invariants_and_match_the_reference(events):
    ledger = AckLedger(SHARDS)
    reference = Reference(SHARDS)
    ledger.validate()
    for event in events:
        before = fingerprint(ledger)
        try:
            if event[0] == "ack":
                _, shard, seq, version = event
                moved = ledger.acked(shard, seq=seq, version=version)
                reference.ack(shard, seq, version)
                assert moved == (fingerprint(ledger) != before)
            else:
                _, shard, epoch, served, version, last_seq = event
                ledger.resolved(
                    shard, epoch=epoch, served_epoch=served, version=version, last_seq=last_seq
                )
                reference.resolve(shard, epoch, served, version, last_seq)
        except ValueError:
            assert fingerprint(ledger) == before
        ledger.validate()
        assert ledger.epochs == reference.epochs
        assert ledger.acked_versions == reference.acked_versions
        assert ledger.acked_seqs == reference.acked_seqs
        assert ledger.lost_updates == reference.lost_updates
        assert ledger.lost_acked == reference.lost_acked

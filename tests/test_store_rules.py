"""The epoch rules of the store (DESIGN §5), and every backend keeping them.

:mod:`tether.store.rules` states once when a registration, a member's write, a claim and a save
go ahead. Here: a table of cases per rule, a property comparing each rule to a direct
restatement, and every backend of test_store.py (SQLite, mongomock, a real replica set when one
is available) refusing exactly what the rule refuses, with the same error, and changing nothing
when it refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import mongomock
import numpy as np
import pytest
import test_store
from hypothesis import given
from hypothesis import strategies as st
from pymongo.errors import DuplicateKeyError

from tether.store import Fenced, MongoStore, Role, ShardSnapshot, Store, StoreError
from tether.store.rules import claim_refusal, member_write_refusal, next_epoch, save_refusal

# test_store.py's fixtures, found by pytest under these names: every backend (DESIGN §6).
backend = test_store.backend
store_factory = test_store.store_factory
store = test_store.store
clock = test_store.clock
mongodb_uri = test_store.mongodb_uri  # asked for by the real-replica-set backend

RUN = test_store.RUN

Outcome = tuple[type[StoreError], str] | None


def _snap(epoch: int, version: int, shard_id: int = 0) -> ShardSnapshot:
    arrays = {"params": np.full(10, version, dtype=np.float32)}
    return ShardSnapshot(RUN, shard_id, epoch, version, {"version": version}, arrays)


def _expected(refusal: StoreError | None) -> Outcome:
    return None if refusal is None else (type(refusal), str(refusal))


def _outcome(call: Callable[[], Any]) -> Outcome:
    try:
        call()
    except StoreError as e:
        return type(e), str(e)
    return None


# -- the rules, case by case ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "expected"), [(None, 1), (1, 2), (7, 8)], ids=["first", "second", "eighth"]
)
def test_next_epoch(stored: int | None, expected: int) -> None:
    assert next_epoch(stored) == expected


@pytest.mark.parametrize(
    ("epoch", "stored", "current"),
    [
        (1, 1, "allowed"),
        (1, 2, 2),  # replaced: a zombie
        (3, 2, 2),  # an epoch from the future is no better than an old one
        (1, None, None),  # never registered
    ],
)
def test_member_write_refusal(epoch: int, stored: int | None, current: object) -> None:
    refusal = member_write_refusal(RUN, "worker", 4, epoch, stored)
    if current == "allowed":
        assert refusal is None
        return
    assert isinstance(refusal, Fenced)
    assert (refusal.run_id, refusal.role, refusal.member_id) == (RUN, "worker", 4)
    assert (refusal.epoch, refusal.current_epoch) == (epoch, current)
    assert ("not registered" in str(refusal)) == (current is None)


@pytest.mark.parametrize(
    ("epoch", "owner", "refused"),
    [
        (1, None, False),  # the first claim
        (2, 1, False),  # a replacement takes over
        (2, 2, False),  # the same claim retried
        (1, 2, True),  # an older claim cannot take it back
    ],
)
def test_claim_refusal(epoch: int, owner: int | None, refused: bool) -> None:
    refusal = claim_refusal(RUN, 3, epoch, owner)
    if not refused:
        assert refusal is None
        return
    assert isinstance(refusal, Fenced)
    assert (refusal.role, refusal.member_id, refusal.epoch, refusal.current_epoch) == (
        "server",
        3,
        epoch,
        owner,
    )


@pytest.mark.parametrize(
    ("epoch", "version", "owner", "head_version", "expected"),
    [
        (1, 1, 1, None, None),  # the first save after the claim
        (1, 5, 1, 4, None),  # forward
        (1, 5, 1, 5, None),  # the same version rewrites
        (1, 4, 1, 5, "regression"),
        (1, 1, None, None, "fenced"),  # never claimed
        (1, 9, 2, 4, "fenced"),  # replaced
        (3, 9, 2, 4, "fenced"),  # from the future
        (1, 1, 2, 5, "fenced"),  # fencing is decided before the version
    ],
)
def test_save_refusal(
    epoch: int, version: int, owner: int | None, head_version: int | None, expected: str | None
) -> None:
    snap = _snap(epoch, version, shard_id=2)
    refusal = save_refusal(snap, owner, head_version)
    if expected is None:
        assert refusal is None
    elif expected == "fenced":
        assert isinstance(refusal, Fenced)
        assert (refusal.member_id, refusal.epoch, refusal.current_epoch) == (2, epoch, owner)
    else:
        assert type(refusal) is StoreError
        assert f"go back from version {head_version} to {version}" in str(refusal)


# -- the rules against a direct restatement ------------------------------------------------------

_epochs = st.integers(min_value=0, max_value=6)
_maybe = st.none() | _epochs


@given(epoch=_epochs, stored=_maybe)
def test_member_write_rule_property(epoch: int, stored: int | None) -> None:
    refusal = member_write_refusal(RUN, "server", 0, epoch, stored)
    assert (refusal is None) == (stored is not None and stored == epoch)
    if refusal is not None:
        assert str(refusal) == str(Fenced(RUN, "server", 0, epoch, stored))


@given(epoch=_epochs, owner=_maybe)
def test_claim_rule_property(epoch: int, owner: int | None) -> None:
    refusal = claim_refusal(RUN, 0, epoch, owner)
    assert (refusal is None) == (owner is None or epoch >= owner)
    if refusal is not None:
        assert str(refusal) == str(Fenced(RUN, "server", 0, epoch, owner))


@given(epoch=_epochs, version=_epochs, owner=_maybe, head_version=_maybe)
def test_save_rule_property(
    epoch: int, version: int, owner: int | None, head_version: int | None
) -> None:
    snap = _snap(epoch, version)
    refusal = save_refusal(snap, owner, head_version)
    fenced = owner is None or owner != epoch
    goes_back = head_version is not None and version < head_version
    if fenced:
        assert isinstance(refusal, Fenced) and refusal.current_epoch == owner
    elif goes_back:
        assert type(refusal) is StoreError and f"to {version} (epoch {epoch})" in str(refusal)
    else:
        assert refusal is None


@given(stored=_maybe)
def test_next_epoch_property(stored: int | None) -> None:
    assert next_epoch(stored) == (0 if stored is None else stored) + 1
    assert member_write_refusal(RUN, "server", 0, next_epoch(stored), next_epoch(stored)) is None


# -- every backend refuses what the rules refuse -------------------------------------------------


def _register(s: Store, member_id: int) -> int:
    return s.register(RUN, "worker", member_id, address="127.0.0.1:1", pid=1, host="h")


def test_backends_register_and_fence_members_by_the_rule(store: Store) -> None:
    store.create_run(RUN, {})
    mismatches: list[tuple[Any, ...]] = []
    for registrations in range(4):  # member `registrations` registered that many times
        member_id = registrations
        stored: int | None = None
        for _ in range(registrations):
            epoch = _register(store, member_id)
            assert epoch == next_epoch(stored)
            stored = epoch
        for epoch in range(5):
            expected = _expected(member_write_refusal(RUN, "worker", member_id, epoch, stored))
            before = store.member(RUN, "worker", member_id)
            key: tuple[str, Role, int, int] = (RUN, "worker", member_id, epoch)
            writes: dict[str, Callable[[], None]] = {
                "heartbeat": partial(store.heartbeat, *key, {"k": 1}),
                # a key that is not a field path: MongoDB's compare-and-set path
                "heartbeat a.b": partial(store.heartbeat, *key, {"a.b": 1}),
                "state": partial(store.set_member_state, *key, "running"),
            }
            for what, write in writes.items():
                got = _outcome(write)
                if got != expected:
                    mismatches.append((what, epoch, stored, got, expected))
                if expected is not None and store.member(RUN, "worker", member_id) != before:
                    mismatches.append((what, epoch, stored, "changed the member", before))
    assert mismatches == []


def test_backends_claim_by_the_rule(store: Store) -> None:
    store.create_run(RUN, {})
    mismatches: list[tuple[Any, ...]] = []
    shard_id = 0
    for owner in (None, 1, 2, 3):
        for epoch in range(5):
            if owner is not None:
                store.claim_shard(RUN, shard_id, owner)
            before = store.shard_heads(RUN)
            expected = _expected(claim_refusal(RUN, shard_id, epoch, owner))
            got = _outcome(partial(store.claim_shard, RUN, shard_id, epoch))
            if got != expected:
                mismatches.append((owner, epoch, got, expected))
            after = store.shard_heads(RUN)
            if expected is None:
                if after.get(shard_id, {}).get("owner_epoch") != epoch:
                    mismatches.append((owner, epoch, "owner not taken", after.get(shard_id)))
            elif after != before:
                mismatches.append((owner, epoch, "changed the heads", before, after))
            shard_id += 1
    assert mismatches == []


def _head_states() -> list[tuple[int | None, int | None]]:
    """(owner epoch, head version) pairs a shard can be brought to."""
    return [(None, None)] + [(o, None) for o in (1, 2, 3)] + [(o, 2) for o in (1, 2, 3)]


def test_backends_save_by_the_rule(store: Store) -> None:
    store.create_run(RUN, {})
    mismatches: list[tuple[Any, ...]] = []
    shard_id = 0
    for owner, head_version in _head_states():
        for epoch in (1, 2, 3):
            for version in (1, 2, 3):
                if head_version is not None:  # saved by epoch 1, then claimed by `owner`
                    store.claim_shard(RUN, shard_id, 1)
                    store.save_shard_state(_snap(1, head_version, shard_id))
                if owner is not None:
                    store.claim_shard(RUN, shard_id, owner)
                snap = _snap(epoch, version, shard_id)
                before = (store.shard_heads(RUN), store.load_shard_state(RUN, shard_id))
                expected = _expected(save_refusal(snap, owner, head_version))
                got = _outcome(partial(store.save_shard_state, snap))
                if got != expected:
                    mismatches.append((owner, head_version, epoch, version, got, expected))
                after = (store.shard_heads(RUN), store.load_shard_state(RUN, shard_id))
                if expected is None:
                    loaded = after[1]
                    if loaded is None or (loaded.epoch, loaded.version) != (epoch, version):
                        mismatches.append((owner, head_version, epoch, version, "not saved"))
                elif not _same_state(before, after):
                    mismatches.append((owner, head_version, epoch, version, "changed the head"))
                shard_id += 1
    assert mismatches == []


def _same_state(a: tuple[Any, ShardSnapshot | None], b: tuple[Any, ShardSnapshot | None]) -> bool:
    """Equal heads and equal loaded states (ShardSnapshot holds arrays, so == is not enough)."""
    (heads_a, snap_a), (heads_b, snap_b) = a, b
    if heads_a != heads_b or (snap_a is None) != (snap_b is None):
        return False
    if snap_a is None or snap_b is None:
        return True
    return (snap_a.epoch, snap_a.version, snap_a.meta) == (
        snap_b.epoch,
        snap_b.version,
        snap_b.meta,
    ) and all(snap_a.arrays[k].tobytes() == v.tobytes() for k, v in snap_b.arrays.items())


# -- MongoDB: a claim that loses the upsert race ---------------------------------------------------


class _LosesTheInsertRace:
    """A heads collection whose first ``update_one`` finds that ``owner``'s claim created the
    head a moment before, as two first claims racing on the upsert do."""

    def __init__(self, heads: Any, owner: int) -> None:
        self._heads = heads
        self._owner = owner
        self.raced = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._heads, name)

    def update_one(self, filt: dict[str, Any], update: dict[str, Any], **kw: Any) -> Any:
        if not self.raced:
            self.raced = True
            racer = {**update, "$set": {"owner_epoch": self._owner}}  # the same claim, older
            self._heads.update_one({"_id": filt["_id"]}, racer, upsert=True)
            raise DuplicateKeyError("E11000 duplicate key error (raced)", 11000)
        return self._heads.update_one(filt, update, **kw)


@pytest.mark.parametrize(("racer", "refused"), [(1, False), (2, False), (3, True)])
def test_mongo_claim_race_is_decided_by_the_rule(racer: int, refused: bool) -> None:
    # epoch 2 claims a shard nobody has claimed; the first claim of `racer` creates the head
    # between epoch 2's filter and its insert. Only a newer racer fences epoch 2.
    client: Any = mongomock.MongoClient()
    s = MongoStore("mongodb://mongomock.invalid/t?replicaSet=rs0", client_factory=lambda: client)
    s.create_run(RUN, {})
    racing = _LosesTheInsertRace(s._heads, racer)
    s._heads = racing
    expected = _expected(claim_refusal(RUN, 0, 2, racer))
    assert _outcome(lambda: s.claim_shard(RUN, 0, 2)) == expected
    assert racing.raced
    assert s.shard_heads(RUN)[0]["owner_epoch"] == (racer if refused else 2)
    s.close()

"""A run's secret token: the record, its rotation rule and the store's protocol for it (DESIGN §13).

Every run gets a random token when it is created (`Store.create_run` makes it in the same write
as the run). Members and clients present it on every call; shards refuse a call without a valid
one. The token is kept apart from the run's config and meta -- its own table (SQLite) or
collection (MongoDB), read by :meth:`RunSecrets.run_tokens` only -- so nothing that prints a run
(`tether status`, summaries, experiment listings) can show it, and a MongoDB operator can grant
read access to runs without it.

A run holds a short list of tokens. Rotation (:func:`rotated`) adds a new one and gives each
older one an expiry ``grace_s`` away: until then both are accepted, so members that have not
re-read the store yet keep working. The new token is *accepted* at once but *used* by clients
only from ``use_from``, ``propagate_s`` later, by which time every shard has re-read the list
(and a shard that meets a token it does not know re-reads it before refusing). All times are
the store's clock (unix seconds).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

TOKEN_BYTES = 32  # 256 random bits, URL-safe base64: 43 characters
DEFAULT_GRACE_S = 60.0  # how long a rotated-out token is still accepted
DEFAULT_PROPAGATE_S = 5.0  # from a rotation until clients present the new token


@dataclass(frozen=True, slots=True)
class RunToken:
    token: str
    created_at: float
    use_from: float  # clients present it from this time on; shards accept it from creation
    expires_at: float | None = None  # refused from this time on; None: until rotated out

    def accepted_at(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    def __repr__(self) -> str:  # never print the secret itself
        return (
            f"RunToken(created_at={self.created_at}, use_from={self.use_from}, "
            f"expires_at={self.expires_at})"
        )


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def first_token(now: float) -> list[RunToken]:
    """A new run's token list: one token, in use at once."""
    return [RunToken(new_token(), now, now)]


def rotated(
    tokens: Sequence[RunToken],
    now: float,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    propagate_s: float = DEFAULT_PROPAGATE_S,
    token: str | None = None,
) -> list[RunToken]:
    """``tokens`` after a rotation at ``now``: expired ones dropped, the others accepted for
    ``grace_s`` more at most, and a new one used from ``now + propagate_s``."""
    if not grace_s >= propagate_s >= 0:
        raise ValueError(
            f"the grace period ({grace_s:g}s) must be at least the propagation delay "
            f"({propagate_s:g}s), and neither negative"
        )
    until = now + grace_s
    kept = [
        dataclasses.replace(t, expires_at=min(until, t.expires_at or until))
        for t in tokens
        if t.accepted_at(now)
    ]
    return [*kept, RunToken(token or new_token(), now, now + propagate_s)]


def accepted(tokens: Sequence[RunToken], now: float) -> list[str]:
    """The tokens a shard accepts at ``now``."""
    return [t.token for t in tokens if t.accepted_at(now)]


def current(tokens: Sequence[RunToken], now: float) -> str | None:
    """The token a client presents at ``now``: the newest one in use and not expired."""
    usable = [t for t in tokens if t.use_from <= now and t.accepted_at(now)]
    if not usable:  # only a token not in use yet (a clock behind the store's): take the newest
        usable = [t for t in tokens if t.accepted_at(now)]
    return max(usable, key=lambda t: t.created_at).token if usable else None


def dumps(tokens: Sequence[RunToken]) -> str:
    return json.dumps([asdict(t) for t in tokens], sort_keys=True)


def loads(text: str) -> list[RunToken]:
    return [RunToken(**d) for d in json.loads(text)]


class RunSecrets(Protocol):
    """The store's part for run tokens (each backend implements it beside the run tables)."""

    def run_tokens(self, run_id: str) -> list[RunToken]:
        """The run's tokens, oldest first; ``[]`` for a run created before runs had tokens.
        Raises :class:`tether.store.UnknownRun`."""
        ...

    def swap_run_tokens(
        self, run_id: str, expected: Sequence[RunToken], tokens: Sequence[RunToken]
    ) -> bool:
        """Replace the run's tokens with ``tokens`` if they are still ``expected`` (what the
        caller read); False, changing nothing, if another writer changed them first. Raises
        :class:`tether.store.UnknownRun`."""
        ...

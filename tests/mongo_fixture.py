"""A real MongoDB replica set for the store tests, or a clear skip (DESIGN §6).

``TETHER_TEST_MONGODB_URI`` names an existing replica set to test against (each test uses its
own database ``tether_test_<random>`` and drops it afterwards). Otherwise, when ``mongod`` is on
PATH, one three-member set is started on free loopback ports for the whole session, with
:func:`replica_set.start_replica_set` (the code behind ``tether mongo up``): every member in
its own process group, data in a temporary folder; it is stopped and reaped, and the folder
removed, when the session ends. Without either, the tests that need it are skipped with
:data:`SKIP_REASON` -- never faked.

Test modules import the ``mongodb_uri`` fixture from here (there is no conftest for it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

from tether.devtools.replica_set import ReplicaSet, start_replica_set

ENV_URI = "TETHER_TEST_MONGODB_URI"
SKIP_REASON = "mongod not on PATH and TETHER_TEST_MONGODB_URI not set"

_replica_set: ReplicaSet | None = None


def real_mongodb_uri(config: pytest.Config) -> str | None:
    """The URI of the session's real replica set (started on first use), or None."""
    global _replica_set
    if os.environ.get(ENV_URI):
        return os.environ[ENV_URI]
    if shutil.which("mongod") is None:
        return None
    if _replica_set is None:
        folder = Path(tempfile.mkdtemp(prefix="tether-mongo-"))
        rs = start_replica_set(folder, timeout_s=120.0)
        _replica_set = rs

        def stop() -> None:
            global _replica_set
            _replica_set = None
            rs.stop()
            shutil.rmtree(folder, ignore_errors=True)

        config.add_cleanup(stop)
    return _replica_set.uri


@pytest.fixture(scope="session")
def mongodb_uri(request: pytest.FixtureRequest) -> str:
    uri = real_mongodb_uri(request.config)
    if uri is None:
        pytest.skip(SKIP_REASON)
    return uri


def with_database(uri: str, database: str) -> str:
    """``uri`` with its path (the database name) replaced by ``database``.

    With credentials and no ``authSource``, the user was authenticated against the URI's
    database (or ``admin``); that stays so.
    """
    scheme, _, rest = uri.partition("://")
    location, _, query = rest.partition("?")
    hosts, _, old_database = location.partition("/")
    options = [o for o in query.split("&") if o]
    if "@" in hosts and not any(o.lower().startswith("authsource=") for o in options):
        options.append(f"authSource={old_database or 'admin'}")
    return f"{scheme}://{hosts}/{database}" + (f"?{'&'.join(options)}" if options else "")


def fresh_database_name() -> str:
    return f"tether_test_{secrets.token_hex(6)}"


def drop_database(uri: str) -> None:
    from pymongo import MongoClient

    from tether.store.mongo_uri import database_name

    client: MongoClient[dict[str, object]] = MongoClient(uri, serverSelectionTimeoutMS=10_000)
    try:
        client.drop_database(database_name(uri))
    finally:
        client.close()

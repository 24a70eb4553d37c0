"""MongoDB URIs: their options, database name and read preferences (DESIGN §6).

Pure string handling, no connection: :class:`tether.store.mongo.MongoStore` builds its client
from these, and tools (``tether mongo up``, test fixtures) read a URI's database the same way.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote

from pymongo.read_preferences import (
    Nearest,
    Primary,
    PrimaryPreferred,
    Secondary,
    SecondaryPreferred,
)

from tether.store.base import redact_uri

DEFAULT_DATABASE = "tether"
# Tether's own URI option naming the database (`--store-db`); removed before pymongo sees the URI.
DATABASE_OPTION = "tetherDb"
_BAD_DB_CHARS = '/\\. "$\x00'
# Passed to MongoClient only for options the URI leaves unset (keyword arguments would win).
DEFAULT_OPTIONS: dict[str, Any] = {
    "w": "majority",
    "wTimeoutMS": 5000,
    "readConcernLevel": "majority",
    "retryWrites": True,
    "retryReads": True,
    "serverSelectionTimeoutMS": 5000,
    "connectTimeoutMS": 5000,
    "socketTimeoutMS": 10000,
    "appname": "tether",
}
_LEGACY_TIMEOUTS = ("wtimeoutms", "sockettimeoutms")  # superseded when the URI sets timeoutMS
_READ_PREFERENCES = {
    "primary": Primary,
    "primarypreferred": PrimaryPreferred,
    "secondary": Secondary,
    "secondarypreferred": SecondaryPreferred,
    "nearest": Nearest,
}


def uri_options(uri: str) -> dict[str, str]:
    """The query options of a MongoDB URI, keys lower-cased (MongoDB options are case-blind)."""
    query = uri.partition("?")[2]
    options = {}
    for part in query.replace(";", "&").split("&"):
        if part:
            key, _, value = part.partition("=")
            options[unquote(key).lower()] = unquote(value)
    return options


def database_name(uri: str) -> str:
    """The database Tether uses: the URI's ``tetherDb`` option, else the URI's path
    (``mongodb://hosts/NAME?...``), else ``tether``.

    The option exists because the connection strings that MongoDB operators hand out end in
    ``/admin``, the authentication database, which is no place for a run's data (DESIGN §12).
    """
    if name := uri_options(uri).get(DATABASE_OPTION.lower()):
        return name
    rest = uri.partition("://")[2].partition("?")[0]
    name = unquote(rest.partition("/")[2]) if "/" in rest else ""
    return name or DEFAULT_DATABASE


def with_database(uri: str, name: str) -> str:
    """``uri`` with its ``tetherDb`` option set to ``name`` (``--store-db``); a URI's path stays
    the authentication database. Refuses a name MongoDB would not take."""
    bad = set(name) & set(_BAD_DB_CHARS)
    if not name or bad or len(name.encode()) > 63:
        raise ValueError(
            f"--store-db {name!r} is not a MongoDB database name (1-63 bytes, none of "
            f"{_BAD_DB_CHARS!r} or spaces)"
        )
    base = pymongo_uri(uri)
    if "?" in base:
        joiner = "&"
    else:
        joiner = "?" if base.count("/") > 2 else "/?"  # mongodb://hosts -> mongodb://hosts/?...
    return f"{base}{joiner}{DATABASE_OPTION}={quote(name)}"


def pymongo_uri(uri: str) -> str:
    """The URI without Tether's own options, which pymongo would refuse as unknown."""
    base, sep, query = uri.partition("?")
    if not sep:
        return uri
    kept = [
        part
        for part in query.replace(";", "&").split("&")
        if part and unquote(part.partition("=")[0]).lower() != DATABASE_OPTION.lower()
    ]
    return f"{base}?{'&'.join(kept)}" if kept else base


def client_options(uri: str) -> dict[str, Any]:
    """Keyword arguments for ``MongoClient(uri, ...)``: our defaults minus what the URI sets."""
    options = uri_options(uri)
    if options.get("w") == "0":
        raise ValueError(
            f"store URI {redact_uri(uri)!r} sets w=0: unacknowledged writes cannot be fenced; "
            "use w=majority (the default) or w=1"
        )
    skip = set(options) - {DATABASE_OPTION.lower()}
    if "timeoutms" in options:
        skip.update(_LEGACY_TIMEOUTS)
    return {k: v for k, v in DEFAULT_OPTIONS.items() if k.lower() not in skip}


def read_preference_of(mode: str | Any) -> Any:
    """A pymongo read preference from its name (``secondaryPreferred``...) or as given."""
    if not isinstance(mode, str):
        return mode
    cls = _READ_PREFERENCES.get(mode.lower())
    if cls is None:
        raise ValueError(
            f"read preference must be one of primary, primaryPreferred, secondary, "
            f"secondaryPreferred, nearest; got {mode!r}"
        )
    return cls()

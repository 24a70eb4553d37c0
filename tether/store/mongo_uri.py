"""MongoDB URIs: their options, database name and read preferences (DESIGN §6).

Pure string handling, no connection: :class:`tether.store.mongo.MongoStore` builds its client
from these, and tools (``tether mongo up``, test fixtures) read a URI's database the same way.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from pymongo.read_preferences import (
    Nearest,
    Primary,
    PrimaryPreferred,
    Secondary,
    SecondaryPreferred,
)

from tether.store.base import redact_uri

DEFAULT_DATABASE = "tether"
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
    """The database named by the URI's path (``mongodb://hosts/NAME?...``), else ``tether``."""
    rest = uri.partition("://")[2].partition("?")[0]
    name = unquote(rest.partition("/")[2]) if "/" in rest else ""
    return name or DEFAULT_DATABASE


def client_options(uri: str) -> dict[str, Any]:
    """Keyword arguments for ``MongoClient(uri, ...)``: our defaults minus what the URI sets."""
    options = uri_options(uri)
    if options.get("w") == "0":
        raise ValueError(
            f"store URI {redact_uri(uri)!r} sets w=0: unacknowledged writes cannot be fenced; "
            "use w=majority (the default) or w=1"
        )
    skip = set(options)
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

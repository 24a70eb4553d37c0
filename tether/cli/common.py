"""What every `tether` command shares: the argument parser class, usage errors, JSON output,
and the store and member options every member reads from flags or the environment."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from typing import Any, NoReturn

from tether.exitcodes import EXIT_USAGE

# Where a member's id comes from when no flag gives it, in this order (DESIGN §12): Tether's own
# variable, then what a Kubernetes Indexed Job and a Slurm step set.
MEMBER_ID_VARIABLES = ("TETHER_MEMBER_ID", "JOB_COMPLETION_INDEX", "SLURM_PROCID")


class UsageError(Exception):
    """Bad command line or config: reported as one sentence with exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def add_store_run(p: argparse.ArgumentParser, required: bool = True, run: bool = True) -> None:
    """`--store`, `--store-db` and `--run`, each defaulting to its environment variable
    (`TETHER_STORE`, `TETHER_STORE_DB`, `TETHER_RUN`), so a scheduler can set them once."""
    env = os.environ
    p.add_argument(
        "--store",
        default=env.get("TETHER_STORE"),
        required=required and not env.get("TETHER_STORE"),
        help="store URI, e.g. sqlite:///runs/x/tether.db or mongodb://h1,h2/?replicaSet=rs "
        "(env TETHER_STORE)",
    )
    p.add_argument(
        "--store-db",
        default=env.get("TETHER_STORE_DB") or None,
        metavar="NAME",
        help="MongoDB database for Tether's data when the URI's path is the authentication "
        "database, as in the /admin URIs that operators hand out (env TETHER_STORE_DB; the URI "
        "option tetherDb=NAME does the same; default: the URI's path, else tether)",
    )
    if run:
        p.add_argument(
            "--run",
            default=env.get("TETHER_RUN"),
            required=required and not env.get("TETHER_RUN"),
            help="run id (env TETHER_RUN)",
        )


def store_uri(args: argparse.Namespace) -> str | None:
    """The store URI the command was given, with `--store-db` folded into it (the URI is what
    members pass on, so the database travels with it)."""
    uri: str | None = args.store
    name: str | None = getattr(args, "store_db", None)
    if uri is None or not name:
        return uri
    if not uri.lower().startswith(("mongodb://", "mongodb+srv://")):
        raise UsageError("--store-db names a MongoDB database; this store is not MongoDB")
    from tether.store.mongo_uri import with_database

    try:
        return with_database(uri, name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def required_store_uri(args: argparse.Namespace) -> str:
    uri = store_uri(args)
    if not uri:
        raise UsageError("give --store URI or set TETHER_STORE")
    return uri


def member_id(flag: int | None, flag_name: str, env: Mapping[str, str] = os.environ) -> int:
    """The member's id: the flag, else the first of `MEMBER_ID_VARIABLES` that is set."""
    if flag is not None:
        return flag
    for name in MEMBER_ID_VARIABLES:
        text = env.get(name, "").strip()
        if not text:
            continue
        if not text.isdigit():
            raise UsageError(f"{name}={text!r} is not a member id (a non-negative integer)")
        return int(text)
    raise UsageError(f"give {flag_name} N, or set one of {', '.join(MEMBER_ID_VARIABLES)}")


def emit_json(obj: dict[str, Any]) -> None:
    """`--json`: exactly one JSON object, the last line of stdout (DESIGN §9)."""
    print(json.dumps(obj, sort_keys=True), flush=True)


def add_tls_flags(p: argparse.ArgumentParser, what: str) -> None:
    """`--tls-cert`, `--tls-key`, `--tls-ca` (DESIGN §13), each defaulting to its environment
    variable (`TETHER_TLS_CERT`, ...) as a Kubernetes Secret mounted as files would set them."""
    env = os.environ
    for name, help_text in (
        ("cert", "PEM certificate chain: serve and call with TLS"),
        ("key", "PEM private key of --tls-cert"),
        ("ca", "PEM CA bundle: TLS becomes mutual (clients must present a certificate signed "
         "by it) and clients verify servers against it"),
        ("server-name", "the name clients check the shards' certificates against instead of "
         "the address they dial (pods: one name every member's certificate carries)"),
    ):  # fmt: skip
        p.add_argument(
            f"--tls-{name}",
            default=env.get(f"TETHER_TLS_{name.upper().replace('-', '_')}") or None,
            metavar="NAME" if name == "server-name" else "FILE",
            help=f"{help_text}; {what} (env TETHER_TLS_{name.upper().replace('-', '_')})",
        )


def tls_paths(args: argparse.Namespace) -> dict[str, str]:
    """The `--tls-*` flags as absolute paths (members may run in another directory), keyed as
    the run config stores them; {} when none is given."""
    given = {
        f"tls_{name}": os.path.abspath(path)
        for name in ("cert", "key", "ca")
        if (path := getattr(args, f"tls_{name}", None))
    }
    if getattr(args, "tls_server_name", None):
        given["tls_server_name"] = args.tls_server_name
    return given


def add_metrics_port(p: argparse.ArgumentParser) -> None:
    """`--metrics-port`: serve Prometheus metrics (DESIGN §13); off unless given."""

    def port(text: str) -> int:
        value = int(text)
        if not 0 <= value <= 65535:
            raise argparse.ArgumentTypeError(f"a port is 0..65535, not {value}")
        return value

    p.add_argument(
        "--metrics-port",
        type=port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics, HOST the --listen host; 0 "
        "picks a free port; the URL is published in the store (off)",
    )

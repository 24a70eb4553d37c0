"""`tether certs create DIR`: a CA and a member certificate for TLS (DESIGN §13)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tether.cli.common import emit_json
from tether.exitcodes import EXIT_OK


def add_parser(sub: Any) -> None:
    certs = sub.add_parser("certs", help="make TLS certificates for a quick start")
    verbs = certs.add_subparsers(dest="verb", required=True, parser_class=type(certs))
    create = verbs.add_parser(
        "create",
        help="write a CA and a member certificate signed by it into DIR",
        description="Writes DIR/ca.crt, DIR/ca.key (kept if already there), DIR/tls.crt and "
        "DIR/tls.key (keys mode 0600). The certificate serves and calls, for localhost, "
        "127.0.0.1, ::1, this host's name and --hosts.",
    )
    create.add_argument("dir", type=Path, metavar="DIR")
    create.add_argument(
        "--hosts",
        default="",
        metavar="H1,H2",
        help="more names and addresses the certificate is valid for (the hosts members "
        "advertise: pod names, node names, IPs)",
    )
    create.add_argument("--days", type=int, default=365, help="validity in days (365)")
    create.add_argument("--new-ca", action="store_true", help="make a new CA even if DIR has one")
    create.add_argument("--json", action="store_true", help="print the four paths as JSON")


def run(args: argparse.Namespace) -> int:
    from tether.devtools.certs import create_certs

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    files = create_certs(args.dir, hosts, days=args.days, reuse_ca=not args.new_ca)
    print(
        f"tether certs: wrote {files.ca}, {files.cert} and their keys; use them with\n"
        f"  --tls-cert {files.cert} --tls-key {files.key} --tls-ca {files.ca}",
        file=sys.stderr,
    )
    if args.json:
        emit_json({k: str(getattr(files, k)) for k in ("ca", "ca_key", "cert", "key")})
    return EXIT_OK

"""What every `tether` command shares: the argument parser class, usage errors, JSON output."""

from __future__ import annotations

import argparse
import json
from typing import Any, NoReturn

from tether.exitcodes import EXIT_USAGE


class UsageError(Exception):
    """Bad command line or config: reported as one sentence with exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def add_store_run(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--store", required=required, help="store URI, e.g. sqlite:///runs/x/tether.db")
    p.add_argument("--run", required=required, help="run id")


def emit_json(obj: dict[str, Any]) -> None:
    """`--json`: exactly one JSON object, the last line of stdout (DESIGN §9)."""
    print(json.dumps(obj, sort_keys=True), flush=True)

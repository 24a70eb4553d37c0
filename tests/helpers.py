"""Test helpers shared by several test modules (imported as `helpers`: tests/ is on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

RUN = "run-t"
REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    """Poll a condition with a deadline; fail the test with `what` if it never holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(0.01)

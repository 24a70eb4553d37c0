"""The code stays linted, formatted and type-checked (STYLE §11)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
        return found
    return str(path)


def test_ruff_lint_and_format():
    lint = run(tool("ruff"), "check", ".")
    assert lint.returncode == 0, lint.stdout
    fmt = run(tool("ruff"), "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout


@pytest.mark.timeout(300)
def test_mypy():
    proc = run(tool("mypy"), "consistency", "server", "worker", "tether", "chaos")
    assert proc.returncode == 0, proc.stdout

"""Process exit codes shared by every command (DESIGN §9): 0 success, 1 run failed, 2 usage."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

"""Tether: a fault-tolerant parameter server for distributed SGD.

The public surface is small: `tether.Task` and `tether.TaskContext` (the task API, DESIGN §11),
`tether.launch(task, ...)` (one run on this machine from Python; returns the summary) and
`tether.data.StoredDataset` (input data kept in the store). They are imported on first use, so
that importing any part of the package stays as cheap as that part.

The installed namespace maps the repository's top-level folders: `tether.proto` (proto/),
`tether.server` (server/), `tether.worker` (worker/), `tether.consistency` (consistency/),
`tether.chaos` (chaos/). tether/ holds the foundations (config, wire, retry, exit codes, the
store), the tasks, the member-side heartbeat, the run driver, developer tools and the command
line. The layers and what each module holds: docs/DESIGN.md §15.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Task", "TaskContext", "launch"]

if TYPE_CHECKING:
    from tether.driver.api import launch
    from tether.tasks.api import Task, TaskContext


def __getattr__(name: str) -> Any:
    if name in ("Task", "TaskContext"):
        from tether.tasks import api

        return getattr(api, name)
    if name == "launch":
        from tether.driver.api import launch

        return launch
    raise AttributeError(f"module 'tether' has no attribute {name!r}")

"""`tether.launch(task, ...)`: one run on this machine from a script or a notebook (DESIGN §11).

The same run as `tether launch`: the config is resolved once, shards and workers start as
child processes and load the task by its import spec, and the summary (`tether launch --json`'s
object) comes back as a dict. A task object is turned into its spec by finding where it is
defined, so it must live in a module or file that the children can import; a script that
launches its own task guards the call with `if __name__ == "__main__":`, because every child
imports the file.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

from tether.config import RunConfig, default_lr, default_replication, new_run_id
from tether.driver.launcher import Launcher, LaunchOptions


def spec_of(task: Any) -> str:
    """The import spec (`file.py:NAME` or `package.module:NAME`) of a task object or class."""
    if isinstance(task, str):
        return task
    # A class or factory is defined in its own module; an instance where its class is.
    owner = task if isinstance(task, type) or inspect.isroutine(task) else type(task)
    module = sys.modules.get(getattr(owner, "__module__", None) or "")
    if module is not None:
        for name, value in vars(module).items():
            if value is task and not name.startswith("__"):
                return _spec(module, name)
    raise ValueError(
        f"cannot find where the task {task!r} is defined: members are separate processes and "
        f"load the task by import path, so bind it to a name in a .py file or module "
        f"(e.g. `task = MyTask()` in my_task.py) and pass that, or pass 'my_task.py:task'."
    )


def _spec(module: Any, name: str) -> str:
    file = getattr(module, "__file__", None)
    if module.__name__ == "__main__" or module.__name__.startswith("tether_task_"):
        if not file:
            raise ValueError(
                "a task defined in an interactive session cannot be loaded by the members: "
                "define it in a .py file and pass 'file.py:NAME'."
            )
        return f"{Path(file).resolve()}:{name}"
    return f"{module.__name__}:{name}"


def prepare(config: RunConfig) -> RunConfig:
    """The config a run is created with: the task resolved (`resolve_config`) and the shards'
    optimizer checked to be elementwise, so a bad one is refused before anything starts
    (DESIGN §4, §10) rather than by every shard."""
    from tether.server.elementwise import check_elementwise
    from tether.tasks.build import resolve_config, task_optimizer

    config = resolve_config(config)
    own = task_optimizer(config)
    if own is not None:
        check_elementwise(own, f"the task's optimizer() ({config.task})")
    else:
        check_elementwise(config.optimizer_config.transformation(), f"optimizer {config.optimizer}")
    return config


def launch(
    task: Any = None,
    *,
    run_dir: str | Path | None = None,
    store: str | None = None,
    export: str | Path | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Train `task` (a task object, its class, or an import spec; None = the built-in MLP on
    digits) and return the run summary. `settings` are `RunConfig` fields (`shards`, `workers`,
    `mode`, `staleness`, `steps`, `batch_size`, `optimizer`, `lr`, `seed`, `replication`, ...);
    replication defaults to sync for BSP and async otherwise, as on the command line.

    Raises ValueError for a bad setting (nothing started) and `RunFailed` if the run fails.
    """
    from tether.store import default_store_uri

    if "run_id" in settings:
        raise ValueError("launch makes its own run id; pass run_dir to choose where it goes.")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"launch got unknown settings {', '.join(unknown)}: see tether.RunConfig.")
    if task is not None:
        settings["task"] = spec_of(task)
    settings.setdefault("lr", default_lr(settings.get("optimizer", "adam")))
    settings.setdefault("replication", default_replication(settings.get("mode", "bsp")))
    config = prepare(RunConfig(run_id=new_run_id(), **settings))
    folder = Path(run_dir) if run_dir is not None else Path("runs") / config.run_id
    folder = folder.resolve()
    opts = LaunchOptions(
        config=config,
        run_dir=folder,
        store_uri=store or default_store_uri(folder),
        export=Path(export) if export is not None else None,
    )
    return Launcher(opts).run().to_json()

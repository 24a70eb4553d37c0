"""The one door into a run: `new_run(...)` makes its config, `run(config, spawner, hooks)` runs it.

Every way of starting a run goes through this pair, so all of them get the same defaults and the
same checks: the command line (`tether launch`, `tether run create`), `tether.launch` from Python,
chaos scenarios and soaks, the consistency experiments and the benchmarks.

- `new_run(task, **settings)`: the settings by their stored names (`tether.config.SETTINGS`,
  which follow the command line's flags), the product's defaults for the rest (`RunConfig.of`),
  then the checks that need the task: its spec made absolute, its parameters counted
  (`resolve_config`), and the shards' optimizer (the task's own or `--optimizer`) checked to be
  elementwise, so that a bad one is refused before anything starts (DESIGN §4, §10) rather than
  by every shard.
- `run(config, spawner, hooks)`: the driver (`Launcher`) over that config, to the summary. What a
  harness adds (fault-proxy routes, periodic evaluation, access to the running driver) are
  `RunHooks`.

`tether.launch(task, **settings)` is the two in one call, returning the summary as a dict
(DESIGN §11). A task object is turned into its spec by finding where it is defined, so it must
live in a module or file that the children can import; a script that launches its own task
guards the call with `if __name__ == "__main__":`, because every child imports the file.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tether.config import SETTINGS, RunConfig, new_run_id
from tether.driver.launcher import Launcher, LaunchOptions
from tether.driver.spawner import Spawner
from tether.driver.summary import RunSummary
from tether.store import Member


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


def new_run(task: Any = None, *, run_id: str | None = None, **settings: Any) -> RunConfig:
    """A new run's config, built and checked (nothing is started): `task` is a task object, its
    class or its import spec (None: `settings` may name one as `task`, else the built-in model on
    its data set); `settings` are named as the store keeps them (`tether.config.SETTINGS`).
    A new run id unless `run_id` is given. ValueError, one sentence, for a bad setting."""
    unknown = sorted(set(settings) - set(SETTINGS) - {"run_id"})
    if unknown:
        raise ValueError(
            f"unknown settings {', '.join(unknown)}: a run takes {', '.join(SETTINGS[1:])}."
        )
    if task is not None:
        settings["task"] = spec_of(task)
    return check(RunConfig.of(run_id or new_run_id(), **settings))


def check(config: RunConfig) -> RunConfig:
    """The config a run is created with: the task resolved (`resolve_config`: an absolute spec,
    the parameter count, the built-in data set's sizes) and the shards' optimizer checked to be
    elementwise. A `vector:N` model is a bare vector of N parameters with no task: shards alone,
    for `tether bench pushpull`."""
    from tether.server.elementwise import check_elementwise
    from tether.tasks.build import resolve_config, task_optimizer

    if config.model.startswith("vector:") and not config.task:
        size = int(config.model.partition(":")[2])
        config, own = config.with_task(dataset="none", num_params=size), None
    else:
        config = resolve_config(config)
        own = task_optimizer(config)
    if own is not None:
        check_elementwise(own, f"the task's optimizer() ({config.task})")
    else:
        check_elementwise(config.optimizer_config.transformation(), f"optimizer {config.optimizer}")
    return config


@dataclass(frozen=True, slots=True)
class RunHooks:
    """What a harness adds to a run beside its config."""

    # worker id -> shard id -> the address that worker dials for that shard (a fault proxy)
    routes: dict[int, dict[int, str]] = field(default_factory=dict)
    # Called with the registered shards before any worker starts (a chaos run points its
    # proxies at them, so that no worker ever dials a link that leads nowhere).
    before_workers: Callable[[list[Member]], None] | None = None
    # Evaluate the shards' parameters every this many seconds into the `eval` metrics (DESIGN §8)
    eval_interval_s: float | None = None
    # Called with the driver before it starts: a chaos timeline signals and replaces members
    # through it, `tether bench train` samples its children's CPU time.
    on_start: Callable[[Launcher], None] | None = None
    # Serve the driver's Prometheus metrics on this port (0: a free one) and every member's on a
    # free one (DESIGN §13); None: no metrics.
    metrics_port: int | None = None


def run(
    config: RunConfig,
    spawner: Spawner | None = None,
    hooks: RunHooks | None = None,
    *,
    run_dir: str | Path | None = None,
    store: str | None = None,
    export: str | Path | None = None,
    err: TextIO | None = None,
) -> RunSummary:
    """Run `config` to its end and return its summary: members started by `spawner` (child
    processes of this one by default), the run's folder `run_dir` (default runs/<run id>), its
    store `store` (default the SQLite file in that folder), the final parameters written to
    `export` if given, progress on `err` (stderr). Raises `RunFailed` if the run fails."""
    from tether.store import default_store_uri

    hooks = hooks or RunHooks()
    folder = Path(run_dir) if run_dir is not None else (Path("runs") / config.run_id).resolve()
    opts = LaunchOptions(
        config=config,
        run_dir=folder,
        store_uri=store or default_store_uri(folder),
        export=Path(export) if export is not None else None,
        routes=hooks.routes,
        eval_interval_s=hooks.eval_interval_s,
        before_workers=hooks.before_workers,
        metrics_port=hooks.metrics_port,
    )
    launcher = Launcher(opts, err=err or sys.stderr, spawner=spawner)
    if hooks.on_start is not None:
        hooks.on_start(launcher)
    return launcher.run()


def launch(
    task: Any = None,
    *,
    run_dir: str | Path | None = None,
    store: str | None = None,
    export: str | Path | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Train `task` (a task object, its class, or an import spec; None = the built-in MLP on
    digits) and return the run summary. `settings` are a run's settings as the store keeps them
    (`shards`, `workers`, `mode`, `staleness`, `steps`, `batch_size`, `optimizer`, `lr`, `seed`,
    `replication`, ...: `tether.config.SETTINGS`), with `tether launch`'s defaults (replication
    sync for BSP and async otherwise, the learning rate of the optimizer named).

    Raises ValueError for a bad setting (nothing started) and `RunFailed` if the run fails.
    """
    if "run_id" in settings:
        raise ValueError("launch makes its own run id; pass run_dir to choose where it goes.")
    config = new_run(task, **settings)
    folder = Path(run_dir).resolve() if run_dir is not None else None
    return run(config, run_dir=folder, store=store, export=export).to_json()

"""The one place a run's task is built from its config (DESIGN §11).

A run trains either a user's task (`config.task`, an import spec) or the built-in classifier of
`config.model` on `config.dataset`; both are task objects behind the same `TaskRuntime`. The
driver resolves a config once (`resolve_config`: the spec made absolute, the parameter count,
the built-in data set's sizes), and every member rebuilds the same task from the resolved config
in its own process. JAX is imported here only when a task is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tether.config import RunConfig
from tether.roles import TaskRole
from tether.tasks.api import TaskContext

if TYPE_CHECKING:
    from tether.tasks.runtime import TaskRuntime


def task_of(config: RunConfig) -> Any:
    """The run's task object: the user's, loaded by its spec, or the built-in classifier."""
    if config.task:
        from tether.tasks.load import load_task

        return load_task(config.task)
    from tether.tasks.builtin import Classifier
    from tether.tasks.models import parse_model

    return Classifier(parse_model(config.model), config.dataset, config.in_dim, config.num_classes)


def runtime_of(config: RunConfig, device: str | None = None) -> TaskRuntime:
    """The run's task in this process, on `device` (the run's own device by default)."""
    from tether.tasks.runtime import TaskRuntime

    device = config.device if device is None else device
    runtime = TaskRuntime(task_of(config), device, name=config.task)
    if config.num_params and runtime.num_params != config.num_params:
        raise ValueError(
            f"the task has {runtime.num_params} parameters in this process but the run expects "
            f"{config.num_params}: every member must load the same task"
        )
    return runtime


def task_optimizer(config: RunConfig) -> Any:
    """The optax transformation the run's task names for the shards (`task.optimizer()`), or
    None: then the shards build `--optimizer` (DESIGN §4, §11)."""
    if not config.task:
        return None
    make = getattr(task_of(config), "optimizer", None)
    return make() if make is not None else None


def own_optimizer_name(config: RunConfig) -> str | None:
    """How the start line and the summary name the shards' optimizer when it is the task's own
    (`task_optimizer`), or None: then it is `--optimizer` with its learning rate."""
    if task_optimizer(config) is None:
        return None
    return f"task optimizer (from {config.task}.optimizer())"


def context_of(
    config: RunConfig, role: TaskRole, worker_id: int = 0, store_uri: str = ""
) -> TaskContext:
    return TaskContext(
        seed=config.seed,
        worker_id=worker_id,
        num_workers=config.workers,
        batch_size=config.batch_size,
        steps=config.steps,
        role=role,
        run_id=config.run_id,
        store_uri=store_uri,
        device=config.device,
    )


def resolve_config(config: RunConfig) -> RunConfig:
    """Validate the task and fill in what members need before the run starts: an absolute task
    spec (members may start in another folder), the parameter count, and for the built-in
    classifier the data set's sizes."""
    from tether.tasks.runtime import TaskRuntime

    if config.task:
        from tether.tasks.load import absolute_spec, load_task

        spec = absolute_spec(config.task)
        runtime = TaskRuntime(load_task(spec), config.device, name=spec)
        resolved = config.with_task(spec=spec, model="", dataset="")
    else:
        from tether.tasks.builtin import Classifier

        task = Classifier.named(config.model, config.dataset)
        runtime = TaskRuntime(task, config.device)
        resolved = config.with_task(
            model=task.spec.describe(),
            in_dim=task.sizes[0],
            num_classes=task.sizes[-1],
        )
    if config.shards > runtime.num_params:
        raise ValueError(f"--shards {config.shards} exceeds the {runtime.num_params} parameters")
    return resolved.with_task(num_params=runtime.num_params)

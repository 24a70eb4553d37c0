"""The one place a run's model and data are built from its config.

The driver resolves a config once (`resolve_config`: the data set's and model's sizes), and every
member rebuilds the same model from the resolved config in its own process: shards for the
initial parameters (`build_model_of`, no data needed), workers and evaluators for the model and
its data (`build_task`). JAX is imported here only when a model is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tether.config import RunConfig
from tether.tasks.data import Dataset, load_dataset

if TYPE_CHECKING:
    from tether.tasks.models import Model


@dataclass(frozen=True, slots=True)
class RunTask:
    model: Model
    data: Dataset


def build_model_of(config: RunConfig, device: str = "cpu") -> Model:
    """The run's model, from a resolved config (its input and class counts are filled in)."""
    from tether.tasks.models import build_model, parse_model

    return build_model(parse_model(config.model), config.in_dim, config.num_classes, device=device)


def build_task(config: RunConfig, device: str = "cpu") -> RunTask:
    """The run's model and its data set (the model is sized by the data set itself)."""
    from tether.tasks.models import build_model, parse_model

    data = load_dataset(config.dataset)
    model = build_model(parse_model(config.model), data.in_dim, data.num_classes, device=device)
    return RunTask(model, data)


def resolve_config(config: RunConfig) -> RunConfig:
    """Fill in the data set's and model's sizes (and validate both names) before the run starts."""
    task = build_task(config, device=config.device)
    model, data = task.model, task.data
    if config.shards > model.num_params:
        raise ValueError(f"--shards {config.shards} exceeds the {model.num_params} parameters")
    return dataclasses.replace(
        config,
        model=model.spec.describe(),
        num_params=model.num_params,
        in_dim=data.in_dim,
        num_classes=data.num_classes,
    )

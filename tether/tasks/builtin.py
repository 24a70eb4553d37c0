"""The built-in classifiers (`--model logreg|mlp:...` on `--dataset digits|synthetic...`) as
tasks, so they reach shards and workers through the same path as a user's task (DESIGN §11).

The parameter tree is `models.Params` (one (weights, bias) pair per layer), so the flat order
is w0, b0, w1, b1, ...; the batch for clock c is the slice of this worker's partition that
`batch_indices(seed, worker id, c)` selects (DESIGN §3, §5).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tether.data.batches import batch_indices, partition
from tether.data.builtin import Dataset, load_dataset
from tether.tasks.api import Task, TaskContext
from tether.tasks.models import (
    ModelSpec,
    Params,
    cross_entropy,
    init_params,
    layer_sizes,
    logits,
    mean_cross_entropy,
    parse_model,
)
from tether.tasks.runtime import TaskRuntime


@functools.cache
def _jitted_init(sizes: tuple[int, ...]) -> Any:
    # One program for the whole init: op-by-op it compiles each primitive on first use (about
    # 1 s in all), and classifiers of the same sizes share it.
    return jax.jit(functools.partial(init_params, sizes))


@jax.jit
def _scores(params: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    out = logits(params, x)
    return mean_cross_entropy(out, y), jnp.mean(jnp.argmax(out, axis=1) == y)


class Classifier(Task):
    """A `ModelSpec` network on a named data set. The data set loads on first use: shards size
    and initialise the model from `in_dim` and `num_classes` alone."""

    def __init__(self, spec: ModelSpec, dataset: str, in_dim: int, num_classes: int) -> None:
        if in_dim < 1 or num_classes < 2:
            raise ValueError(f"need in_dim >= 1 and num_classes >= 2, got {in_dim}, {num_classes}.")
        self.spec, self.dataset = spec, dataset
        self.sizes = layer_sizes(spec, in_dim, num_classes)
        self._data: Dataset | None = None

    @classmethod
    def named(cls, model: str, dataset: str) -> Classifier:
        """The classifier for `--model` on `--dataset`, sized by loading the data set."""
        data = load_dataset(dataset)
        task = cls(parse_model(model), dataset, data.in_dim, data.num_classes)
        task._data = data
        return task

    @property
    def data(self) -> Dataset:
        if self._data is None:
            self._data = load_dataset(self.dataset)
        return self._data

    def init(self, key: Any) -> Params:
        return _jitted_init(self.sizes)(key)

    def loss(self, params: Params, batch: tuple[Any, Any]) -> jax.Array:
        x, y = batch
        return cross_entropy(params, x, y)

    def batch(self, ctx: TaskContext, clock: int) -> tuple[np.ndarray, np.ndarray]:
        data = self.data
        part = partition(len(data.y_train), ctx.num_workers, ctx.worker_id)
        idx = batch_indices(part, ctx.batch_size, ctx.seed, ctx.worker_id, clock)
        return data.x_train[idx], data.y_train[idx]

    def scores(self, params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) over the whole of (x, y)."""
        loss, accuracy = _scores(params, x, y)
        return float(loss), float(accuracy)

    def evaluate(self, params: Params, ctx: TaskContext) -> dict[str, float]:
        """Training loss and accuracy (what `final_loss` has always meant) and test accuracy."""
        del ctx
        data = self.data
        loss, accuracy = self.scores(params, data.x_train, data.y_train)
        _, test_accuracy = self.scores(params, data.x_test, data.y_test)
        return {"loss": loss, "accuracy": accuracy, "test_accuracy": test_accuracy}


class Model:
    """A built-in classifier on one device with a flat-vector interface, for tests, benchmarks
    and the driver's evaluation: the worker's step (`TaskRuntime.step`) behind numpy in, numpy
    out."""

    __slots__ = ("task", "runtime", "spec", "in_dim", "num_classes", "num_params", "device")

    def __init__(self, spec: ModelSpec, in_dim: int, num_classes: int, device: str = "cpu") -> None:
        self.task = Classifier(spec, "", in_dim, num_classes)
        self.runtime = TaskRuntime(self.task, device)
        self.spec, self.in_dim, self.num_classes = spec, in_dim, num_classes
        self.num_params = self.runtime.num_params
        self.device = self.runtime.device

    def __repr__(self) -> str:
        return (
            f"Model({self.spec.describe()!r}, in_dim={self.in_dim}, "
            f"num_classes={self.num_classes}, num_params={self.num_params}, device={self.device})"
        )

    def init_flat(self, seed: int) -> np.ndarray:
        """The initial flat params for `seed`: a fresh, writable float32 numpy vector."""
        return self.runtime.init_flat(seed)

    def unravel(self, flat: np.ndarray) -> Params:
        """The params tree of a flat vector, as views of it."""
        return self.runtime.layout.views(self._check_flat(flat))  # type: ignore[no-any-return]

    def loss_and_grad(
        self, flat: np.ndarray, x: np.ndarray, y: np.ndarray
    ) -> tuple[float, np.ndarray]:
        """Mean cross-entropy on (x, y) and its gradient, flat in `init_flat`'s order (a fresh,
        writable copy). Deterministic: equal inputs give bit-identical outputs."""
        step = self.runtime.step(self._check_flat(flat), self._check_batch(x, y))
        return step.loss, step.grad.to_array()

    def evaluate(self, flat: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) over the whole of (x, y)."""
        x, y = self._check_batch(x, y)
        params = jax.device_put(self.unravel(flat), self.device)
        return self.task.scores(params, *jax.device_put((x, y), self.device))

    def _check_flat(self, flat: np.ndarray) -> np.ndarray:
        flat = np.asarray(flat, dtype=np.float32)
        if flat.shape != (self.num_params,):
            raise ValueError(
                f"expected a flat vector of {self.num_params} params, got {flat.shape}."
            )
        return flat

    def _check_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # asarray is free for inputs already in the right dtype; it only guards against a
        # float64 or int64 batch triggering a second compilation.
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.int32)
        if x.ndim != 2 or x.shape[1] != self.in_dim or y.shape != (x.shape[0],) or not len(y):
            raise ValueError(
                f"expected x of shape (batch, {self.in_dim}) and y of shape (batch,) with "
                f"batch >= 1, got {x.shape} and {y.shape}."
            )
        # A label out of range would silently add nothing to the loss; O(batch) to rule out.
        if y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got {y.min()}..{y.max()}."
            )
        return x, y


def build_model(spec: ModelSpec, in_dim: int, num_classes: int, device: str = "cpu") -> Model:
    """Build `spec` for inputs of `in_dim` features on the first JAX device of kind `device`."""
    return Model(spec, in_dim, num_classes, device)

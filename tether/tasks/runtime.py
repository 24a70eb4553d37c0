"""A task in one process: its flat layout, initial vector and gradient step (DESIGN §2, §11).

The wire carries one float32 vector: the pytree's leaves in `jax.tree_util` order, each raveled.
`Layout` maps between that vector and the tree *without copying*: the tree a worker hands to the
user's loss is made of numpy views of the buffer its pulls landed in, and the gradient's leaves
are pushed as XLA left them, in the same flat order (`tether.wire.Pieces`), with no joining
copy: the worker holds one copy of the parameters and one of the gradient. The gradient is taken
with respect to the tree itself, never through an unravel of the flat vector: the transpose of an
unravel (a pad and scatter into a zero vector per leaf) cost 2-10x the model's own gradient step
on CPU, which is what made the worker slower than the model it trains.
"""

from __future__ import annotations

import math
import os
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tether.config import DEVICES
from tether.tasks.api import TaskContext
from tether.wire import FLOAT, Pieces, aligned_empty


@dataclass(frozen=True, slots=True)
class Leaf:
    path: str  # jax.tree_util.keystr of the leaf, e.g. "['dense']['kernel']"
    shape: tuple[int, ...]
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each leaf of the parameter tree lives in the flat vector."""

    treedef: Any
    leaves: tuple[Leaf, ...]
    num_params: int

    @classmethod
    def of(cls, tree: Any, what: str = "init(key)") -> Layout:
        """The layout of a tree of arrays or `jax.ShapeDtypeStruct`s; ValueError naming the
        first leaf that is not a float32 array."""
        pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
        if not pairs:
            raise ValueError(f"{what} returned no arrays: a task needs at least one parameter.")
        leaves, offset = [], 0
        for path, leaf in pairs:
            name = jax.tree_util.keystr(path) or "the root"
            dtype = getattr(leaf, "dtype", None)
            shape = getattr(leaf, "shape", None)
            if dtype is None or shape is None:
                raise ValueError(
                    f"{what}: parameter {name} is a {type(leaf).__name__}, not an array; "
                    f"parameters must be float32 arrays (keep other values out of the tree)."
                )
            dtype = np.dtype(dtype)
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(
                    f"{what}: parameter {name} has dtype {dtype}; parameters must be float arrays "
                    f"(keep integer and boolean state out of the parameter tree)."
                )
            if dtype != np.float32:
                raise ValueError(
                    f"{what}: parameter {name} is {dtype}, and the wire carries float32 only; "
                    f"cast it in init, e.g. jax.tree.map(lambda a: a.astype(jnp.float32), params)."
                )
            size = math.prod(shape)
            leaves.append(Leaf(name, tuple(int(d) for d in shape), offset, size))
            offset += size
        return cls(treedef, tuple(leaves), offset)

    def views(self, flat: np.ndarray) -> Any:
        """The parameter tree as views of `flat` (no copy): writes to `flat` show through."""
        if flat.shape != (self.num_params,):
            raise ValueError(
                f"expected a flat vector of {self.num_params} params, got shape {flat.shape}."
            )
        parts = [flat[x.offset : x.offset + x.size].reshape(x.shape) for x in self.leaves]
        return jax.tree_util.tree_unflatten(self.treedef, parts)

    def write(self, tree: Any, out: np.ndarray, lo: int = 0, hi: int | None = None) -> None:
        """Copy the leaves of `tree` that overlap [lo, hi) of the flat vector into `out`, the
        buffer of that range (so a shard fills only its own slice)."""
        leaves = jax.tree_util.tree_leaves(tree)
        if len(leaves) != len(self.leaves):
            raise ValueError(f"expected {len(self.leaves)} leaves, got {len(leaves)}.")
        self.write_leaves(enumerate(leaves), out, lo, hi)

    def write_leaves(
        self, leaves: Iterable[tuple[int, Any]], out: np.ndarray, lo: int, hi: int | None = None
    ) -> None:
        """`write` for (leaf index, value) pairs: only the given leaves' parts in [lo, hi)."""
        hi = self.num_params if hi is None else hi
        for j, value in leaves:
            x = self.leaves[j]
            a, b = max(x.offset, lo), min(x.offset + x.size, hi)
            if a < b:
                # np.asarray of a CPU jax array is a view; ravel of a contiguous array too.
                src = np.asarray(value, dtype=FLOAT).reshape(-1)
                out[a - lo : b - lo] = src[a - x.offset : b - x.offset]


@dataclass(frozen=True, slots=True)
class Step:
    loss: float
    metrics: dict[str, float]
    grad: Pieces  # the gradient leaves in flat order, as XLA left them (read-only views)


def resolve_device(device: str) -> jax.Device:
    """The first JAX device of kind 'cpu', 'gpu' or 'tpu'; ValueError if there is none."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected one of {', '.join(DEVICES)}.")
    try:
        return jax.devices(device)[0]
    except RuntimeError:
        available = ", ".join(sorted({d.platform for d in jax.devices()}))
        raise ValueError(
            f"no {device} device is available to JAX: this process sees only {available}, "
            f"so install JAX's {device} support or choose another device."
        ) from None


def _cpu() -> jax.Device:
    return jax.devices("cpu")[0]


# What JAX raises when traced code makes a Python or numpy value of an abstract array.
_TRACER_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
)
# Frames in these files are Tether's, JAX's or numpy's, not the user's.
_NOT_THE_USERS = (str(Path(__file__).resolve()),) + tuple(
    str(Path(m.__file__).resolve().parent) + os.sep for m in (jax, np) if m.__file__
)


def _untraceable_init(task: Any, name: str, error: Exception) -> ValueError:
    """One sentence naming the task and its ``init``, then the user's own frames and JAX's
    message: ``init`` is traced (DESIGN §11), so it must not make a Python value of its key."""
    who = f"task {name}: " if name else ""
    sentence = (
        f"{who}{type(task).__name__}.init(key) is traced: Tether calls it under jax.eval_shape "
        "and jax.jit, so its key is an abstract array, and init must not turn the key, or anything "
        "computed from it, into a Python or numpy value (int(), float(), bool(), .item(), "
        "np.asarray(), an if on it); split the key and draw with jax.random instead"
    )
    frames = traceback.extract_tb(error.__traceback__)
    theirs = [f for f in frames if not str(Path(f.filename).resolve()).startswith(_NOT_THE_USERS)]
    where = "".join(traceback.format_list(theirs)).rstrip("\n")
    said = str(error).split("\n\n")[0]  # JAX's explanation, without the link after it
    parts = (sentence, where, f"{type(error).__name__}: {said}")
    return ValueError("\n".join(part for part in parts if part))


class TaskRuntime:
    """One task in one process: layout, initial parameters, gradient step and evaluation."""

    def __init__(self, task: Any, device: str = "cpu", *, name: str = "") -> None:
        """``name``, the task's spec where it has one, goes into the messages about it."""
        self.task = task
        self.device = resolve_device(device)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32)
        with jax.default_device(_cpu()):
            try:
                shapes = jax.eval_shape(task.init, key)
            except _TRACER_ERRORS as e:
                raise _untraceable_init(task, name, e) from None
        self.layout = Layout.of(shapes)
        self.num_params = self.layout.num_params
        self._grad: Callable[..., Any] | None = None
        self._has_aux = False

    # -- initial parameters ----------------------------------------------------------------------

    def init_flat(self, seed: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Range [lo, hi) of the initial flat vector: a fresh, writable, aligned float32 array.

        `task.init(PRNGKey(seed))` runs jitted on the CPU backend (accelerators may round random
        transforms differently, and the initial vector, hence params_sha256, must not depend on
        --device), returning only the leaves that overlap the range: XLA drops the computation
        of the others, so a shard whose task draws each leaf from its own key computes and holds
        little more than its own slice. The kept leaves are computed by the same operations
        whatever the range, so every shard count yields the same bits (tested).
        """
        hi = self.num_params if hi is None else hi
        if not 0 <= lo <= hi <= self.num_params:
            raise ValueError(f"bad range [{lo}, {hi}) of {self.num_params} parameters.")
        wanted = tuple(
            j for j, x in enumerate(self.layout.leaves) if x.offset < hi and x.offset + x.size > lo
        )

        def some_leaves(key: jax.Array) -> list[jax.Array]:
            leaves = jax.tree_util.tree_leaves(self.task.init(key))
            return [leaves[j] for j in wanted]

        out = aligned_empty(hi - lo)
        with jax.default_device(_cpu()):
            got = jax.jit(some_leaves)(jax.random.PRNGKey(seed))
        self.layout.write_leaves(zip(wanted, got, strict=True), out, lo, hi)
        return out

    # -- the worker's step -----------------------------------------------------------------------

    def _compile(self, params: Any, batch: Any) -> None:
        out = jax.eval_shape(self.task.loss, params, batch)
        self._has_aux = isinstance(out, tuple)
        if self._has_aux and (len(out) != 2 or not isinstance(out[1], dict)):
            raise ValueError("task.loss must return a scalar or (scalar, {name: scalar}).")
        value = out[0] if self._has_aux else out
        if getattr(value, "shape", None) != ():
            raise ValueError(
                f"task.loss must return a scalar, got shape {getattr(value, 'shape', value)}."
            )
        self._grad = jax.jit(jax.value_and_grad(self.task.loss, has_aux=self._has_aux))

    def step(self, flat: np.ndarray, batch: Any) -> Step:
        """The loss on `batch` at the parameters in `flat`, and its gradient: the leaves in the
        flat order, pushed as they are (`tether.wire.Pieces`). Deterministic: equal inputs give
        equal bits."""
        params = self.layout.views(flat)
        if self.device.platform != "cpu":
            params, batch = jax.device_put((params, batch), self.device)
        # On CPU the numpy views go to the jitted function as they are: its argument handling
        # aliases aligned host buffers (tether.wire.aligned_empty) and is cheaper than a
        # device_put of the tree first.
        if self._grad is None:
            self._compile(params, batch)
        assert self._grad is not None
        value, grads = self._grad(params, batch)
        loss, aux = value if self._has_aux else (value, {})
        # np.asarray of a CPU result is a view of XLA's buffer (a copy to the host otherwise).
        pieces = Pieces(np.asarray(g, dtype=FLOAT) for g in jax.tree_util.tree_leaves(grads))
        if pieces.size != self.num_params:
            raise ValueError(f"the gradient has {pieces.size} elements, not {self.num_params}.")
        metrics = {str(k): float(v) for k, v in aux.items()}
        return Step(float(loss), metrics, pieces)

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, flat: np.ndarray, ctx: TaskContext) -> dict[str, float]:
        """`task.evaluate(params, ctx)` on the parameters in `flat`; {} if the task has none."""
        evaluate = getattr(self.task, "evaluate", None)
        if evaluate is None:
            return {}
        with jax.default_device(self.device):
            out = evaluate(self.layout.views(np.asarray(flat, dtype=FLOAT)), ctx)
        if not isinstance(out, dict):
            raise ValueError(f"task.evaluate must return a dict, got {type(out).__name__}.")
        return {str(k): float(v) for k, v in out.items()}

    def optimizer(self) -> Any:
        """The task's own optax transformation for the shards, or None."""
        make = getattr(self.task, "optimizer", None)
        return make() if make is not None else None

"""Models a worker trains, seen from outside as one flat float32 parameter vector.

Shards hold contiguous ranges of that vector (DESIGN §2), so everything here takes and
returns flat numpy arrays; the pytree exists only inside the jitted functions. The flat order
is `jax.flatten_util.ravel_pytree`'s order of the `Params` tree: w0, b0, w1, b1, ...
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

# One (weights (fan_in, fan_out), bias (fan_out,)) pair per dense layer, input to output.
Params = tuple[tuple[jax.Array, jax.Array], ...]

MODEL_NAMES = ("logreg", "mlp")
DEVICES = ("cpu", "gpu", "tpu")
_DEFAULT_MLP_HIDDEN = (64,)
_MODEL_RE = re.compile(r"(logreg)|(mlp)(?::([0-9]+(?:x[0-9]+)*))?")
_MODEL_FORMS = "'logreg', 'mlp', 'mlp:H' or 'mlp:H1xH2x...' (hidden widths >= 1)"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Which network to build; `describe()` is its canonical name, accepted by `parse_model`."""

    name: str
    hidden: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.name!r}: expected {_MODEL_FORMS}.")
        if self.name == "logreg" and self.hidden:
            raise ValueError(f"logreg has no hidden layers, got hidden={self.hidden}.")
        if self.name == "mlp" and (not self.hidden or any(h < 1 for h in self.hidden)):
            raise ValueError(f"mlp needs hidden widths >= 1, got hidden={self.hidden}.")

    def describe(self) -> str:
        if self.name == "logreg":
            return "logreg"
        return "mlp:" + "x".join(str(h) for h in self.hidden)


def parse_model(text: str) -> ModelSpec:
    """Parse 'logreg', 'mlp' (= 'mlp:64'), 'mlp:128' or 'mlp:256x256' into a ModelSpec."""
    match = _MODEL_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"unknown model {text!r}: expected {_MODEL_FORMS}.")
    if match.group(1):
        return ModelSpec("logreg", ())
    widths = match.group(3)
    hidden = tuple(int(w) for w in widths.split("x")) if widths else _DEFAULT_MLP_HIDDEN
    if any(h < 1 for h in hidden):
        raise ValueError(f"bad model {text!r}: expected {_MODEL_FORMS}.")
    return ModelSpec("mlp", hidden)


def layer_sizes(spec: ModelSpec, in_dim: int, num_classes: int) -> tuple[int, ...]:
    return (in_dim, *spec.hidden, num_classes)


def count_params(spec: ModelSpec, in_dim: int, num_classes: int) -> int:
    """Length of the flat vector, by arithmetic: a shard sizes its slice without building params."""
    sizes = layer_sizes(spec, in_dim, num_classes)
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in itertools.pairwise(sizes))


def init_params(sizes: tuple[int, ...], key: jax.Array) -> Params:
    """He-normal weights for ReLU layers, LeCun-normal for the output layer, zero biases."""
    shapes = list(itertools.pairwise(sizes))
    # One draw for all weights, sliced per layer: XLA compiles a single threefry kernel, where
    # a split key and a draw per layer took about 1.5 s to compile instead of 0.2 s.
    noise = jax.random.normal(key, (sum(a * b for a, b in shapes),), jnp.float32)
    layers = []
    offset = 0
    for i, (fan_in, fan_out) in enumerate(shapes):
        # Layers feeding a ReLU need twice the variance to keep activations at unit scale.
        gain = 1.0 if i == len(shapes) - 1 else 2.0
        w = noise[offset : offset + fan_in * fan_out].reshape(fan_in, fan_out)
        offset += fan_in * fan_out
        layers.append((w * math.sqrt(gain / fan_in), jnp.zeros((fan_out,), jnp.float32)))
    return tuple(layers)


def logits(params: Params, x: jax.Array) -> jax.Array:
    h = x
    for w, b in params[:-1]:
        h = jax.nn.relu(h @ w + b)
    w, b = params[-1]
    return h @ w + b


def cross_entropy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return _mean_cross_entropy(logits(params, x), y)


def _mean_cross_entropy(out: jax.Array, y: jax.Array) -> jax.Array:
    # A mean, not a sum, so that BSP's average of W workers' gradients equals the gradient of
    # one batch W times larger (DESIGN §3). Labels pick their log-probability through a
    # one-hot product rather than a gather: the gather's gradient is a scatter-add, which GPU
    # backends may run with atomics, and gradients must be bit-identical run to run.
    log_probs = jax.nn.log_softmax(out)
    picked = jnp.sum(jax.nn.one_hot(y, out.shape[-1], dtype=log_probs.dtype) * log_probs, axis=-1)
    return -jnp.mean(picked)


def _unraveler(sizes: tuple[int, ...]) -> Callable[[jax.Array], Any]:
    """`ravel_pytree`'s inverse for this model's tree, found without computing any params."""
    # ravel_pytree only hands out its unravel function next to a flattened tree. Tracing it under
    # eval_shape yields that function from shapes alone; it holds only the tree structure and
    # static sizes, so nothing traced escapes.
    found: list[Callable[[jax.Array], Any]] = []

    def flatten(params: Params) -> jax.Array:
        flat, unravel = ravel_pytree(params)
        found.append(unravel)
        return flat

    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    shapes = jax.eval_shape(functools.partial(init_params, sizes), key)
    jax.eval_shape(flatten, shapes)
    return found[0]


@functools.cache
def _flat_init(sizes: tuple[int, ...]) -> Callable[[jax.Array], jax.Array]:
    # Jitted as one program: op-by-op init compiles each primitive on first use (about 1 s in
    # all), and models of the same sizes share this one.
    return jax.jit(lambda key: ravel_pytree(init_params(sizes, key))[0])


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


class Model:
    """A network on one device, with its loss, gradient and evaluation jitted once per instance.

    All methods take and return numpy arrays in the flat layout, so callers never see pytrees.
    """

    __slots__ = (
        "spec",
        "in_dim",
        "num_classes",
        "num_params",
        "device",
        "_sizes",
        "_unravel",
        "_value_and_grad",
        "_evaluate",
    )

    def __init__(self, spec: ModelSpec, in_dim: int, num_classes: int, device: jax.Device) -> None:
        if in_dim < 1 or num_classes < 2:
            raise ValueError(f"need in_dim >= 1 and num_classes >= 2, got {in_dim}, {num_classes}.")
        self.spec = spec
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.num_params = count_params(spec, in_dim, num_classes)
        self.device = device
        self._sizes = layer_sizes(spec, in_dim, num_classes)
        self._unravel = _unraveler(self._sizes)
        unravel = self._unravel

        def flat_loss(flat: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
            return cross_entropy(unravel(flat), x, y)

        def flat_evaluate(flat: jax.Array, x: jax.Array, y: jax.Array) -> tuple[jax.Array, ...]:
            out = logits(unravel(flat), x)
            return _mean_cross_entropy(out, y), jnp.mean(jnp.argmax(out, axis=1) == y)

        # Placement follows the committed inputs (device_put below), so one jit serves any device.
        self._value_and_grad = jax.jit(jax.value_and_grad(flat_loss))
        self._evaluate = jax.jit(flat_evaluate)

    def __repr__(self) -> str:
        return (
            f"Model({self.spec.describe()!r}, in_dim={self.in_dim}, "
            f"num_classes={self.num_classes}, num_params={self.num_params}, device={self.device})"
        )

    def init_flat(self, seed: int) -> np.ndarray:
        """The initial flat params for `seed`: a fresh, writable float32 numpy vector."""
        # Always drawn on the CPU backend: accelerators may round the normal transform
        # differently, and the initial vector (hence params_sha256) must not depend on --device.
        with jax.default_device(jax.devices("cpu")[0]):
            flat = _flat_init(self._sizes)(jax.random.PRNGKey(seed))
        return np.array(flat, dtype=np.float32, copy=True)

    def unravel(self, flat: np.ndarray) -> Params:
        """The params tree of a flat vector (for inspection and tests; training stays flat)."""
        return self._unravel(jnp.asarray(self._check_flat(flat)))

    def loss_and_grad(
        self, flat: np.ndarray, x: np.ndarray, y: np.ndarray
    ) -> tuple[float, np.ndarray]:
        """Mean cross-entropy on (x, y) and its gradient, flat in `init_flat`'s order.

        Deterministic: no randomness, so equal inputs give bit-identical outputs. Each new batch
        size compiles once; keep it fixed to compile only on the first call.
        """
        args = self._put(flat, x, y)
        loss, grad = self._value_and_grad(*args)
        host = np.asarray(grad)
        # On CPU np.asarray is a read-only view of JAX's buffer; the caller may update in place.
        if not host.flags.writeable:
            host = host.copy()
        return float(loss), host

    def evaluate(self, flat: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) over the whole of (x, y)."""
        loss, accuracy = self._evaluate(*self._put(flat, x, y))
        return float(loss), float(accuracy)

    def _check_flat(self, flat: np.ndarray) -> np.ndarray:
        flat = np.asarray(flat, dtype=np.float32)
        if flat.shape != (self.num_params,):
            raise ValueError(
                f"expected a flat vector of {self.num_params} params, got {flat.shape}."
            )
        return flat

    def _put(
        self, flat: np.ndarray, x: np.ndarray, y: np.ndarray
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        flat = self._check_flat(flat)
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
        return jax.device_put((flat, x, y), self.device)


def build_model(spec: ModelSpec, in_dim: int, num_classes: int, device: str = "cpu") -> Model:
    """Build `spec` for inputs of `in_dim` features on the first JAX device of kind `device`."""
    return Model(spec, in_dim, num_classes, resolve_device(device))

"""The built-in networks: their names (`--model`), sizes, initialisation and loss.

The parameter tree is `Params`, one (weights, bias) pair per layer; its leaves in
`jax.tree_util` order (w0, b0, w1, b1, ...) are the flat vector on the wire (DESIGN §2). The
task that trains them on a data set is `builtin.Classifier`.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp

# One (weights (fan_in, fan_out), bias (fan_out,)) pair per dense layer, input to output.
Params = tuple[tuple[jax.Array, jax.Array], ...]

MODEL_NAMES = ("logreg", "mlp")
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
    return mean_cross_entropy(logits(params, x), y)


def mean_cross_entropy(out: jax.Array, y: jax.Array) -> jax.Array:
    # A mean, not a sum, so that BSP's average of W workers' gradients equals the gradient of
    # one batch W times larger (DESIGN §3). Labels pick their log-probability through a
    # one-hot product rather than a gather: the gather's gradient is a scatter-add, which GPU
    # backends may run with atomics, and gradients must be bit-identical run to run.
    log_probs = jax.nn.log_softmax(out)
    picked = jnp.sum(jax.nn.one_hot(y, out.shape[-1], dtype=log_probs.dtype) * log_probs, axis=-1)
    return -jnp.mean(picked)

"""The server-side optimizer: SGD, momentum and Adam applied in place to one shard's slice.

Shaped like optax (``base.py``/``alias.py``/``transform.py``): a `Transform` is an
``(init, update)`` pair over explicit NamedTuple state, and the optimizers a run can name are
chains of small transforms (``sgd = chain(scale(-lr))``). `Optimizer` is the one object a shard
holds; BSP, SSP and ASP all call the same `Optimizer.apply` (DESIGN §4: "one optimizer
definition, not one per mode").

Why numpy in place and not optax itself: DESIGN §4 says "use optax unless measurement shows a
numpy in-place update is needed to reach the bandwidth target". That target is a 16 MiB push at
>= 0.6x the raw gRPC byte throughput *including* the apply: a few ms for 4M floats.
``benchmarks/optimizer_apply.py`` measures both ways in one run. On a 2-core EPYC VM (4M floats,
medians) numpy in place took 1.8 / 3.8 / 9.7 ms for sgd / momentum / adam, and optax under
``jax.jit`` with the numpy<->jax conversions a shard needs took 4.6 / 6.7 / 7.5 ms: in place wins
where the conversions dominate (sgd, momentum); XLA's single fused loop beats numpy's 14 passes
for Adam. One numpy definition serves all three anyway because §4 asks for one definition, a
step allocates nothing param-sized, and bit-identity across shard counts (§3) then holds by
construction instead of by whatever kernel XLA compiles for each shard's length.

Why only + - * / and sqrt, in float32, with scalars computed once per step: DESIGN §3 requires the
shard count not to change the result at all. These IEEE operations are correctly rounded, so
numpy's SIMD loops and scalar tails give the same bits and an element's result cannot depend on
where a slice starts; transcendental ufuncs (exp, pow) carry no such guarantee. Scalars (bias
corrections) are computed in float64 from the step counter and cast to float32, so every shard
uses the same ones; ``np.float32`` scalars keep numpy from promoting to float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from tether.config import OptimizerConfig

# Elements per block in `Optimizer.apply`. Adam makes 14 passes over its buffers; in blocks of
# 128 Ki elements those passes reread data from cache instead of streaming the shard's whole
# arrays from memory 14 times, the Python cost per block (~20 us) stays a few % of the work, and
# the one temporary a step allocates is 512 KiB whatever the shard size. Blocking is exact
# because every operation is elementwise (the same argument as for shards, DESIGN §3).
CHUNK = 1 << 17

# State of a transform: a NamedTuple, or a tuple of them (`chain`), whose leaves are 1-d float32
# arrays of the shard's length (updated in place) and Python int counters.
State = Any


class Transform(NamedTuple):
    """An optax-style pair of functions, working in place.

    ``init(size)`` returns the state for a slice of ``size`` elements. ``update(updates, state)``
    transforms the float32 ``updates`` buffer IN PLACE and returns the new state; per-element
    state arrays must be updated in place and returned as the same objects, so that
    `Optimizer.apply` can run the transform block by block on views.
    """

    init: Callable[[int], State]
    update: Callable[[np.ndarray, State], State]


class EmptyState(NamedTuple):
    """State of a stateless transform."""


class TraceState(NamedTuple):
    """State of `trace`: the decayed sum of past updates."""

    trace: np.ndarray


class ScaleByAdamState(NamedTuple):
    """State of `scale_by_adam`: the step count and the first and second moments."""

    count: int  # type: ignore[assignment]  # shadows tuple.count, as in optax's state
    mu: np.ndarray
    nu: np.ndarray


def _zeros(size: int) -> np.ndarray:
    return np.zeros(size, dtype=np.float32)


def scale(step: float) -> Transform:
    """``updates = step * updates`` (optax.scale)."""
    factor = np.float32(step)

    def init(size: int) -> EmptyState:
        del size
        return EmptyState()

    def update(updates: np.ndarray, state: EmptyState) -> EmptyState:
        np.multiply(updates, factor, out=updates)
        return state

    return Transform(init, update)


def trace(decay: float) -> Transform:
    """Momentum: ``t = g + decay * t; updates = t`` (optax.trace, nesterov=False)."""
    d = np.float32(decay)

    def init(size: int) -> TraceState:
        return TraceState(trace=_zeros(size))

    def update(updates: np.ndarray, state: TraceState) -> TraceState:
        t = state.trace
        np.multiply(t, d, out=t)
        np.add(updates, t, out=t)
        np.copyto(updates, t)
        return state

    return Transform(init, update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Transform:
    """Adam's rescaling with bias correction: optax.scale_by_adam with ``eps_root=0``.

    ``mu = (1-b1) g + b1 mu``, ``nu = (1-b2) g*g + b2 nu``,
    ``updates = (mu / (1 - b1**t)) / (sqrt(nu / (1 - b2**t)) + eps)``, in optax's order of
    operations.
    """
    b1_32, b2_32, eps_32 = np.float32(b1), np.float32(b2), np.float32(eps)
    # As in optax, `1 - decay` is formed from the Python float and then rounded to float32.
    c1, c2 = np.float32(1.0 - b1), np.float32(1.0 - b2)

    def init(size: int) -> ScaleByAdamState:
        return ScaleByAdamState(count=0, mu=_zeros(size), nu=_zeros(size))

    def update(updates: np.ndarray, state: ScaleByAdamState) -> ScaleByAdamState:
        count = state.count + 1
        # float64 from the step counter, then float32: the same scalars on every shard (§3).
        bc1 = np.float32(1.0 - b1**count)
        bc2 = np.float32(1.0 - b2**count)
        mu, nu, g = state.mu, state.nu, updates
        tmp = np.empty_like(g)  # one block in Optimizer.apply, never param-sized there
        np.multiply(g, c1, out=tmp)
        np.multiply(mu, b1_32, out=mu)
        np.add(tmp, mu, out=mu)
        np.multiply(g, g, out=tmp)
        np.multiply(tmp, c2, out=tmp)
        np.multiply(nu, b2_32, out=nu)
        np.add(tmp, nu, out=nu)
        np.divide(nu, bc2, out=tmp)
        np.sqrt(tmp, out=tmp)
        np.add(tmp, eps_32, out=tmp)
        np.divide(mu, bc1, out=g)
        np.divide(g, tmp, out=g)
        return ScaleByAdamState(count=count, mu=mu, nu=nu)

    return Transform(init, update)


def chain(*transforms: Transform) -> Transform:
    """Apply ``transforms`` one after the other; the state is the tuple of their states."""

    def init(size: int) -> tuple[State, ...]:
        return tuple(t.init(size) for t in transforms)

    def update(updates: np.ndarray, state: tuple[State, ...]) -> tuple[State, ...]:
        return tuple(t.update(updates, s) for t, s in zip(transforms, state, strict=True))

    return Transform(init, update)


def build(config: OptimizerConfig) -> Transform:
    """The transform a config names, as optax.sgd / optax.adam compose theirs."""
    if config.name == "sgd":
        return chain(scale(-config.lr))
    if config.name == "momentum":
        return chain(trace(config.momentum), scale(-config.lr))
    if config.name == "adam":
        return chain(scale_by_adam(config.b1, config.b2, config.eps), scale(-config.lr))
    raise ValueError(f"unknown optimizer {config.name!r}.")  # unreachable: config validated


class Optimizer:
    """The optimizer of one shard: its transform, its state and its step count.

    Not thread-safe: the shard serialises calls (one update at a time, as its state machine does).
    """

    __slots__ = ("config", "size", "state", "step", "_transform")

    def __init__(self, config: OptimizerConfig, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
            raise ValueError(f"optimizer size must be an integer >= 0, got {size!r}.")
        self.config = config
        self.size = int(size)
        self._transform = build(config)
        self.state: State = self._transform.init(self.size)
        self.step = 0

    def apply(self, params: np.ndarray, grads: np.ndarray) -> None:
        """``params += transform(grads)`` in place; advances the step.

        ``grads`` is consumed: it is the scratch buffer and holds the applied update afterwards.
        NaN/Inf are not checked here (that is a pass over the data): the caller rejects them
        before calling, as DESIGN §10 asks, because a step cannot be undone.
        """
        _check_vector("params", params, self.size)
        _check_vector("grads", grads, self.size)
        if np.may_share_memory(params, grads):
            raise ValueError("params and grads must not share memory: grads is used as scratch.")
        update = self._transform.update
        state = self.state
        given = returned = state
        # Block by block (see CHUNK). Each block starts from the same step-t state, so counters
        # come out equal in every block; arrays are views updated in place. A 0-length shard
        # still runs one (empty) block so that its counters advance with everyone else's.
        for lo in range(0, max(self.size, 1), CHUNK):
            block = slice(lo, lo + CHUNK)
            g = grads[block]
            given = _slice_state(state, block)
            returned = update(g, given)
            p = params[block]
            np.add(p, g, out=p)
        self.state = _rebind(state, given, returned)
        self.step += 1

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Flat name -> array for replication: live float32 arrays (not copies) and counters.

        Counters (``"step"`` and e.g. Adam's ``"0.count"``) are 0-d int64 arrays. The arrays
        alias the live state: serialise them before the next `apply`.
        """
        out = {"step": np.asarray(self.step, dtype=np.int64)}
        for name, leaf in _leaves(self.state):
            out[name] = leaf if isinstance(leaf, np.ndarray) else np.asarray(leaf, dtype=np.int64)
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of `state_arrays` (values are copied in). All-or-nothing: on ValueError the
        optimizer is unchanged."""
        expected = {"step": self.step, **dict(_leaves(self.state))}
        missing = sorted(expected.keys() - arrays.keys())
        extra = sorted(arrays.keys() - expected.keys())
        if missing or extra:
            raise ValueError(
                f"{self.config.name} optimizer state does not match: missing {missing}, "
                f"unexpected {extra}."
            )
        counters: dict[str, int] = {}
        values: dict[str, np.ndarray] = {}
        for name, live in expected.items():
            given = values[name] = np.asarray(arrays[name])
            if isinstance(live, np.ndarray):
                if given.dtype != np.float32 or given.shape != live.shape:
                    raise ValueError(
                        f"optimizer state {name!r} must be float32 of shape {live.shape}, "
                        f"got {given.dtype} of shape {given.shape}."
                    )
            else:
                if given.shape != () or given.dtype.kind not in "iu" or int(given) < 0:
                    raise ValueError(
                        f"optimizer counter {name!r} must be a 0-d integer >= 0, "
                        f"got {given.dtype} of shape {given.shape}."
                    )
                counters[name] = int(given)
        for name, live in expected.items():
            if isinstance(live, np.ndarray):
                np.copyto(live, values[name])
        self.state = _map_leaves(self.state, lambda name, leaf: counters.get(name, leaf))
        self.step = counters["step"]


def _check_vector(what: str, x: np.ndarray, size: int) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape != (size,):
        got = f"{x.dtype} of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{what} must be a float32 vector of {size} elements, got {got}.")
    if not x.flags.writeable:
        raise ValueError(f"{what} must be writable: the optimizer updates it in place.")


def _names(node: tuple[Any, ...]) -> tuple[str, ...]:
    """Child names of a state node: NamedTuple fields, or positions in a `chain` tuple."""
    fields: tuple[str, ...] | None = getattr(node, "_fields", None)
    return fields if fields is not None else tuple(str(i) for i in range(len(node)))


def _rebuild(like: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    return type(like)(*items) if hasattr(like, "_fields") else tuple(items)


def _leaves(state: State, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, leaf) pairs of a state, e.g. ``("0.mu", mu)``."""
    if isinstance(state, tuple):
        for name, item in zip(_names(state), state, strict=True):
            yield from _leaves(item, f"{prefix}{name}.")
    else:
        yield prefix[:-1], state


def _map_leaves(state: State, fn: Callable[[str, Any], Any], prefix: str = "") -> State:
    """``state`` with each leaf replaced by ``fn(dotted name, leaf)``."""
    if isinstance(state, tuple):
        items = [
            _map_leaves(item, fn, f"{prefix}{name}.")
            for name, item in zip(_names(state), state, strict=True)
        ]
        return _rebuild(state, items)
    return fn(prefix[:-1], state)


def _slice_state(state: State, block: slice) -> State:
    """``state`` with its arrays replaced by views of ``block`` (counters unchanged)."""
    if isinstance(state, np.ndarray):
        return state[block]
    if isinstance(state, tuple):
        return _rebuild(state, [_slice_state(item, block) for item in state])
    return state


def _rebind(full: State, given: State, returned: State) -> State:
    """The full-size state after a blocked update: ``full``'s arrays (updated in place through
    the views in ``given``) and ``returned``'s counters."""
    if isinstance(full, np.ndarray):
        if returned is not given:
            raise TypeError("a Transform must update its state arrays in place and return them.")
        return full
    if isinstance(full, tuple):
        items = [_rebind(f, g, r) for f, g, r in zip(full, given, returned, strict=True)]
        return _rebuild(full, items)
    return returned

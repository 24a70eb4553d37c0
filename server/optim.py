"""The server-side optimizer: an optax transformation applied to one shard's slice, elementwise.

`Optimizer` is the one object a shard holds; BSP, SSP and ASP all call the same
`Optimizer.apply` (DESIGN §4: "one optimizer definition, not one per mode"). The run names the
transformation (`OptimizerConfig.transformation()`: ``optax.<name>(schedule, **args)``), or a task
supplies its own (``Optimizer(config, size, transformation=tx)``).

Why only elementwise transformations: a shard applies the optimizer to its contiguous slice of
the parameter vector alone. That equals one process applying it to the whole vector only if every
output element depends on the same element of the inputs (and on scalars such as the step count).
`check_elementwise` (server/elementwise.py) decides it from the transformation itself, by tracing
it, before a transformation is compiled here.

How a transformation runs (`_Compiled`): DESIGN §3 requires the shard count not to change the
result at all, but XLA compiles a different program for every length, splits loops across threads
and gives vector loops scalar tails, and ``exp`` or ``pow`` may round differently on those paths.
So the transformation never runs on the shard's own length: one program compiled for `BLOCK`
elements runs over the blocks ``[k*BLOCK, (k+1)*BLOCK)`` of the *run's* flat vector, padded where
the slice (at ``offset``) begins or ends inside one. Element j is then always computed at position
``j % BLOCK`` of the same program from the same inputs, whatever the shard count: bit-identity by
construction, and padding cannot leak into it because the program is elementwise. The state is
numpy arrays of the slice's length, updated block by block; nothing param-sized is allocated per
step.

Why sgd, momentum and adam run in numpy in place (`_InPlace`) instead: DESIGN §4 keeps a numpy
update where measurement shows it is needed for the bandwidth target, and it is.
``benchmarks/optimizer_apply.py`` (16 MiB = 4M float32, medians of 20, 2-core Xeon VM) measured
the compiled optax path at 12.4 / 18.6 / 24.4 ms per step for sgd / momentum / adam and numpy in
place at 2.6 / 5.0 / 12.5 ms. XLA on the CPU pays tens of microseconds per call (handing the work
to its thread pool) and copies inputs that are not 64-byte aligned, and is not faster than
numpy's loops on a block in cache. So those three rules, with the arguments numpy implements
(sgd's ``momentum``, adam's ``b1``, ``b2`` and ``eps``) and any schedule, have this one
definition: optax's formulas in optax's order of operations, in float32, with ``+ - * /`` and
``sqrt`` only. Those are correctly rounded, so numpy's SIMD loops and scalar tails give the same
bits and an element's result cannot depend on where a slice starts; scalars (bias corrections in
float64 from the step count, the schedule's value from optax's own function of the count,
compiled) are computed once per step, the same on every shard. Their state has the names optax's
has. Any other argument (``nesterov``, ``eps_root``...) or a supplied transformation takes the
compiled path.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tether.config import OptimizerConfig
from tether.server.elementwise import check_elementwise, state_name

if TYPE_CHECKING:
    import optax

# JAX and optax are imported only where a compiled transformation or a schedule needs them: a
# shard running sgd, momentum or adam at a constant rate (the numpy rules) starts without them,
# which takes a second off every shard's start and every recovery.

# Elements per block of a compiled transformation: one program of this length serves every shard.
# 128 Ki float32 is 512 KiB per array (a block's arrays stay in a core's cache) and enough work
# per call that XLA's fixed cost per call stays small.
BLOCK = 1 << 17
# Elements per block of the numpy rules: Adam's 14 passes reread a block from cache instead of
# streaming the whole slice from memory 14 times; the one temporary is 512 KiB.
CHUNK = 1 << 17
_ALIGN = 64  # bytes: XLA reads aligned numpy inputs in place and copies the others


# --- the two ways a step runs -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Layout:
    """A state's flat leaves (in `jax.tree_util` order for a transformation): their names,
    whether each is per-element (an array of the slice's length) or a scalar, and their values
    after init, a per-element leaf's as the one 0-d value all its elements start at."""

    names: tuple[str, ...]
    per_element: tuple[bool, ...]
    initial: tuple[np.ndarray, ...]


@dataclass(frozen=True, slots=True)
class _Compiled:
    """An optax transformation compiled for one block (see the module docstring)."""

    layout: _Layout
    block: int
    step: Any  # compiled: (params, grads, *leaves) -> (params, *leaves), all of `block` elements

    def run(self, opt: Optimizer, params: np.ndarray, grads: np.ndarray) -> None:
        leaves, per_element, scratch = opt._leaves, self.layout.per_element, opt._scratch
        vectors = [params, grads, *(x for x, v in zip(leaves, per_element, strict=True) if v)]
        targets = [params, *vectors[2:]]  # where the outputs go: params, per-element state
        out: Sequence[Any] = ()
        for lo, hi, at in _blocks(opt.offset, opt.size, self.block):
            if hi - lo == self.block:
                inputs = [x[lo:hi] for x in vectors]
            else:  # the slice begins or ends inside this block: pad it
                if not scratch:  # kept: a block per input, for the slice's ends
                    scratch += [_aligned(self.block, x.dtype) for x in vectors]
                for pad, x in zip(scratch, vectors, strict=True):
                    pad.fill(0)
                    pad[at : at + hi - lo] = x[lo:hi]
                inputs = scratch
            state = iter(inputs[2:])
            out = self.step(
                inputs[0],
                inputs[1],
                *(next(state) if v else x for x, v in zip(leaves, per_element, strict=True)),
            )
            outputs = [out[0], *(o for o, v in zip(out[1:], per_element, strict=True) if v)]
            for x, o in zip(targets, outputs, strict=True):
                np.copyto(x[lo:hi], np.asarray(o)[at : at + hi - lo])
        # Scalars (counts) come out the same from every block: data reaches a scalar only
        # through a reduction, and those are refused.
        for i, (o, v) in enumerate(zip(out[1:], per_element, strict=True)):
            if not v:
                leaves[i] = np.array(o)


@dataclass(frozen=True, slots=True)
class _InPlace:
    """optax.sgd (with or without momentum) or optax.adam, in numpy in place (module docstring).

    The leaves are optax's: adam's ``0.count``, ``0.mu``, ``0.nu``, sgd's ``0.trace`` with
    momentum, and the schedule's ``1.count`` when the learning rate is one.
    """

    layout: _Layout
    lr: float | Callable[[Any], Any]  # a float or the schedule, jitted
    momentum: float | None = None
    adam: tuple[float, float, float] | None = None  # b1, b2, eps

    def run(self, opt: Optimizer, params: np.ndarray, grads: np.ndarray) -> None:
        # Every operation is elementwise and correctly rounded: the offset does not matter.
        named = dict(zip(self.layout.names, opt._leaves, strict=True))
        if callable(self.lr):  # optax's scale_by_schedule: the value at the count, then count+1
            count = int(named["1.count"])
            step_size = -np.float32(np.asarray(self.lr(np.int32(count))))
            named["1.count"][...] = count + 1
        else:
            step_size = np.float32(-self.lr)
        if self.adam is not None:
            b1, b2, eps = self.adam
            count = int(named["0.count"]) + 1
            named["0.count"][...] = count
            # float64 from the step counter, then float32: the same scalars on every shard (§3).
            scalars = (np.float32(1.0 - b1**count), np.float32(1.0 - b2**count))
        scratch = np.empty(min(CHUNK, params.size), dtype=params.dtype)  # one block
        for lo in range(0, params.size, CHUNK):
            block = slice(lo, lo + CHUNK)
            # The gradient is read, never written: the shard logs it as the update (DESIGN §5).
            g = scratch[: min(CHUNK, params.size - lo)]
            np.copyto(g, grads[block])
            if self.momentum is not None:  # optax.trace: t = g + decay * t; updates = t
                t = named["0.trace"][block]
                np.multiply(t, np.float32(self.momentum), out=t)
                np.add(g, t, out=t)
                np.copyto(g, t)
            if self.adam is not None:
                _adam_block(g, named["0.mu"][block], named["0.nu"][block], self.adam, *scalars)
            np.multiply(g, step_size, out=g)
            p = params[block]
            np.add(p, g, out=p)


def _adam_block(
    g: np.ndarray,
    mu: np.ndarray,
    nu: np.ndarray,
    hyper: tuple[float, float, float],
    bc1: np.float32,
    bc2: np.float32,
) -> None:
    """optax.scale_by_adam (eps_root=0) in place on one block, in optax's order of operations:
    ``mu = (1-b1) g + b1 mu``, ``nu = (1-b2) g*g + b2 nu``, ``g = (mu/bc1) / (sqrt(nu/bc2) + eps)``.
    As in optax, ``1 - b`` is formed from the Python float, then rounded to float32."""
    b1, b2, eps = hyper
    tmp = np.empty_like(g)  # one block, never param-sized
    np.multiply(g, np.float32(1.0 - b1), out=tmp)
    np.multiply(mu, np.float32(b1), out=mu)
    np.add(tmp, mu, out=mu)
    np.multiply(g, g, out=tmp)
    np.multiply(tmp, np.float32(1.0 - b2), out=tmp)
    np.multiply(nu, np.float32(b2), out=nu)
    np.add(tmp, nu, out=nu)
    np.divide(nu, bc2, out=tmp)
    np.sqrt(tmp, out=tmp)
    np.add(tmp, np.float32(eps), out=tmp)
    np.divide(mu, bc1, out=g)
    np.divide(g, tmp, out=g)


_Engine = _Compiled | _InPlace


@functools.cache
def _cpu() -> Any:
    """The device a shard's optimizer runs on: its CPU, whatever else the machine has."""
    import jax

    return jax.devices("cpu")[0]


@functools.lru_cache(maxsize=64)
def _compiled(tx: optax.GradientTransformation, name: str, block: int) -> _Compiled:
    """Check ``tx`` and compile it for a block (cached: the shards of a run share it)."""
    import jax
    import jax.numpy as jnp
    import optax

    check_elementwise(tx, name)
    sharding = jax.sharding.SingleDeviceSharding(_cpu())
    vector = jax.ShapeDtypeStruct((block,), jnp.float32, sharding=sharding)
    paths, treedef = jax.tree_util.tree_flatten_with_path(jax.eval_shape(tx.init, vector))

    def step(params: Any, grads: Any, *leaves: Any) -> tuple[Any, ...]:
        updates, new = tx.update(grads, jax.tree_util.tree_unflatten(treedef, leaves), params)
        return (optax.apply_updates(params, updates), *jax.tree_util.tree_leaves(new))

    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for _, x in paths]
    program = jax.jit(step).lower(vector, vector, *abstract).compile()
    initial = []
    zeros = jnp.zeros(block, jnp.float32, device=_cpu())
    for value in map(np.asarray, jax.tree_util.tree_leaves(jax.jit(tx.init)(zeros))):
        if value.ndim and not np.array_equal(value, np.full_like(value, value[0]), equal_nan=True):
            raise ValueError(f"{name} initialises its state differently for each element.")
        initial.append(np.array(value[0] if value.ndim else value))
    layout = _layout(
        [state_name(path) for path, _ in paths], [x.shape != () for _, x in paths], initial
    )
    return _Compiled(layout, block, program)


def _is_transformation(tx: Any) -> bool:
    import optax

    return isinstance(tx, optax.GradientTransformation)


def _layout(names: list[str], per_element: list[bool], initial: list[np.ndarray]) -> _Layout:
    if len(set(names)) != len(names) or "step" in names:
        raise ValueError(f"optimizer state names collide: {', '.join(names)}.")
    return _Layout(tuple(names), tuple(per_element), tuple(initial))


@functools.lru_cache(maxsize=64)
def _configured(key: str, block: int) -> _Engine:
    """The engine of a config (cached: one per distinct config and block size)."""
    config = OptimizerConfig(*json.loads(key))
    name = f"optimizer {config.name}"
    return _in_place(config) or _compiled(config.transformation(), name, block)


def _key(config: OptimizerConfig) -> str:
    fields = [config.name, float(config.lr), config.args, config.schedule, config.horizon]
    return json.dumps(fields, sort_keys=True)


def _in_place(config: OptimizerConfig) -> _InPlace | None:
    """`_InPlace` for sgd, momentum and adam with arguments numpy implements; else None."""
    defaults: dict[str, dict[str, Any]] = {
        "sgd": {"momentum": None, "nesterov": False, "accumulator_dtype": None},
        "momentum": {"momentum": 0.9, "nesterov": False, "accumulator_dtype": None},
        "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 0.0, "mu_dtype": None},
    }
    if config.name not in defaults or not config.args.keys() <= defaults[config.name].keys():
        return None
    args = {**defaults[config.name], **config.args}
    numbers = [v for k, v in args.items() if k in ("momentum", "b1", "b2", "eps")]
    if any(isinstance(v, bool) or not isinstance(v, int | float | None) for v in numbers) or any(
        args.get(k) not in (None, False, 0.0)
        for k in ("nesterov", "accumulator_dtype", "eps_root", "mu_dtype")
    ):
        return None  # optax's own path, which also reports what is wrong with the values
    lr = config.learning_rate()
    names, per_element, initial = [], [], []
    if config.name == "adam":
        names, per_element = ["0.count", "0.mu", "0.nu"], [False, True, True]
        initial = [np.array(0, np.int32), np.array(0, np.float32), np.array(0, np.float32)]
    elif args["momentum"] is not None:
        names, per_element, initial = ["0.trace"], [True], [np.array(0, np.float32)]
    if callable(lr):
        names, per_element = [*names, "1.count"], [*per_element, False]
        initial = [*initial, np.array(0, np.int32)]
    momentum = None if config.name == "adam" or args["momentum"] is None else args["momentum"]
    adam = (args["b1"], args["b2"], args["eps"]) if config.name == "adam" else None
    if callable(lr):
        import jax

        rate: float | Callable[[Any], Any] = jax.jit(lr)
    else:
        rate = float(lr)
    return _InPlace(_layout(names, per_element, initial), rate, momentum, adam)


def _blocks(offset: int, size: int, block: int) -> Iterator[tuple[int, int, int]]:
    """``(lo, hi, at)``: the part ``[lo, hi)`` of a slice at ``offset`` that falls in one block
    of the run's vector, at position ``at`` of that block. A 0-length slice gets one empty
    block, so that its counters advance with everyone else's."""
    if size == 0:
        yield 0, 0, 0
        return
    for first in range(offset - offset % block, offset + size, block):
        lo, hi = max(first, offset) - offset, min(first + block, offset + size) - offset
        yield lo, hi, lo + offset - first


def _aligned(n: int, dtype: Any, fill: Any = 0) -> np.ndarray:
    """``np.full(n, fill, dtype)`` starting on an `_ALIGN`-byte boundary."""
    dtype = np.dtype(dtype)
    raw = np.empty(n * dtype.itemsize + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    out = raw[start : start + n * dtype.itemsize].view(dtype)
    out.fill(fill)
    return out


# --- the shard's optimizer --------------------------------------------------------------------


class Optimizer:
    """The optimizer of one shard: its engine (compiled transformation or numpy rule), its state
    and its step count.

    ``size`` is the shard's slice length and ``offset`` its start in the run's flat vector (the
    blocks' alignment, module docstring: every shard of a run passes its own). ``transformation``
    replaces the optimizer the config names (whose lr and schedule then go unused), e.g. a task's
    own (DESIGN §11); it must pass `check_elementwise`, or ValueError. Not thread-safe: the shard
    serialises calls (one update at a time, as its state machine does).
    """

    __slots__ = ("config", "size", "offset", "step", "_name", "_engine", "_leaves", "_scratch")

    def __init__(
        self,
        config: OptimizerConfig,
        size: int,
        *,
        offset: int = 0,
        transformation: optax.GradientTransformation | None = None,
    ) -> None:
        for what, value in (("size", size), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise ValueError(f"optimizer {what} must be an integer >= 0, got {value!r}.")
        if transformation is None:
            self._name = f"optimizer {config.name}"
            self._engine: _Engine = _configured(_key(config), BLOCK)
        elif _is_transformation(transformation):
            self._name = "the task's optimizer transformation"
            self._engine = _compiled(transformation, self._name, BLOCK)
        else:
            raise ValueError(
                "transformation must be an optax GradientTransformation, got "
                f"{type(transformation).__name__}."
            )
        self.config = config
        self.size = int(size)
        self.offset = int(offset)
        self.step = 0
        layout = self._engine.layout
        self._leaves = [
            _aligned(self.size, v.dtype, v) if per_element else v.copy()
            for v, per_element in zip(layout.initial, layout.per_element, strict=True)
        ]
        self._scratch: list[np.ndarray] = []  # padded blocks for `_Compiled`, made when needed

    def apply(self, params: np.ndarray, grads: np.ndarray) -> None:
        """``params += update(grads)`` in place; advances the step.

        ``grads`` is only read (the shard keeps it as the update's log entry). NaN/Inf are not
        checked here (that is a pass over the data): the caller rejects them before calling, as
        DESIGN §10 asks, because a step cannot be undone. One that gets here stays in its own
        element.
        """
        _check_vector("params", params, self.size)
        _check_vector("grads", grads, self.size)
        if np.may_share_memory(params, grads):
            raise ValueError("params and grads must not share memory.")
        self._engine.run(self, params, grads)
        self.step += 1

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Flat name -> array for replication, named by the optax state's key paths.

        Per-element arrays are the live state (not copies: serialise them before the next
        `apply`). Integer and bool scalars ("step", counts) are 0-d int64 arrays, float scalars
        1-element arrays of their dtype (a replica keeps 0-d arrays as integers, DESIGN §5).
        """
        out = {"step": np.asarray(self.step, dtype=np.int64)}
        layout = self._engine.layout
        for name, leaf, per_element in zip(
            layout.names, self._leaves, layout.per_element, strict=True
        ):
            if per_element:
                out[name] = leaf
            elif leaf.dtype.kind in "biu":
                out[name] = np.asarray(int(leaf), dtype=np.int64)
            else:
                out[name] = leaf.reshape(1).copy()
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of `state_arrays` (values are copied in). All-or-nothing: on ValueError the
        optimizer is unchanged."""
        layout = self._engine.layout
        names = {"step", *layout.names}
        missing, extra = sorted(names - arrays.keys()), sorted(arrays.keys() - names)
        if missing or extra:
            raise ValueError(
                f"the state of {self._name} does not match: missing {missing}, unexpected {extra}."
            )
        step = _counter("step", np.asarray(arrays["step"]), np.dtype(np.int64), low=0)
        values = [
            _checked(name, np.asarray(arrays[name]), leaf, per_element)
            for name, leaf, per_element in zip(
                layout.names, self._leaves, layout.per_element, strict=True
            )
        ]
        for i, (value, per_element) in enumerate(zip(values, layout.per_element, strict=True)):
            if per_element:
                np.copyto(self._leaves[i], value)
            else:
                self._leaves[i] = value
        self.step = int(step)


def _checked(name: str, given: np.ndarray, live: np.ndarray, per_element: bool) -> np.ndarray:
    """``given`` checked against the live leaf it is to replace; the value to keep."""
    if per_element:
        if given.dtype != live.dtype or given.shape != live.shape:
            raise ValueError(
                f"optimizer state {name!r} must be {live.dtype} of shape {live.shape}, "
                f"got {given.dtype} of shape {given.shape}."
            )
        return given
    if live.dtype.kind in "biu":
        return _counter(name, given, live.dtype)
    if given.dtype != live.dtype or given.shape != (1,):
        raise ValueError(
            f"optimizer scalar {name!r} must be {live.dtype} of shape (1,), "
            f"got {given.dtype} of shape {given.shape}."
        )
    return given.reshape(()).copy()


def _counter(name: str, given: np.ndarray, dtype: np.dtype, low: int | None = None) -> np.ndarray:
    """A 0-d integer (a counter or a flag) that fits ``dtype``, as a 0-d array of it."""
    lo, hi = (0, 1) if dtype.kind == "b" else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    lo = lo if low is None else max(lo, low)
    if given.shape != () or given.dtype.kind not in "iu" or not lo <= int(given) <= hi:
        raise ValueError(
            f"optimizer counter {name!r} must be a 0-d integer in [{lo}, {hi}], "
            f"got {given.dtype} of shape {given.shape}."
        )
    return np.asarray(int(given), dtype=dtype)


def _check_vector(what: str, x: np.ndarray, size: int) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape != (size,):
        got = f"{x.dtype} of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{what} must be a float32 vector of {size} elements, got {got}.")
    if not x.flags.writeable:
        raise ValueError(f"{what} must be writable: the optimizer updates it in place.")

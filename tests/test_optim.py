"""The server-side optimizer (server/optim.py, DESIGN §4) and its config (tether/config.py).

Every optimizer goes through the same checks: parity with optax over several steps with a
schedule, bit-identical results however the vector is sliced into shards (DESIGN §3), state
replication round trip, in-place updates, and no param-sized allocation per step. Both engines
are swept: the numpy in-place rules (sgd, momentum, adam) and compiled optax transformations.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.config import OptimizerConfig, RunConfig, parse_opt_arg, parse_schedule
from tether.server import optim
from tether.server.elementwise import check_elementwise
from tether.server.optim import Optimizer


def _vectors(seed: int, count: int, size: int) -> list[np.ndarray]:
    """Random float32 vectors whose magnitudes span 1e-4..10, so eps and rounding matter."""
    rng = np.random.default_rng(seed)
    magnitude = np.logspace(-4, 1, size)
    return [(rng.standard_normal(size) * magnitude).astype(np.float32) for _ in range(count)]


def _params(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size).astype(np.float32)


def _run(opt: Optimizer, params: np.ndarray, grads: Sequence[np.ndarray]) -> np.ndarray:
    for g in grads:
        opt.apply(params, g.copy())  # apply may consume its gradient buffer
    return params


def _bits(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x).tobytes()


def _engine(opt: Optimizer) -> str:
    return "numpy" if isinstance(opt._engine, optim._InPlace) else "compiled"


@contextmanager
def _block(n: int) -> Iterator[None]:
    """Blocks of n elements (optimizers created inside compile their transformation for them;
    the numpy rules read theirs at every step), so block boundaries fall inside small vectors."""
    saved = optim.BLOCK, optim.CHUNK
    optim.BLOCK = optim.CHUNK = n
    try:
        yield
    finally:
        optim.BLOCK, optim.CHUNK = saved


# --- parity with optax ----------------------------------------------------------------------

# Hyperparameters far from the defaults and a decaying schedule, where a swapped b1/b2, a
# misplaced eps, a missing bias correction, a wrong momentum formula or a schedule read at the
# wrong count moves the parameters by ~lr, far above the tolerance. Each case names the optax
# transformation it must equal, written out here rather than taken from the config.
H = 12  # steps, and the schedules' horizon
CASES: dict[str, tuple[OptimizerConfig, optax.GradientTransformation, str]] = {
    "sgd": (OptimizerConfig("sgd", lr=0.05), optax.sgd(0.05), "numpy"),
    "momentum": (OptimizerConfig("momentum", lr=0.05), optax.sgd(0.05, momentum=0.9), "numpy"),
    "momentum-0.5-linear": (
        OptimizerConfig("momentum", 0.2, {"momentum": 0.5}, "linear:end=0.01", H),
        optax.sgd(optax.linear_schedule(0.2, 0.01, H), momentum=0.5),
        "numpy",
    ),
    "adam": (OptimizerConfig("adam"), optax.adam(0.01), "numpy"),
    "adam-b1=0.5-b2=0.9-eps=1e-2-cosine": (
        OptimizerConfig("adam", 0.1, {"b1": 0.5, "b2": 0.9, "eps": 1e-2}, "cosine", H),
        optax.adam(optax.cosine_decay_schedule(0.1, H), b1=0.5, b2=0.9, eps=1e-2),
        "numpy",
    ),
    "adam-eps_root": (
        OptimizerConfig("adam", 0.01, {"eps_root": 1e-6}),
        optax.adam(0.01, eps_root=1e-6),
        "compiled",
    ),
    "sgd-nesterov": (
        OptimizerConfig("sgd", 0.05, {"momentum": 0.8, "nesterov": True}),
        optax.sgd(0.05, momentum=0.8, nesterov=True),
        "compiled",
    ),
    "adamw-warmup_cosine": (
        OptimizerConfig(
            "adamw", 3e-3, {"weight_decay": 0.01, "b1": 0.95}, "warmup_cosine:warmup=3,end=1e-4", H
        ),
        optax.adamw(
            optax.warmup_cosine_decay_schedule(0.0, 3e-3, 3, H, end_value=1e-4),
            b1=0.95,
            weight_decay=0.01,
        ),
        "compiled",
    ),
    "lion-exponential": (
        OptimizerConfig("lion", 1e-3, {}, "exponential:rate=0.5", H),
        optax.lion(optax.exponential_decay(1e-3, H, 0.5)),
        "compiled",
    ),
    "rmsprop": (
        OptimizerConfig("rmsprop", 1e-2, {"decay": 0.8}),
        optax.rmsprop(1e-2, 0.8),
        "compiled",
    ),
}
# The numpy rules compute Adam's bias corrections in float64 where optax uses float32, so their
# parameters may drift from optax's by a few float32 ulps over the steps (the trajectory's scale
# is ~1); the compiled path differs from optax's op-by-op evaluation only by XLA's fusion.
ATOL = {"numpy": 1e-6, "compiled": 2e-7}


@pytest.mark.parametrize(("config", "tx", "engine"), CASES.values(), ids=CASES.keys())
def test_matches_optax(config: OptimizerConfig, tx: optax.GradientTransformation, engine: str):
    size = 513
    params = _params(0, size)
    grads = _vectors(1, H, size)
    opt = Optimizer(config, size)
    assert _engine(opt) == engine
    ref = jnp.asarray(params)
    ref_state = tx.init(ref)
    for step, g in enumerate(grads, 1):
        opt.apply(params, g.copy())
        updates, ref_state = tx.update(jnp.asarray(g), ref_state, ref)  # params: adamw needs them
        ref = optax.apply_updates(ref, updates)
        np.testing.assert_allclose(
            params, np.asarray(ref), rtol=1e-6, atol=ATOL[engine], err_msg=f"step {step}"
        )
    assert opt.step == H
    # Named like optax's state: its key paths.
    paths = jax.tree_util.tree_flatten_with_path(ref_state)[0]
    names = {jax.tree_util.keystr(p, simple=True, separator=".") for p, _ in paths}
    assert set(opt.state_arrays()) == names | {"step"}


def test_a_supplied_transformation_matches_optax() -> None:
    tx = optax.chain(optax.clip(0.5), optax.adabelief(optax.linear_schedule(0.01, 0.001, H)))
    size = 300
    params = _params(2, size)
    opt = Optimizer(OptimizerConfig(), size, transformation=tx)
    ref = jnp.asarray(params)
    state = tx.init(ref)
    for g in _vectors(3, H, size):
        opt.apply(params, g.copy())
        updates, state = tx.update(jnp.asarray(g), state, ref)
        ref = optax.apply_updates(ref, updates)
    np.testing.assert_allclose(params, np.asarray(ref), rtol=1e-6, atol=2e-7)


NUMPY_CASES = {k: v[0] for k, v in CASES.items() if v[2] == "numpy"}


@pytest.mark.parametrize("config", NUMPY_CASES.values(), ids=NUMPY_CASES.keys())
def test_numpy_rules_are_the_float32_transcription_of_optax_bit_for_bit(config: OptimizerConfig):
    """In place with out= must not change the rounding: every op in float32, in optax's order,
    bias corrections from float64, the schedule's value from optax's (compiled) function of
    the count.
    Catches a float64 scalar sneaking into a ufunc."""
    f32 = np.float32
    size = 1001
    params = _params(4, size)
    grads = _vectors(5, 6, size)
    args = {"momentum": 0.9 if config.name == "momentum" else None, "b1": 0.9, "b2": 0.999}
    args |= {"eps": 1e-8, **config.args}
    lr = config.learning_rate()
    lr = jax.jit(lr) if callable(lr) else lr  # compiled, as optax's update usually is
    p = params.copy()
    t = mu = nu = np.zeros(size, np.float32)
    for k, g in enumerate(grads, 1):
        if config.name == "adam":
            b1, b2, eps = args["b1"], args["b2"], args["eps"]
            mu = f32(1 - b1) * g + f32(b1) * mu
            nu = f32(1 - b2) * (g * g) + f32(b2) * nu
            u = (mu / f32(1 - b1**k)) / (np.sqrt(nu / f32(1 - b2**k)) + f32(eps))
        elif args["momentum"] is not None:
            t = g + f32(args["momentum"]) * t
            u = t
        else:
            u = g
        rate = f32(np.asarray(lr(np.int32(k - 1)))) if callable(lr) else f32(lr)
        p = p + -rate * u
        assert p.dtype == np.float32
    _run(Optimizer(config, size), params, grads)
    assert _bits(params) == _bits(p)


def test_momentum_with_zero_decay_is_sgd() -> None:
    params0 = _params(6, 999)
    grads = _vectors(7, 6, 999)
    sgd = _run(Optimizer(OptimizerConfig("sgd", lr=0.1), 999), params0.copy(), grads)
    momentum0 = OptimizerConfig("momentum", 0.1, {"momentum": 0.0})
    assert np.array_equal(_run(Optimizer(momentum0, 999), params0.copy(), grads), sgd)
    # ...and a nonzero decay is not (the check above can fail).
    momentum = OptimizerConfig("momentum", 0.1, {"momentum": 0.5})
    assert not np.array_equal(_run(Optimizer(momentum, 999), params0.copy(), grads), sgd)


def test_only_the_three_numpy_rules_leave_optax() -> None:
    """sgd, momentum and adam run in numpy only with arguments numpy implements (DESIGN §4)."""
    numpy_rules = [
        OptimizerConfig("sgd", 0.1, {"momentum": 0.5}, "cosine", 10),
        OptimizerConfig("momentum", 0.1, {"nesterov": False}),
        OptimizerConfig("adam", 0.01, {"b1": 0.8, "eps_root": 0.0, "mu_dtype": None}),
    ]
    compiled = [
        OptimizerConfig("sgd", 0.1, {"momentum": 0.5, "nesterov": True}),
        OptimizerConfig("adam", 0.01, {"eps_root": 1e-8}),
        OptimizerConfig("adam", 0.01, {"mu_dtype": "float32"}),
        OptimizerConfig("adamw", 0.01),
    ]
    assert [_engine(Optimizer(c, 3)) for c in numpy_rules] == ["numpy"] * 3
    assert [_engine(Optimizer(c, 3)) for c in compiled] == ["compiled"] * 4
    assert _engine(Optimizer(OptimizerConfig("sgd"), 3, transformation=optax.sgd(0.1))) == (
        "compiled"
    )


# --- slicing invariance (DESIGN §3: the shard count must not change the result at all) ------


def _sharded(
    config: OptimizerConfig,
    params: np.ndarray,
    grads: Sequence[np.ndarray],
    bounds: Sequence[int],
) -> list[Optimizer]:
    """Each contiguous range [bounds[i], bounds[i+1]) with its own Optimizer, as shards."""
    ranges = list(zip(bounds[:-1], bounds[1:], strict=True))
    opts = [Optimizer(config, hi - lo, offset=lo) for lo, hi in ranges]
    for g in grads:
        g = g.copy()
        for opt, (lo, hi) in zip(opts, ranges, strict=True):
            opt.apply(params[lo:hi], g[lo:hi])
    return opts


def _assert_same_as_whole(
    whole: Optimizer, whole_params: np.ndarray, shards: Sequence[Optimizer], params: np.ndarray
) -> None:
    assert np.array_equal(params, whole_params) and _bits(params) == _bits(whole_params)
    for name, value in whole.state_arrays().items():
        parts = [shard.state_arrays()[name] for shard in shards]
        if value.shape == whole_params.shape:
            assert _bits(np.concatenate(parts)) == _bits(value), name
        else:  # scalars: every shard at the same step
            assert all(_bits(part) == _bits(value) for part in parts), name


SLICED = {
    "adamw-warmup_cosine": CASES["adamw-warmup_cosine"][0],
    "sgd": OptimizerConfig("sgd", 0.1),
    "momentum": OptimizerConfig("momentum", 0.1),
    "adam": OptimizerConfig("adam", 0.05, {"b1": 0.8, "b2": 0.95}),
    "lion-exponential": CASES["lion-exponential"][0],
    "rmsprop": CASES["rmsprop"][0],
}


@pytest.mark.parametrize("config", SLICED.values(), ids=SLICED.keys())
def test_sharding_does_not_change_a_bit(config: OptimizerConfig) -> None:
    """Two and three shards of awkward lengths against one process."""
    size, steps = 100_003, 5
    params0 = _params(8, size)
    grads = _vectors(9, steps, size)
    whole = Optimizer(config, size)
    whole_params = _run(whole, params0.copy(), grads)
    for bounds in ([0, 49_999, size], [0, 33_331, 66_670, size]):
        sharded = params0.copy()
        shards = _sharded(config, sharded, grads, bounds)
        _assert_same_as_whole(whole, whole_params, shards, sharded)
        assert all(shard.step == steps for shard in shards)


@pytest.mark.parametrize("config", SLICED.values(), ids=SLICED.keys())
def test_blocked_apply_equals_one_pass_of_the_transform(config: OptimizerConfig) -> None:
    """Small blocks, so that slices start and end inside blocks and span several, against one
    block over the whole vector; counters must advance once per step, not once per block."""
    size, steps = 5_000, 3
    params0 = _params(10, size)
    grads = _vectors(11, steps, size)
    one_pass = Optimizer(config, size)  # 5 000 < BLOCK and < CHUNK: a single block
    one_pass_params = _run(one_pass, params0.copy(), grads)
    with _block(512):
        blocked = Optimizer(config, size)
        _assert_same_as_whole(
            one_pass, one_pass_params, [blocked], _run(blocked, params0.copy(), grads)
        )
        for bounds in ([0, 1, 513, 1024, 1025, 4_999, size], [0, 0, 2_047, size, size]):
            sharded = params0.copy()
            shards = _sharded(config, sharded, grads, bounds)
            _assert_same_as_whole(one_pass, one_pass_params, shards, sharded)


@st.composite
def _shardings(draw: st.DrawFn) -> tuple[int, list[int]]:
    size = draw(st.integers(0, 300))
    cuts = draw(st.lists(st.integers(0, size), max_size=6))
    return size, [0, *sorted(cuts), size]  # equal cuts give empty shards


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["sgd", "adam", "adamw"]),
    sharding=_shardings(),
    block=st.sampled_from([16, 64]),
    steps=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_slicing_and_blocking_gives_the_same_bits(
    name: str, sharding: tuple[int, list[int]], block: int, steps: int, seed: int
) -> None:
    size, bounds = sharding
    config = OptimizerConfig(name, 0.1, {"b1": 0.8} if name != "sgd" else {}, "cosine", 4)
    params0 = _params(seed, size)
    grads = _vectors(seed + 1, steps, size)
    with _block(block):
        whole = Optimizer(config, size)
        whole_params = _run(whole, params0.copy(), grads)
        sharded = params0.copy()
        shards = _sharded(config, sharded, grads, bounds)
    _assert_same_as_whole(whole, whole_params, shards, sharded)


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, 10_000), size=st.integers(0, 3_000), block=st.integers(1, 700))
def test_blocks_are_aligned_to_the_runs_vector(offset: int, size: int, block: int) -> None:
    """Element j of the run's vector always sits at position j % block of a block, whatever
    slice it is in: what makes every shard count compute it with the same program."""
    pieces = list(optim._blocks(offset, size, block))
    if size == 0:
        assert pieces == [(0, 0, 0)]  # one empty block: the counters still advance
        return
    assert [lo for lo, _, _ in pieces] == [0, *(hi for _, hi, _ in pieces[:-1])]
    assert pieces[-1][1] == size
    for lo, hi, at in pieces:
        assert 0 < hi - lo <= block and at + (hi - lo) <= block
        assert at == (offset + lo) % block


# --- in place, zero-length slices, NaN --------------------------------------------------------

ENGINES = {
    "numpy-adam": OptimizerConfig("adam", 0.01, {}, "linear", 10),
    "compiled-adamw": OptimizerConfig("adamw", 0.01, {}, "linear", 10),
}


@pytest.mark.parametrize("config", ENGINES.values(), ids=ENGINES.keys())
def test_apply_updates_params_and_state_in_place(config: OptimizerConfig) -> None:
    opt = Optimizer(config, 700)
    params = _params(12, 700)
    before = params.copy()
    live = opt.state_arrays()
    assert opt.apply(params, _vectors(13, 1, 700)[0]) is None  # type: ignore[func-returns-value]
    assert not np.array_equal(params, before)  # the caller's buffer moved
    after = opt.state_arrays()
    for name in ("0.mu", "0.nu"):
        assert after[name] is live[name] and live[name].any()  # the live state, updated
    assert int(after["0.count"]) == int(after["step"]) == 1


@pytest.mark.parametrize("config", ENGINES.values(), ids=ENGINES.keys())
def test_a_zero_length_slice_still_advances_its_counters(config: OptimizerConfig) -> None:
    empty = Optimizer(config, 0, offset=5)
    full = Optimizer(config, 4)
    for g in _vectors(14, 3, 4):
        empty.apply(np.zeros(0, np.float32), np.zeros(0, np.float32))
        full.apply(np.zeros(4, np.float32), g)
    counters = {k: int(v) for k, v in full.state_arrays().items() if v.ndim == 0}
    assert len(counters) == 3 and set(counters.values()) == {3}  # step, adam's and the schedule's
    assert {k: int(v) for k, v in empty.state_arrays().items() if v.ndim == 0} == counters
    assert all(v.shape == (0,) for v in empty.state_arrays().values() if v.ndim)


@pytest.mark.parametrize("config", ENGINES.values(), ids=ENGINES.keys())
def test_a_nan_that_reaches_apply_stays_in_its_element(config: OptimizerConfig) -> None:
    """Documented: apply does not check (the shard rejects NaN first, DESIGN §10); the update
    is elementwise, so a NaN poisons its own element and no other."""
    grads = _vectors(15, 2, 300)
    clean = _run(Optimizer(config, 300), _params(16, 300), grads)
    grads[0][123] = np.nan
    dirty = _run(Optimizer(config, 300), _params(16, 300), grads)
    assert np.isnan(dirty[123])
    others = np.arange(300) != 123
    assert _bits(dirty[others]) == _bits(clean[others])


# --- replication: state_arrays / load_state_arrays ------------------------------------------


def test_state_arrays_names_and_counters() -> None:
    opt = Optimizer(OptimizerConfig("adam"), 5)
    _run(opt, np.zeros(5, np.float32), _vectors(17, 2, 5))
    arrays = opt.state_arrays()
    assert sorted(arrays) == ["0.count", "0.mu", "0.nu", "step"]
    for counter in ("step", "0.count"):
        assert arrays[counter].shape == () and arrays[counter].dtype == np.int64
        assert int(arrays[counter]) == 2
    assert arrays["0.mu"].dtype == np.float32 and arrays["0.mu"].shape == (5,)
    assert sorted(Optimizer(OptimizerConfig("momentum"), 5).state_arrays()) == ["0.trace", "step"]
    assert sorted(Optimizer(OptimizerConfig("sgd"), 5).state_arrays()) == ["step"]
    # A float scalar leaf (an injected hyperparameter) travels as a 1-element array: a replica
    # keeps 0-d arrays as integers (server/codec.py).
    injected = optax.inject_hyperparams(optax.adam)(learning_rate=0.01)
    arrays = Optimizer(OptimizerConfig(), 5, transformation=injected).state_arrays()
    assert arrays["hyperparams.learning_rate"].shape == (1,)
    assert arrays["hyperparams.learning_rate"].dtype == np.float32


RESTORED = {
    "sgd": (OptimizerConfig("sgd", 0.05), None),
    "momentum": (OptimizerConfig("momentum", 0.05, {}, "cosine", 10), None),
    "adam": (OptimizerConfig("adam", 0.05, {}, "linear", 10), None),
    "adamw-warmup_cosine": (CASES["adamw-warmup_cosine"][0], None),
    "injected-hyperparams": (
        OptimizerConfig(),
        optax.inject_hyperparams(optax.rmsprop)(learning_rate=optax.linear_schedule(0.1, 0.0, 8)),
    ),
}


@pytest.mark.parametrize(("config", "tx"), RESTORED.values(), ids=RESTORED.keys())
def test_restored_state_continues_bit_identically(config: OptimizerConfig, tx: Any) -> None:
    size = 1000
    grads = _vectors(18, 8, size)
    original = Optimizer(config, size, transformation=tx)
    params = _run(original, _params(19, size), grads[:4])
    # As a store hands state back: fresh read-only arrays decoded from bytes.
    stored = {
        key: np.frombuffer(value.tobytes(), dtype=value.dtype).reshape(value.shape)
        for key, value in original.state_arrays().items()
    }
    restored = Optimizer(config, size, transformation=tx)
    restored.load_state_arrays(stored)
    fresh = Optimizer(config, size, transformation=tx)
    restored_params, fresh_params = params.copy(), params.copy()

    _run(original, params, grads[4:])
    _run(restored, restored_params, grads[4:])
    _run(fresh, fresh_params, grads[4:])
    assert _bits(restored_params) == _bits(params)
    assert restored.step == original.step == 8
    restored_arrays = restored.state_arrays()
    for key, value in original.state_arrays().items():
        assert _bits(restored_arrays[key]) == _bits(value), key
    if len(stored) > 1:  # the state matters, so skipping the load would have been caught
        assert _bits(fresh_params) != _bits(params)


def _loaded(config: OptimizerConfig, tx: Any = None) -> tuple[Optimizer, dict[str, np.ndarray]]:
    opt = Optimizer(config, 4, transformation=tx)
    _run(opt, np.zeros(4, np.float32), _vectors(20, 3, 4))
    return opt, {k: v.copy() for k, v in opt.state_arrays().items()}


INJECTED = optax.inject_hyperparams(optax.adam)(learning_rate=0.01)
BAD_STATES: list[tuple[OptimizerConfig, Any, Callable[[dict[str, np.ndarray]], object], str]] = [
    (OptimizerConfig("adam"), None, lambda s: s.pop("0.nu"), "missing"),
    (OptimizerConfig("sgd"), None, lambda s: s.update(extra=np.zeros(4, np.float32)), "unexpected"),
    (OptimizerConfig("adam"), None, lambda s: s.update({"0.nu": np.zeros(5, np.float32)}), "shape"),
    (
        OptimizerConfig("momentum"),
        None,
        lambda s: s.update({"0.trace": np.zeros(4, np.float64)}),
        "float32",
    ),
    (
        OptimizerConfig("adamw"),
        None,
        lambda s: s.update({"0.mu": np.zeros(4, np.int32)}),
        "float32",
    ),
    (OptimizerConfig("adam"), None, lambda s: s.update({"0.count": np.asarray(2**40)}), "counter"),
    (OptimizerConfig("adamw"), None, lambda s: s.update({"0.count": np.asarray(1.0)}), "counter"),
    (OptimizerConfig("sgd"), None, lambda s: s.update(step=np.asarray([3])), "counter"),
    (OptimizerConfig("adam"), None, lambda s: s.update(step=np.asarray(-1)), "counter"),
    (OptimizerConfig("adam"), None, lambda s: s.update(step=np.asarray(1.5)), "counter"),
    (
        OptimizerConfig(),
        INJECTED,
        lambda s: s.update({"hyperparams.learning_rate": np.asarray(0.1, np.float32)}),
        "scalar",
    ),
]


@pytest.mark.parametrize(("config", "tx", "corrupt", "match"), BAD_STATES)
def test_load_rejects_mismatched_state_and_changes_nothing(
    config: OptimizerConfig, tx: Any, corrupt: Callable[[dict[str, np.ndarray]], object], match: str
) -> None:
    opt, before = _loaded(config, tx)
    bad = {k: v + 1 if v.ndim else v for k, v in before.items()}  # valid but different values
    bad["step"] = np.asarray(7)
    corrupt(bad)
    with pytest.raises(ValueError, match=match) as info:
        opt.load_state_arrays(bad)
    assert str(info.value).endswith(".") and "\n" not in str(info.value)
    after = opt.state_arrays()
    assert sorted(after) == sorted(before) and opt.step == 3
    for key, value in before.items():
        assert _bits(after[key]) == _bits(value), key


# --- elementwise or refused -----------------------------------------------------------------


def _custom(init: Callable[[Any], Any], update: Callable[..., Any]) -> optax.GradientTransformation:
    return optax.GradientTransformation(init, update)


def _stateless(fn: Callable[[jax.Array], jax.Array]) -> optax.GradientTransformation:
    return _custom(lambda p: optax.EmptyState(), lambda u, s, p=None: (fn(u), s))


REFUSED = {
    "clip_by_global_norm": (
        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
        "uses reduce_sum",
    ),
    "lamb": (optax.lamb(1e-3), "uses reduce_sum"),
    "lars": (optax.lars(1e-3), "uses reduce_sum"),
    "novograd": (optax.novograd(1e-3), "uses reduce_sum"),
    "adafactor": (optax.adafactor(1e-3), "is not elementwise"),
    "dot": (_stateless(lambda u: u * jnp.dot(u, u)), "uses dot_general"),
    "cumsum": (_stateless(jnp.cumsum), "uses cumsum"),
    "sort": (_stateless(jnp.sort), "uses sort"),
    "reverse": (_stateless(lambda u: u[::-1]), "uses rev"),
    "position": (_stateless(lambda u: u * jnp.arange(u.size)), "uses iota"),
    "roll": (_stateless(lambda u: jnp.roll(u, 1)), "is not elementwise"),
    "a mean inside jit": (_stateless(jax.jit(lambda u: u - u.mean())), "uses reduce_sum"),
    "lbfgs": (optax.lbfgs(), "cannot run on a shard"),
    "bfloat16 state": (optax.adam(1e-3, mu_dtype=jnp.bfloat16), "numpy dtypes"),
    "init from values": (
        _custom(lambda p: (p,), lambda u, s, p=None: (u - s[0], s)),
        "from the parameter values",
    ),
}


@pytest.mark.parametrize(("tx", "words"), REFUSED.values(), ids=REFUSED.keys())
def test_non_elementwise_transformations_are_refused(tx: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words) as info:
        check_elementwise(tx, "optimizer x")
    message = str(info.value)
    assert message.startswith("optimizer x ") and message.endswith(".") and "\n" not in message
    if "uses" in words:
        assert "each shard would compute a different result than one process" in message
    with pytest.raises(ValueError, match=words):
        Optimizer(OptimizerConfig(), 10, transformation=tx)


def _loop(u: jax.Array, s: Any, p: Any = None) -> tuple[jax.Array, Any]:
    """A cond on a scalar and a while loop carrying the vector: elementwise."""
    u = jax.lax.cond(s.count > 2, lambda x: x * 2.0, lambda x: x, u)
    _, u = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 0.5), (0, u))
    return u, optax.ScaleByScheduleState(count=s.count + 1)


ACCEPTED = {
    name: getattr(optax, name)(1e-3)
    for name in ("adam", "adamw", "lion", "rmsprop", "adagrad", "adabelief", "nadam", "radam")
} | {
    "clip then adam": optax.chain(optax.clip(1.0), optax.adam(1e-3)),
    "injected hyperparameters": optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
    "cond and while": _custom(
        lambda p: optax.ScaleByScheduleState(jnp.zeros([], jnp.int32)), _loop
    ),
}


@pytest.mark.parametrize("tx", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_elementwise_transformations_are_accepted(tx: Any) -> None:
    check_elementwise(tx, "optimizer x")


def test_a_loop_transformation_runs_and_slices_exactly() -> None:
    tx = ACCEPTED["cond and while"]
    grads = _vectors(21, 5, 1000)
    whole = _run(
        Optimizer(OptimizerConfig(), 1000, transformation=tx), np.zeros(1000, np.float32), grads
    )
    expected = np.zeros(1000, np.float32)
    for k, g in enumerate(grads):
        expected += g * np.float32(2.0 if k > 2 else 1.0) * np.float32(0.125)
    assert _bits(whole) == _bits(expected)


def test_transformation_must_be_an_optax_one() -> None:
    with pytest.raises(ValueError, match="GradientTransformation"):
        Optimizer(OptimizerConfig(), 3, transformation=lambda g: g)  # type: ignore[arg-type]


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "adamx"}, "unknown optimizer 'adamx'; expected one of .*adamw"),
        ({"name": ""}, "optimizer must be a name"),
        ({"name": "adamw", "args": {"weight_decy": 0.1}}, "adamw has no argument 'weight_decy'"),
        ({"name": "sgd", "args": {"learning_rate": 0.1}}, "--lr"),
        ({"name": "sgd", "args": {"momentum": [0.9]}}, "a number, a bool, None or a string"),
        ({"name": "sgd", "args": {"momentum": float("nan")}}, "finite"),
        ({"name": "sgd", "args": {"2x": 1}}, "keyword argument name"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": 1e-50}, "lr"),  # rounds to 0 in float32
        ({"lr": "fast"}, "lr"),
        ({"lr": True}, "lr"),
        ({"schedule": "cosine"}, "needs a horizon: add decay=N"),
        ({"schedule": "exponential:rate=0.5"}, "add transition=N"),
        ({"schedule": "warmup_cosine:warmup=10", "horizon": 10}, "warmup .* shorter"),
        ({"schedule": "warmup_cosine", "horizon": 10}, "needs warmup="),
        ({"schedule": "cos", "horizon": 10}, "unknown kind 'cos'; expected constant"),
        ({"schedule": "cosine:alpha=2", "horizon": 10}, "alpha must be in"),
        ({"schedule": "cosine:beta=1", "horizon": 10}, "not one of its keys"),
        ({"schedule": "linear:end=x", "horizon": 10}, "end must be a number"),
        ({"schedule": "linear:decay=1.5"}, "decay must be an integer"),
        ({"schedule": "exponential:rate=0,transition=5"}, "rate must be > 0"),
        ({"horizon": -1}, "horizon"),
    ],
)
def test_config_rejects_bad_values_in_one_sentence(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        OptimizerConfig(**kwargs)
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message


def test_config_accepts_edge_values_and_copies_its_arguments() -> None:
    OptimizerConfig("adam", 1e-30, {"b1": 0.0, "b2": 0.0, "eps": 1e-30})
    OptimizerConfig("adamw", 3e-4, {"weight_decay": 0.01, "mu_dtype": None}, "linear:decay=1")
    OptimizerConfig("sgd", 0.1, {}, "warmup_cosine:warmup=0", 1)
    args = {"b1": 0.5}
    config = OptimizerConfig("adam", args=args)
    args["b1"] = 0.7
    assert config.args == {"b1": 0.5}


def test_schedules_are_optax_schedules() -> None:
    horizon = 50
    expected = {
        "constant": lambda c: 0.2,
        "linear:end=0.02": optax.linear_schedule(0.2, 0.02, horizon),
        "linear:decay=10": optax.linear_schedule(0.2, 0.0, 10),
        "cosine:alpha=0.1": optax.cosine_decay_schedule(0.2, horizon, alpha=0.1),
        "warmup_cosine:warmup=5,end=0.01": optax.warmup_cosine_decay_schedule(
            0.0, 0.2, 5, horizon, end_value=0.01
        ),
        "exponential:rate=0.1,transition=7": optax.exponential_decay(0.2, 7, 0.1),
        "exponential:rate=0.1": optax.exponential_decay(0.2, horizon, 0.1),
    }
    for spec, reference in expected.items():
        lr = OptimizerConfig("sgd", 0.2, {}, spec, horizon).learning_rate()
        for count in (0, 3, 5, 49, 50, 80):
            got = lr(count) if callable(lr) else lr
            assert float(got) == pytest.approx(float(reference(count)), rel=1e-6), (spec, count)
    assert parse_schedule("warmup_cosine:warmup=100,end=0.5") == (
        "warmup_cosine",
        {"warmup": 100, "end": 0.5},
    )


def test_opt_arguments_parse_as_python_literals() -> None:
    assert parse_opt_arg("weight_decay=0.01") == ("weight_decay", 0.01)
    assert parse_opt_arg("nesterov=True") == ("nesterov", True)
    assert parse_opt_arg("momentum=None") == ("momentum", None)
    assert parse_opt_arg("decay=3") == ("decay", 3)
    assert parse_opt_arg("mu_dtype=bfloat16") == ("mu_dtype", "bfloat16")  # a bare word
    assert parse_opt_arg("mu_dtype='float32'") == ("mu_dtype", "float32")
    for bad in ("weight_decay", "=1", "2x=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_opt_arg(bad)


def test_run_config_carries_the_optimizer_through_the_store() -> None:
    config = RunConfig.of(
        "r",
        mode="asp",
        steps=30,
        workers=3,
        optimizer="adamw",
        lr=3e-4,
        opt_args={"weight_decay": 0.01, "b1": 0.95},
        schedule="warmup_cosine:warmup=10",
    )
    assert config.optimizer_updates == 90  # one update per push under ASP
    assert config.optimizer_config == OptimizerConfig(
        "adamw", 3e-4, {"weight_decay": 0.01, "b1": 0.95}, "warmup_cosine:warmup=10", 90
    )
    assert RunConfig.from_dict(config.to_dict()) == config
    bsp = RunConfig.of("r", mode="bsp", steps=30, workers=3, schedule="cosine")
    assert bsp.optimizer_config.horizon == 30  # one update per clock under BSP
    old = config.to_dict()  # as written before the optimizer had arguments and schedules
    for key in ("opt_args", "schedule"):
        del old[key]
    loaded = RunConfig.from_dict(old)
    assert loaded.opt_args == {} and loaded.schedule == "constant"
    with pytest.raises(ValueError, match="has no argument 'wd'"):
        RunConfig.of("r", optimizer="adamw", opt_args={"wd": 0.1})
    with pytest.raises(ValueError, match="warmup"):
        RunConfig.of("r", steps=10, schedule="warmup_cosine:warmup=10")


# --- buffers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ENGINES.values(), ids=ENGINES.keys())
def test_apply_rejects_bad_buffers_and_changes_nothing(config: OptimizerConfig) -> None:
    opt = Optimizer(config, 8)
    params = _params(22, 8)
    saved = params.copy()
    read_only = np.ones(8, np.float32)
    read_only.flags.writeable = False
    bad_calls = [
        (params, np.ones(7, np.float32), "8 elements"),
        (params, np.ones(8, np.float64), "float32"),
        (params, [1.0] * 8, "float32"),
        (params.astype(np.float64), np.ones(8, np.float32), "params"),
        (params, read_only, "writable"),
        (params, params, "share memory"),
    ]
    for p, g, match in bad_calls:
        with pytest.raises(ValueError, match=match):
            opt.apply(p, g)  # type: ignore[arg-type]
    assert opt.step == 0 and _bits(params) == _bits(saved)
    assert not opt.state_arrays()["0.mu"].any()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="size"):
            Optimizer(config, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offset"):
        Optimizer(config, 3, offset=-1)


# --- no param-sized allocation per step (what makes apply fast) ------------------------------


@pytest.mark.parametrize("config", [*ENGINES.values(), OptimizerConfig("momentum")])
def test_apply_allocates_nothing_param_sized(config: OptimizerConfig) -> None:
    size = 1 << 20  # 4 MiB of float32
    opt = Optimizer(config, size, offset=12_345)  # partial blocks at both ends
    params = np.zeros(size, np.float32)
    grads = np.empty(size, np.float32)
    source = _vectors(23, 1, size)[0]
    np.copyto(grads, source)
    opt.apply(params, grads)  # warm-up
    tracemalloc.start()
    try:
        probe = np.empty(size, np.float32)  # tracemalloc sees numpy's buffers: the test can fail
        _, probe_peak = tracemalloc.get_traced_memory()
        del probe
        tracemalloc.reset_peak()
        for _ in range(3):
            np.copyto(grads, source)
            opt.apply(params, grads)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert probe_peak >= 4 << 20
    assert peak < 3 << 20, f"apply allocated {peak} bytes at its peak for a 4 MiB vector"
    assert opt.step == 4

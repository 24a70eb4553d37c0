"""The server-side optimizer (server/optim.py, DESIGN §4).

Every optimizer goes through the same checks: parity with optax, bit-identical results however
the vector is sliced into shards (DESIGN §3), composition equalities, state replication round
trip, and no param-sized allocation per step.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.config import OPTIMIZER_NAMES, OptimizerConfig
from tether.server import optim
from tether.server.optim import (
    CHUNK,
    Optimizer,
    Transform,
    build,
    chain,
    scale,
    scale_by_adam,
    trace,
)

NAMES = ("sgd", "momentum", "adam")


def _vectors(seed: int, count: int, size: int) -> list[np.ndarray]:
    """Random float32 vectors whose magnitudes span 1e-4..10, so eps and rounding matter."""
    rng = np.random.default_rng(seed)
    magnitude = np.logspace(-4, 1, size)
    return [(rng.standard_normal(size) * magnitude).astype(np.float32) for _ in range(count)]


def _params(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size).astype(np.float32)


def _run(opt: Optimizer, params: np.ndarray, grads: Sequence[np.ndarray]) -> np.ndarray:
    for g in grads:
        opt.apply(params, g.copy())  # apply consumes its gradient buffer
    return params


def _run_transform(tx: Transform, params: np.ndarray, grads: Sequence[np.ndarray]) -> np.ndarray:
    """A transform applied directly, in one pass over the whole vector."""
    state = tx.init(params.size)
    for g in grads:
        updates = g.copy()
        state = tx.update(updates, state)
        np.add(params, updates, out=params)
    return params


def _bits(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x).tobytes()


@contextmanager
def _chunk(n: int) -> Iterator[None]:
    """Run `Optimizer.apply` with blocks of n elements (to exercise blocking on small vectors)."""
    saved = optim.CHUNK
    optim.CHUNK = n
    try:
        yield
    finally:
        optim.CHUNK = saved


# --- parity with optax ----------------------------------------------------------------------

# Defaults plus hyperparameters far from them, where a swapped b1/b2, a misplaced eps, a missing
# bias correction or a wrong momentum formula moves the parameters by ~lr, far above tolerance.
MakeOptax = Callable[[OptimizerConfig], optax.GradientTransformation]
OPTAX_CASES: dict[str, tuple[OptimizerConfig, MakeOptax]] = {
    "sgd": (OptimizerConfig("sgd", lr=0.05), lambda c: optax.sgd(c.lr)),
    "momentum": (
        OptimizerConfig("momentum", lr=0.05),
        lambda c: optax.sgd(c.lr, momentum=c.momentum),
    ),
    "momentum-0.5": (
        OptimizerConfig("momentum", lr=0.2, momentum=0.5),
        lambda c: optax.sgd(c.lr, momentum=c.momentum),
    ),
    "adam": (OptimizerConfig("adam"), lambda c: optax.adam(c.lr, c.b1, c.b2, c.eps)),
    "adam-b1=0.5-b2=0.9-eps=1e-2": (
        OptimizerConfig("adam", lr=0.1, b1=0.5, b2=0.9, eps=1e-2),
        lambda c: optax.adam(c.lr, c.b1, c.b2, c.eps),
    ),
}


def test_the_sweep_covers_every_optimizer() -> None:
    assert {config.name for config, _ in OPTAX_CASES.values()} == set(OPTIMIZER_NAMES)


@pytest.mark.parametrize(("config", "make_optax"), OPTAX_CASES.values(), ids=OPTAX_CASES.keys())
def test_matches_optax(config: OptimizerConfig, make_optax: MakeOptax) -> None:
    size, steps = 513, 12
    params = _params(0, size)
    grads = _vectors(1, steps, size)
    opt = Optimizer(config, size)
    tx = make_optax(config)
    ref = jnp.asarray(params)
    ref_state = tx.init(ref)
    for step, g in enumerate(grads, 1):
        opt.apply(params, g.copy())
        updates, ref_state = tx.update(jnp.asarray(g), ref_state, ref)
        ref = optax.apply_updates(ref, updates)
        np.testing.assert_allclose(
            params, np.asarray(ref), rtol=1e-5, atol=1e-5, err_msg=f"step {step}"
        )
    assert opt.step == steps


@pytest.mark.parametrize(
    "config", [config for config, _ in OPTAX_CASES.values()], ids=OPTAX_CASES.keys()
)
def test_matches_float32_transcription_of_optax_formulas_bit_for_bit(
    config: OptimizerConfig,
) -> None:
    """In place with out= must not change the rounding: every op in float32, in optax's order,
    with bias corrections from float64. Catches a float64 scalar sneaking into a ufunc."""
    f32 = np.float32
    size, steps = 1001, 6
    params = _params(2, size)
    grads = _vectors(3, steps, size)
    p = params.copy()
    t = mu = nu = np.zeros(size, np.float32)
    for k, g in enumerate(grads, 1):
        if config.name == "sgd":
            u = g
        elif config.name == "momentum":
            t = g + f32(config.momentum) * t
            u = t
        else:
            mu = f32(1 - config.b1) * g + f32(config.b1) * mu
            nu = f32(1 - config.b2) * (g * g) + f32(config.b2) * nu
            mu_hat = mu / f32(1 - config.b1**k)
            nu_hat = nu / f32(1 - config.b2**k)
            u = mu_hat / (np.sqrt(nu_hat) + f32(config.eps))
        p = p + f32(-config.lr) * u
        assert p.dtype == np.float32
    _run(Optimizer(config, size), params, grads)
    assert _bits(params) == _bits(p)


# --- slicing invariance (DESIGN §3: the shard count must not change the result at all) ------


def _sharded(
    config: OptimizerConfig,
    params: np.ndarray,
    grads: Sequence[np.ndarray],
    bounds: Sequence[int],
) -> list[Optimizer]:
    """Each contiguous range [bounds[i], bounds[i+1]) with its own Optimizer, as shards."""
    ranges = list(zip(bounds[:-1], bounds[1:], strict=True))
    opts = [Optimizer(config, hi - lo) for lo, hi in ranges]
    for g in grads:
        g = g.copy()
        for opt, (lo, hi) in zip(opts, ranges, strict=True):
            opt.apply(params[lo:hi], g[lo:hi])
    return opts


def _assert_same_as_whole(
    whole: Optimizer,
    whole_params: np.ndarray,
    shards: Sequence[Optimizer],
    sharded_params: np.ndarray,
) -> None:
    assert _bits(sharded_params) == _bits(whole_params)
    for name, value in whole.state_arrays().items():
        parts = [shard.state_arrays()[name] for shard in shards]
        if value.ndim == 0:  # counters: every shard at the same step
            assert all(int(part) == int(value) for part in parts), name
        else:
            assert _bits(np.concatenate(parts)) == _bits(value), name


@pytest.mark.parametrize("slices", [1, 2, 3, 7])
@pytest.mark.parametrize("name", NAMES)
def test_sharding_does_not_change_a_bit(name: str, slices: int) -> None:
    # Larger than two blocks, and odd, so shard and block boundaries fall everywhere.
    size, steps = 2 * CHUNK + 12_345, 4
    config = OptimizerConfig(name, lr=0.1)
    params0 = _params(4, size)
    grads = _vectors(5, steps, size)
    whole = Optimizer(config, size)
    whole_params = _run(whole, params0.copy(), grads)
    bounds = np.linspace(0, size, slices + 1).astype(int).tolist()  # balanced, as in DESIGN §2
    sharded_params = params0.copy()
    shards = _sharded(config, sharded_params, grads, bounds)
    _assert_same_as_whole(whole, whole_params, shards, sharded_params)


@st.composite
def _shardings(draw: st.DrawFn) -> tuple[int, list[int]]:
    size = draw(st.integers(0, 300))
    cuts = draw(st.lists(st.integers(0, size), max_size=8))
    return size, [0, *sorted(cuts), size]  # equal cuts give empty shards


@settings(max_examples=80, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    sharding=_shardings(),
    chunk=st.integers(1, 64),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_slicing_and_blocking_gives_the_same_bits(
    name: str, sharding: tuple[int, list[int]], chunk: int, steps: int, seed: int
) -> None:
    size, bounds = sharding
    config = OptimizerConfig(name, lr=0.1, b1=0.8, b2=0.95)
    params0 = _params(seed, size)
    grads = _vectors(seed + 1, steps, size)
    whole = Optimizer(config, size)
    whole_params = _run_transform(build(config), params0.copy(), grads)  # one pass, unblocked
    with _chunk(chunk):
        blocked = _run(whole, params0.copy(), grads)
        sharded_params = params0.copy()
        shards = _sharded(config, sharded_params, grads, bounds)
    assert _bits(blocked) == _bits(whole_params)
    _assert_same_as_whole(whole, whole_params, shards, sharded_params)


@pytest.mark.parametrize("name", NAMES)
def test_blocked_apply_equals_one_pass_of_the_transform(name: str) -> None:
    """`Optimizer.apply` works block by block; counters must advance once per step, not per block
    (Adam's bias correction would differ otherwise)."""
    size, steps = 2 * CHUNK + 1, 3
    config = OptimizerConfig(name)
    params0 = _params(6, size)
    grads = _vectors(7, steps, size)
    blocked = _run(Optimizer(config, size), params0.copy(), grads)
    assert _bits(blocked) == _bits(_run_transform(build(config), params0.copy(), grads))


# --- composition ----------------------------------------------------------------------------

CFG = OptimizerConfig(lr=0.03, momentum=0.7, b1=0.85, b2=0.98, eps=1e-4)
COMPOSITIONS = [
    pytest.param("sgd", chain(scale(-CFG.lr)), id="sgd=chain(scale)"),
    pytest.param("momentum", chain(trace(CFG.momentum), scale(-CFG.lr)), id="momentum"),
    pytest.param("adam", chain(scale_by_adam(CFG.b1, CFG.b2, CFG.eps), scale(-CFG.lr)), id="adam"),
]


@pytest.mark.parametrize(("name", "composed"), COMPOSITIONS)
def test_build_is_the_documented_chain(name: str, composed: Transform) -> None:
    config = OptimizerConfig(
        name, lr=CFG.lr, momentum=CFG.momentum, b1=CFG.b1, b2=CFG.b2, eps=CFG.eps
    )
    params0 = _params(8, 777)
    grads = _vectors(9, 5, 777)
    expected = _run_transform(composed, params0.copy(), grads)
    assert _bits(_run_transform(build(config), params0.copy(), grads)) == _bits(expected)
    assert _bits(_run(Optimizer(config, 777), params0.copy(), grads)) == _bits(expected)


def test_momentum_with_zero_decay_is_sgd() -> None:
    params0 = _params(10, 999)
    grads = _vectors(11, 6, 999)
    sgd = _run(Optimizer(OptimizerConfig("sgd", lr=0.1), 999), params0.copy(), grads)
    momentum0 = OptimizerConfig("momentum", lr=0.1, momentum=0.0)
    assert np.array_equal(_run(Optimizer(momentum0, 999), params0.copy(), grads), sgd)
    # ...and a nonzero decay is not (the check above can fail).
    momentum = OptimizerConfig("momentum", lr=0.1, momentum=0.5)
    assert not np.array_equal(_run(Optimizer(momentum, 999), params0.copy(), grads), sgd)


# --- replication: state_arrays / load_state_arrays ------------------------------------------


def test_state_arrays_names_and_counters() -> None:
    opt = Optimizer(OptimizerConfig("adam"), 5)
    _run(opt, np.zeros(5, np.float32), _vectors(12, 2, 5))
    arrays = opt.state_arrays()
    assert sorted(arrays) == ["0.count", "0.mu", "0.nu", "step"]
    for counter in ("step", "0.count"):
        assert arrays[counter].shape == () and arrays[counter].dtype == np.int64
        assert int(arrays[counter]) == 2
    assert arrays["0.mu"].dtype == np.float32 and arrays["0.mu"].shape == (5,)
    assert sorted(Optimizer(OptimizerConfig("momentum"), 5).state_arrays()) == ["0.trace", "step"]
    assert sorted(Optimizer(OptimizerConfig("sgd"), 5).state_arrays()) == ["step"]


@pytest.mark.parametrize("name", NAMES)
def test_restored_state_continues_bit_identically(name: str) -> None:
    size = 1000
    config = OptimizerConfig(name, lr=0.05)
    grads = _vectors(13, 8, size)
    original = Optimizer(config, size)
    params = _run(original, _params(14, size), grads[:4])
    # As a store hands state back: fresh read-only arrays decoded from bytes.
    stored = {
        key: np.frombuffer(value.tobytes(), dtype=value.dtype).reshape(value.shape)
        for key, value in original.state_arrays().items()
    }
    restored = Optimizer(config, size)
    restored.load_state_arrays(stored)
    fresh = Optimizer(config, size)
    restored_params, fresh_params = params.copy(), params.copy()

    _run(original, params, grads[4:])
    _run(restored, restored_params, grads[4:])
    _run(fresh, fresh_params, grads[4:])
    assert _bits(restored_params) == _bits(params)
    assert restored.step == original.step == 8
    restored_arrays = restored.state_arrays()
    for key, value in original.state_arrays().items():
        assert _bits(restored_arrays[key]) == _bits(value), key
    if name != "sgd":  # the state matters, so skipping the load would have been caught
        assert _bits(fresh_params) != _bits(params)


def _loaded(name: str) -> tuple[Optimizer, dict[str, np.ndarray]]:
    opt = Optimizer(OptimizerConfig(name), 4)
    _run(opt, np.zeros(4, np.float32), _vectors(15, 3, 4))
    return opt, {k: v.copy() for k, v in opt.state_arrays().items()}


BAD_STATES: list[tuple[str, Callable[[dict[str, np.ndarray]], object], str]] = [
    ("adam", lambda s: s.pop("0.nu"), "missing"),
    ("sgd", lambda s: s.update(extra=np.zeros(4, np.float32)), "unexpected"),
    ("adam", lambda s: s.update({"0.nu": np.zeros(5, np.float32)}), "shape"),
    ("momentum", lambda s: s.update({"0.trace": np.zeros(4, np.float64)}), "float32"),
    ("adam", lambda s: s.update({"0.count": np.asarray(-1)}), "counter"),
    ("sgd", lambda s: s.update(step=np.asarray([3])), "counter"),
    ("adam", lambda s: s.update(step=np.asarray(1.5)), "counter"),
]


@pytest.mark.parametrize(("name", "corrupt", "match"), BAD_STATES)
def test_load_rejects_mismatched_state_and_changes_nothing(
    name: str, corrupt: Callable[[dict[str, np.ndarray]], object], match: str
) -> None:
    opt, before = _loaded(name)
    bad = {k: v + 1 if v.ndim else v for k, v in before.items()}  # valid but different values
    corrupt(bad)
    with pytest.raises(ValueError, match=match):
        opt.load_state_arrays(bad)
    after = opt.state_arrays()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        assert _bits(after[key]) == _bits(value), key


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "adagrad"}, "unknown optimizer"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": 1e-50}, "lr"),  # rounds to 0 in float32
        ({"lr": "fast"}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"b1": 1.5}, "b1"),
        ({"b2": 0.99999999}, "b2"),  # rounds to 1 in float32
        ({"b2": float("nan")}, "b2"),
        ({"eps": 0.0}, "eps"),
        ({"eps": True}, "eps"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        OptimizerConfig(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message  # one clear sentence


def test_config_accepts_edge_values() -> None:
    OptimizerConfig("momentum", momentum=0.0)
    OptimizerConfig("adam", b1=0.0, b2=0.0, eps=1e-30, lr=1e-30)


def test_apply_rejects_bad_buffers_and_changes_nothing() -> None:
    opt = Optimizer(OptimizerConfig("momentum"), 8)
    params = _params(16, 8)
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
    assert not opt.state_arrays()["0.trace"].any()
    with pytest.raises(ValueError, match="size"):
        Optimizer(OptimizerConfig(), -1)


# --- no param-sized allocation per step (what makes apply fast) ------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_apply_allocates_nothing_param_sized(name: str) -> None:
    size = 1 << 20  # 4 MiB of float32
    opt = Optimizer(OptimizerConfig(name), size)
    params = np.zeros(size, np.float32)
    grads = np.empty(size, np.float32)
    source = _vectors(17, 1, size)[0]
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
    assert peak < 1 << 20, f"apply allocated {peak} bytes at its peak for a 4 MiB vector"
    assert opt.step == 4

"""Models as flat float32 vectors: parsing, sizes, init, gradients, training (DESIGN §2, §3)."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from tether.data import Dataset, batch_indices, load_dataset, partition
from tether.tasks.builtin import Model, build_model
from tether.tasks.models import ModelSpec, parse_model


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def mlp(digits: Dataset) -> Model:
    return build_model(parse_model("mlp:64"), digits.in_dim, digits.num_classes)


def _reference_loss(params, x, y):
    """The model's loss written out independently of tether.tasks.models."""
    h = x
    for w, b in params[:-1]:
        h = jnp.maximum(h @ w + b, 0.0)
    w, b = params[-1]
    z = h @ w + b
    log_probs = z - jax.scipy.special.logsumexp(z, axis=1, keepdims=True)
    return -jnp.mean(log_probs[jnp.arange(len(y)), y])


def _numpy_loss64(params, x: np.ndarray, y: np.ndarray) -> float:
    h = x.astype(np.float64)
    for w, b in params[:-1]:
        h = np.maximum(h @ np.asarray(w, np.float64) + np.asarray(b, np.float64), 0.0)
    w, b = params[-1]
    z = h @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(len(y)), y]))


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("logreg", "logreg"),
        ("mlp", "mlp:64"),
        ("mlp:128", "mlp:128"),
        ("mlp:256x256", "mlp:256x256"),
        ("mlp:8x4x2", "mlp:8x4x2"),
    ],
)
def test_parse_model_round_trips_with_describe(text: str, canonical: str) -> None:
    spec = parse_model(text)
    assert spec.describe() == canonical
    assert parse_model(canonical) == spec


def test_parse_model_fields() -> None:
    assert parse_model("logreg") == ModelSpec("logreg", ())
    assert parse_model("mlp") == ModelSpec("mlp", (64,))
    assert parse_model("mlp:256x128") == ModelSpec("mlp", (256, 128))


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=5))
def test_any_mlp_spec_round_trips(hidden: list[int]) -> None:
    spec = ModelSpec("mlp", tuple(hidden))
    assert parse_model(spec.describe()) == spec


@pytest.mark.parametrize(
    "text",
    ["", "cnn", "MLP", "mlp:", "mlp:0", "mlp:64x", "mlp:x64", "mlp:64x0", "mlp:-1", "mlp:1.5",
     "mlp:64:64", "logreg:10", "mlp 64"],
)  # fmt: skip
def test_parse_model_rejects_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected 'logreg', 'mlp'"):
        parse_model(text)


@pytest.mark.parametrize(("name", "hidden"), [("cnn", ()), ("logreg", (4,)), ("mlp", ())])
def test_model_spec_rejects_inconsistent_fields(name: str, hidden: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        ModelSpec(name, hidden)


@pytest.mark.parametrize(
    ("text", "in_dim", "expected"),
    [
        ("logreg", 64, 64 * 10 + 10),
        ("mlp:64", 64, 64 * 64 + 64 + 64 * 10 + 10),
        ("mlp:32x16", 20, 20 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10),
    ],
)
def test_num_params_matches_arithmetic_and_init(text: str, in_dim: int, expected: int) -> None:
    model = build_model(parse_model(text), in_dim, 10)
    assert model.num_params == expected
    assert model.init_flat(0).shape == (expected,)


def test_num_params_of_a_large_model_needs_no_init() -> None:
    # 1024 -> 8192 -> 8192 -> 10 is 75M params (300 MB); building must not materialise them.
    model = build_model(parse_model("mlp:8192x8192"), 1024, 10)
    assert model.num_params == 1024 * 8192 + 8192 + 8192 * 8192 + 8192 + 8192 * 10 + 10


def test_init_is_deterministic_per_seed(mlp: Model) -> None:
    first = mlp.init_flat(3)
    assert first.dtype == np.float32
    assert first.flags.c_contiguous and first.flags.writeable
    expected = first.copy()
    first[:] = 0.0  # the caller owns the returned vector
    np.testing.assert_array_equal(mlp.init_flat(3), expected)
    assert not np.array_equal(mlp.init_flat(4), expected)


def test_init_layout_is_ravel_pytree_order(mlp: Model) -> None:
    flat = mlp.init_flat(0)
    params = mlp.unravel(flat)
    assert [tuple(a.shape) for layer in params for a in layer] == [(64, 64), (64,), (64, 10), (10,)]
    np.testing.assert_array_equal(np.asarray(ravel_pytree(params)[0]), flat)
    # Flat order w0, b0, w1, b1: the first 4096 entries are the first weight matrix, row-major.
    np.testing.assert_array_equal(flat[: 64 * 64].reshape(64, 64), np.asarray(params[0][0]))
    (w0, b0), (w1, b1) = params
    assert not np.any(np.asarray(b0)) and not np.any(np.asarray(b1))
    # He scale for the ReLU layer: std sqrt(2/64) ~ 0.177.
    assert 0.15 < float(jnp.std(w0)) < 0.2


def test_gradient_matches_jax_grad_on_the_pytree(mlp: Model, digits: Dataset) -> None:
    flat = mlp.init_flat(1)
    x, y = digits.x_train[:50], digits.y_train[:50]
    loss, grad = mlp.loss_and_grad(flat, x, y)
    params = mlp.unravel(flat)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(_reference_loss))(params, x, y)
    ref_flat, _ = ravel_pytree(ref_grads)
    assert grad.shape == (mlp.num_params,) and grad.dtype == np.float32
    np.testing.assert_allclose(loss, float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(grad, np.asarray(ref_flat), rtol=1e-4, atol=1e-6)
    assert np.abs(grad).max() > 1e-3


def test_gradient_matches_finite_differences() -> None:
    data = load_dataset("synthetic:8:64")
    model = build_model(parse_model("mlp:5"), 8, 10)
    flat = model.init_flat(2)
    flat[model.num_params - 10 :] = np.linspace(-0.5, 0.5, 10)  # non-zero output biases
    x, y = data.x_train[:16], data.y_train[:16]
    loss, grad = model.loss_and_grad(flat, x, y)
    base = flat.astype(np.float64)
    eps = 1e-4

    def loss64(vector: np.ndarray) -> float:
        # The documented flat layout, w0, b0, w1, b1, read in float64.
        w0, rest = vector[:40].reshape(8, 5), vector[40:]
        b0, w1, b1 = rest[:5], rest[5:55].reshape(5, 10), rest[55:]
        return _numpy_loss64([(w0, b0), (w1, b1)], x, y)

    np.testing.assert_allclose(loss, loss64(base), rtol=1e-5)
    for i in np.random.default_rng(0).choice(model.num_params, 12, replace=False):
        step = np.zeros_like(base)
        step[i] = eps
        numeric = (loss64(base + step) - loss64(base - step)) / (2 * eps)
        assert abs(grad[i] - numeric) < 1e-4 + 1e-3 * abs(numeric), i


def test_gradients_are_bit_identical_across_calls_and_instances(
    mlp: Model, digits: Dataset
) -> None:
    flat = mlp.init_flat(5)
    x, y = digits.x_train[:32], digits.y_train[:32]
    loss, grad = mlp.loss_and_grad(flat, x, y)
    expected = grad.copy()
    grad[:] = np.nan  # the returned gradient is the caller's: writing it must not leak back
    again_loss, again = mlp.loss_and_grad(flat, x, y)
    assert again_loss == loss
    assert again.tobytes() == expected.tobytes()
    fresh = build_model(mlp.spec, mlp.in_dim, mlp.num_classes)
    assert fresh.loss_and_grad(flat, x, y)[1].tobytes() == expected.tobytes()


def test_gradients_are_bit_identical_across_processes(mlp: Model, digits: Dataset) -> None:
    code = (
        "import hashlib, sys\n"
        "from tether.data import load_dataset\n"
        "from tether.tasks.builtin import build_model\n"
        "from tether.tasks.models import parse_model\n"
        "d = load_dataset('digits')\n"
        "m = build_model(parse_model('mlp:64'), d.in_dim, d.num_classes)\n"
        "loss, g = m.loss_and_grad(m.init_flat(5), d.x_train[:32], d.y_train[:32])\n"
        "print(hashlib.sha256(g.tobytes()).hexdigest(), float(loss).hex())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import hashlib

    loss, grad = mlp.loss_and_grad(mlp.init_flat(5), digits.x_train[:32], digits.y_train[:32])
    assert out.stdout.split() == [hashlib.sha256(grad.tobytes()).hexdigest(), loss.hex()]


def test_batch_gradient_is_the_mean_of_half_batch_gradients(mlp: Model, digits: Dataset) -> None:
    # BSP averages W workers' gradients and must equal one batch W times larger (DESIGN §3).
    flat = mlp.init_flat(7)
    x, y = digits.x_train[:64], digits.y_train[:64]
    loss, whole = mlp.loss_and_grad(flat, x, y)
    loss_a, half_a = mlp.loss_and_grad(flat, x[:32], y[:32])
    loss_b, half_b = mlp.loss_and_grad(flat, x[32:], y[32:])
    np.testing.assert_allclose(whole, (half_a + half_b) / 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss, (loss_a + loss_b) / 2, rtol=1e-6)
    assert not np.allclose(half_a, half_b)  # the halves differ, so the check has teeth


def test_evaluate_matches_an_independent_computation(mlp: Model, digits: Dataset) -> None:
    flat = mlp.init_flat(0)
    loss, accuracy = mlp.evaluate(flat, digits.x_test, digits.y_test)
    params = mlp.unravel(flat)
    np.testing.assert_allclose(loss, _numpy_loss64(params, digits.x_test, digits.y_test), 1e-5)
    h = np.maximum(digits.x_test @ np.asarray(params[0][0]) + np.asarray(params[0][1]), 0)
    predicted = np.argmax(h @ np.asarray(params[1][0]) + np.asarray(params[1][1]), axis=1)
    assert accuracy == pytest.approx(np.mean(predicted == digits.y_test), abs=1e-6)


def test_adam_on_digits_mlp_reaches_90_percent(mlp: Model, digits: Dataset) -> None:
    flat = mlp.init_flat(0)
    m, v = np.zeros_like(flat), np.zeros_like(flat)
    lr, beta1, beta2, eps = 0.01, 0.9, 0.999, 1e-8
    part = partition(len(digits.y_train), 1, 0)
    losses = []
    for step in range(300):
        idx = batch_indices(part, 32, 0, 0, step)
        loss, grad = mlp.loss_and_grad(flat, digits.x_train[idx], digits.y_train[idx])
        losses.append(loss)
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        m_hat = m / (1 - beta1 ** (step + 1))
        v_hat = v / (1 - beta2 ** (step + 1))
        flat -= (lr * m_hat / (np.sqrt(v_hat) + eps)).astype(np.float32)
    test_loss, accuracy = mlp.evaluate(flat, digits.x_test, digits.y_test)
    assert accuracy >= 0.90, accuracy
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:20])


def test_bad_shapes_are_rejected(mlp: Model, digits: Dataset) -> None:
    flat = mlp.init_flat(0)
    x, y = digits.x_train[:8], digits.y_train[:8]
    with pytest.raises(ValueError, match="flat vector of 4810"):
        mlp.loss_and_grad(flat[:-1], x, y)
    with pytest.raises(ValueError, match=r"\(batch, 64\)"):
        mlp.loss_and_grad(flat, x[:, :10], y)
    with pytest.raises(ValueError, match=r"\(batch, 64\)"):
        mlp.evaluate(flat, x, y[:4])
    with pytest.raises(ValueError, match=r"batch >= 1"):
        mlp.loss_and_grad(flat, x[:0], y[:0])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        mlp.loss_and_grad(flat, x, np.full(8, 10))


def _missing_backends() -> list[str]:
    missing = []
    for kind in ("gpu", "tpu"):
        try:
            jax.devices(kind)
        except RuntimeError:
            missing.append(kind)
    return missing


@pytest.mark.parametrize("device", _missing_backends())
def test_unavailable_device_is_a_clear_value_error(device: str) -> None:
    with pytest.raises(ValueError, match=f"^no {device} device is available to JAX: "):
        build_model(parse_model("logreg"), 64, 10, device=device)


def test_unknown_device_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="expected one of cpu, gpu, tpu"):
        build_model(parse_model("logreg"), 64, 10, device="quantum")


def test_model_runs_on_the_requested_device() -> None:
    model = build_model(parse_model("logreg"), 64, 10, device="cpu")
    assert model.device == jax.devices("cpu")[0]

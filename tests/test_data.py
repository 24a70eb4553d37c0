"""Data sets and deterministic batches (DESIGN §3, §5)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.data import Dataset, batch_indices, load_dataset, partition


def _centroid_accuracy(data: Dataset) -> float:
    """Test accuracy of a nearest-class-direction classifier: a cheap linear learnability probe."""
    means = np.stack([data.x_train[data.y_train == c].mean(axis=0) for c in range(10)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    predicted = np.argmax(data.x_test @ means.T, axis=1)
    return float(np.mean(predicted == data.y_test))


def _check_arrays(data: Dataset, n_train: int, n_test: int, dim: int) -> None:
    assert data.x_train.shape == (n_train, dim)
    assert data.x_test.shape == (n_test, dim)
    assert data.y_train.shape == (n_train,)
    assert data.y_test.shape == (n_test,)
    assert data.in_dim == dim
    assert data.num_classes == 10
    for x in (data.x_train, data.x_test):
        assert x.dtype == np.float32
        assert x.flags.c_contiguous
        assert np.isfinite(x).all()
    for y in (data.y_train, data.y_test):
        assert y.dtype == np.int32
        assert set(np.unique(y)) == set(range(10))


def test_digits_shapes_ranges_and_split() -> None:
    data = load_dataset("digits")
    _check_arrays(data, n_train=1438, n_test=359, dim=64)
    assert data.name == "digits"
    for x in (data.x_train, data.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
        # Raw pixels are integers 0..16, so scaled values are exact multiples of 1/16.
        np.testing.assert_array_equal(x * 16, np.round(x * 16))


def test_digits_split_is_fixed_and_a_true_split() -> None:
    first, second = load_dataset("digits"), load_dataset("digits")
    np.testing.assert_array_equal(first.x_test, second.x_test)
    np.testing.assert_array_equal(first.y_train, second.y_train)
    # Pinned so that the split cannot drift between versions: accuracies of old and new runs
    # are only comparable on the same test set.
    digest = hashlib.sha256(first.y_test.tobytes() + first.x_test.tobytes()).hexdigest()
    assert digest[:16] == "9e8c5df452a4d11d"
    train_rows = {row.tobytes() for row in np.c_[first.x_train, first.y_train]}
    test_rows = {row.tobytes() for row in np.c_[first.x_test, first.y_test]}
    assert (len(train_rows), len(test_rows)) == (1438, 359)  # digits has no duplicate rows
    assert not train_rows & test_rows


def test_digits_matches_sklearn_and_does_not_import_it() -> None:
    code = (
        "import sys; from tether.data import load_dataset; d = load_dataset('digits'); "
        "print('sklearn' in sys.modules, len(d.y_train) + len(d.y_test))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "1797"]

    from sklearn.datasets import load_digits

    reference = load_digits()
    data = load_dataset("digits")
    ours = np.c_[np.r_[data.x_train, data.x_test] * 16, np.r_[data.y_train, data.y_test]]
    theirs = np.c_[reference.data, reference.target]
    np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(theirs, axis=0))


def test_synthetic_default_and_custom_shapes() -> None:
    _check_arrays(load_dataset("synthetic"), n_train=8192, n_test=2048, dim=64)
    _check_arrays(load_dataset("synthetic:32"), n_train=8192, n_test=2048, dim=32)
    small = load_dataset("synthetic:16:400")
    _check_arrays(small, n_train=400, n_test=100, dim=16)
    assert small.name == "synthetic:16:400"


def test_synthetic_is_deterministic() -> None:
    first, second = load_dataset("synthetic:48:1000"), load_dataset("synthetic:48:1000")
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)
    other = load_dataset("synthetic:48:2000")
    assert not np.array_equal(first.x_train, other.x_train[:1000])


def test_synthetic_is_learnable_and_roughly_balanced() -> None:
    data = load_dataset("synthetic")
    assert _centroid_accuracy(data) > 0.7
    counts = np.bincount(data.y_train, minlength=10)
    assert counts.min() > 0.5 * counts.mean()


def test_synthetic_scales_to_wide_inputs() -> None:
    start = time.perf_counter()
    data = load_dataset("synthetic:1024")
    elapsed = time.perf_counter() - start
    _check_arrays(data, n_train=8192, n_test=2048, dim=1024)
    # About 0.2 s on a laptop core; the bound only catches a per-feature Python loop.
    assert elapsed < 5.0
    assert _centroid_accuracy(data) > 0.3


@pytest.mark.parametrize(
    "name",
    [
        "",
        "mnist",
        "Digits",
        " digits",
        "synthetic:",
        "synthetic:0",
        "synthetic:-5",
        "synthetic:abc",
        "synthetic:64:3",
        "synthetic:64:100:5",
        "synthetic:1_000",
        "synthetic:+8",
    ],
)
def test_bad_dataset_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match=r"'digits', 'synthetic', 'synthetic:D'"):
        load_dataset(name)


@given(n=st.integers(0, 500), num_workers=st.integers(1, 17))
def test_partitions_cover_all_indices_disjointly(n: int, num_workers: int) -> None:
    parts = [partition(n, num_workers, w) for w in range(num_workers)]
    for worker_id, part in enumerate(parts):
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)
        assert np.all(part % num_workers == worker_id)
    every = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(every), np.arange(n))


@pytest.mark.parametrize("args", [(10, 0, 0), (10, 2, 2), (10, 2, -1), (-1, 2, 0), (10, 2.0, 0)])
def test_partition_rejects_bad_arguments(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        partition(*args)


def test_batch_indices_follow_the_documented_formula() -> None:
    # The formula is the contract that lets a restarted worker (possibly a newer build) resume
    # at the same samples (DESIGN §5), so it is checked literally.
    part = partition(1000, 3, 2)
    seed, worker_id, batch = 7, 2, 25
    per_epoch = len(part) // batch
    for clock in (0, 1, per_epoch - 1, per_epoch, 5 * per_epoch + 3):
        epoch, k = divmod(clock, per_epoch)
        perm = np.random.default_rng([seed, worker_id, epoch]).permutation(len(part))
        expected = part[perm[k * batch : (k + 1) * batch]]
        np.testing.assert_array_equal(batch_indices(part, batch, seed, worker_id, clock), expected)


def test_batch_indices_are_deterministic_and_within_the_partition() -> None:
    part = partition(500, 4, 1)
    first = batch_indices(part, 16, 3, 1, 9)
    assert first.dtype == np.int64 and first.shape == (16,)
    assert np.isin(first, part).all()
    assert len(np.unique(first)) == 16
    expected = first.copy()
    first[:] = -1  # a caller scribbling on its batch must not change the next answer
    np.testing.assert_array_equal(batch_indices(part, 16, 3, 1, 9), expected)


@pytest.mark.parametrize("part_size", [120, 127])
def test_each_epoch_visits_the_partition_once(part_size: int) -> None:
    part = np.arange(part_size, dtype=np.int64) * 5 + 3
    batch = 10
    per_epoch = part_size // batch
    epochs = []
    for epoch in range(3):
        clocks = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        seen = np.concatenate([batch_indices(part, batch, 0, 0, c) for c in clocks])
        assert len(np.unique(seen)) == per_epoch * batch  # no sample twice within an epoch
        assert np.isin(seen, part).all()
        if part_size % batch == 0:
            np.testing.assert_array_equal(np.sort(seen), part)
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_batches_differ_across_clocks_workers_and_seeds() -> None:
    part = partition(4000, 1, 0)
    base = batch_indices(part, 32, 0, 0, 0)
    assert not np.array_equal(base, batch_indices(part, 32, 0, 0, 1))
    assert not np.array_equal(base, batch_indices(part, 32, 0, 1, 0))
    assert not np.array_equal(base, batch_indices(part, 32, 1, 0, 0))


@pytest.mark.parametrize(
    ("batch_size", "seed", "worker_id", "clock"),
    [(0, 0, 0, 0), (-4, 0, 0, 0), (8, 0, 0, -1), (8, -1, 0, 0), (8, 0, -1, 0), (8, 0, 0, 1.5)],
)
def test_batch_indices_reject_bad_arguments(
    batch_size: int, seed: int, worker_id: int, clock: int
) -> None:
    with pytest.raises(ValueError):
        batch_indices(np.arange(100), batch_size, seed, worker_id, clock)


def test_batch_larger_than_partition_is_rejected() -> None:
    with pytest.raises(ValueError, match="larger than this worker's partition"):
        batch_indices(partition(10, 2, 0), 6, 0, 0, 0)
    with pytest.raises(ValueError, match="1-D"):
        batch_indices(np.arange(100).reshape(10, 10), 5, 0, 0, 0)

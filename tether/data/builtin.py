"""The built-in data sets of `--dataset`: the 8x8 digits and synthetic classification data.

The digits are UCI's optical digits as scikit-learn bundles them, shipped with Tether as
`digits.npz` (written from scikit-learn's copy by `scripts/gen_digits.py`; the same values in the
same order), so they need no scikit-learn. Which records a worker reads at which clock is
`tether.data.batches`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Both data sets have ten classes: digits by nature, synthetic by construction.
NUM_CLASSES = 10

_DIGITS_TEST_FRACTION = 0.2
# Seeds of the fixed generators. They never depend on a run's --seed: the data set and its
# train/test split must be the same in every run so that accuracies are comparable.
_DIGITS_SPLIT_SEED = 0
_SYNTHETIC_SEED = 20240601

_SYNTHETIC_DEFAULT_DIM = 64
_SYNTHETIC_DEFAULT_TRAIN = 8192
_SYNTHETIC_RE = re.compile(r"synthetic(?::([0-9]+)(?::([0-9]+))?)?")

_NAME_FORMS = (
    "'digits', 'synthetic', 'synthetic:D' or 'synthetic:D:N' "
    "(D features >= 1, N training samples >= 4)"
)


@dataclass(frozen=True, slots=True)
class Dataset:
    """A classification data set held in memory: float32 inputs, int32 labels."""

    name: str
    x_train: np.ndarray  # float32 (n, d), C-contiguous
    y_train: np.ndarray  # int32 (n,)
    x_test: np.ndarray  # float32 (m, d), C-contiguous
    y_test: np.ndarray  # int32 (m,)
    num_classes: int

    @property
    def in_dim(self) -> int:
        return int(self.x_train.shape[1])


def load_dataset(name: str) -> Dataset:
    """Load a data set by name: 'digits', 'synthetic', 'synthetic:D' or 'synthetic:D:N'."""
    if name == "digits":
        return _load_digits()
    match = _SYNTHETIC_RE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"unknown dataset {name!r}: expected {_NAME_FORMS}.")
    dim = int(match.group(1)) if match.group(1) else _SYNTHETIC_DEFAULT_DIM
    n_train = int(match.group(2)) if match.group(2) else _SYNTHETIC_DEFAULT_TRAIN
    if dim < 1 or n_train < 4:
        raise ValueError(f"bad dataset {name!r}: expected {_NAME_FORMS}.")
    return _make_synthetic(name, dim, n_train)


DIGITS_FILE = Path(__file__).resolve().parent / "digits.npz"


def _load_digits() -> Dataset:
    # 1797 records of 64 pixel values in 0..16 (uint8 `pixels`) and their labels (`labels`), in
    # the order of scikit-learn's digits.csv.gz.
    with np.load(DIGITS_FILE, allow_pickle=False) as npz:
        pixels, labels = npz["pixels"], npz["labels"]
    x = pixels.astype(np.float32) / np.float32(16.0)
    y = labels.astype(np.int32)
    n = len(y)
    perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(n)
    n_test = int(n * _DIGITS_TEST_FRACTION)
    # The file is sorted in label cycles; keeping the permuted order (not re-sorting) means the
    # strided partitions of `partition` each get a shuffled mix of classes.
    test, train = perm[:n_test], perm[n_test:]
    return Dataset(
        name="digits",
        x_train=np.ascontiguousarray(x[train]),
        y_train=np.ascontiguousarray(y[train]),
        x_test=np.ascontiguousarray(x[test]),
        y_test=np.ascontiguousarray(y[test]),
        num_classes=NUM_CLASSES,
    )


def _make_synthetic(name: str, dim: int, n_train: int) -> Dataset:
    """Gaussian inputs labelled by the argmax of a fixed random linear "teacher"."""
    # The teacher depends on D only, so 'synthetic:D:N' for several N are the same problem with
    # more or fewer samples. Unit-norm columns make every class equally likely.
    teacher_rng = np.random.default_rng([_SYNTHETIC_SEED, dim])
    teacher = teacher_rng.standard_normal((dim, NUM_CLASSES), dtype=np.float32)
    teacher /= np.linalg.norm(teacher, axis=0, keepdims=True)

    n_test = n_train // 4
    sample_rng = np.random.default_rng([_SYNTHETIC_SEED, dim, n_train])
    # float32 draws straight into one buffer keep D=1024 at tens of milliseconds.
    x = sample_rng.standard_normal((n_train + n_test, dim), dtype=np.float32)
    y = np.argmax(x @ teacher, axis=1).astype(np.int32)
    return Dataset(
        name=name,
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_test=x[n_train:],
        y_test=y[n_train:],
        num_classes=NUM_CLASSES,
    )

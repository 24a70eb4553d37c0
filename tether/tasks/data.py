"""Data sets and deterministic mini-batches for workers.

A worker owns a fixed slice of the training set (`partition`) and draws its mini-batch for
clock c with `batch_indices`, a pure function of (seed, worker id, clock). That purity is what
lets a restarted worker reposition its data cursor from the clock it reads back from the
shards, with no cursor state of its own (DESIGN §5, worker recovery).
"""

from __future__ import annotations

import functools
import importlib.util
import operator
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


def _digits_path() -> Path:
    # find_spec locates the installed package without executing sklearn/__init__.py, whose
    # import costs about a second in every worker process.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the 'digits' dataset needs scikit-learn installed, and it is not.")
    root = Path(next(iter(spec.submodule_search_locations)))
    return root / "datasets" / "data" / "digits.csv.gz"


def _load_digits() -> Dataset:
    # 1797 rows of 64 pixel values in 0..16 followed by the label; numpy reads the .gz directly.
    table = np.loadtxt(_digits_path(), delimiter=",", dtype=np.float32)
    x = table[:, :-1] / np.float32(16.0)
    y = table[:, -1].astype(np.int32)
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


def _checked_int(name: str, value: int, minimum: int) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}.") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}.")
    return number


def partition(n: int, num_workers: int, worker_id: int) -> np.ndarray:
    """Sorted int64 indices i in [0, n) with i % num_workers == worker_id: this worker's slice."""
    n = _checked_int("n", n, 0)
    num_workers = _checked_int("num_workers", num_workers, 1)
    worker_id = _checked_int("worker_id", worker_id, 0)
    if worker_id >= num_workers:
        raise ValueError(f"worker_id must be < num_workers={num_workers}, got {worker_id}.")
    return np.arange(worker_id, n, num_workers, dtype=np.int64)


def batches_per_epoch(part_size: int, batch_size: int) -> int:
    """Full batches in one pass over a partition; the remainder is left out of that epoch."""
    batch_size = _checked_int("batch_size", batch_size, 1)
    count = part_size // batch_size
    if count < 1:
        raise ValueError(
            f"batch_size {batch_size} is larger than this worker's partition of {part_size} "
            "samples; use a smaller batch size or fewer workers."
        )
    return count


def batch_indices(
    part: np.ndarray, batch_size: int, seed: int, worker_id: int, clock: int
) -> np.ndarray:
    """The data indices of the mini-batch for iteration `clock` (DESIGN §3, §5).

    A pure function of its arguments: epoch e = clock // batches_per_epoch is a permutation of
    `part` drawn from (seed, worker_id, e), and the batch is its k-th slice of `batch_size`.
    """
    part = np.asarray(part)
    if part.ndim != 1:
        raise ValueError(f"part must be a 1-D array of indices, got shape {part.shape}.")
    seed = _checked_int("seed", seed, 0)
    worker_id = _checked_int("worker_id", worker_id, 0)
    clock = _checked_int("clock", clock, 0)
    per_epoch = batches_per_epoch(len(part), batch_size)
    epoch, k = divmod(clock, per_epoch)
    perm = _epoch_permutation(seed, worker_id, epoch, len(part))
    return part[perm[k * batch_size : (k + 1) * batch_size]]


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, worker_id: int, epoch: int, size: int) -> np.ndarray:
    # Consecutive clocks share an epoch, so caching the permutation saves an O(n) shuffle per
    # step. The result is frozen because the cache hands the same array to every caller.
    perm = np.random.default_rng([seed, worker_id, epoch]).permutation(size)
    perm.setflags(write=False)
    return perm

"""A task's input data (DESIGN §11): datasets in the store, the built-in data sets, and which
records a worker reads at which clock.

    import tether.data

    class Digits(tether.Task):
        data = tether.data.StoredDataset("digits")

        def batch(self, ctx, clock):
            b = self.data.batch(ctx, clock)   # {"x": float32 (B, 64), "y": int64 (B,)}
            return b["x"], b["y"]

The modules, each imported on first use of one of its names here:

- :mod:`tether.data.reader`: :class:`StoredDataset` (a worker's partition, read from the store
  on a background thread) and :func:`read_records`;
- :mod:`tether.data.importer`: :func:`import_file`, :func:`import_table` and :func:`read_file`
  (``tether data import``), over :mod:`tether.data.schema` (what records become);
- :mod:`tether.data.batches`: :func:`partition`, :func:`record_range`, :func:`batch_indices`;
- :mod:`tether.data.builtin`: the built-in data sets of ``--dataset`` (:func:`load_dataset`).

The stored layout (header, chunks, codec) is the store's: :mod:`tether.store.datasets`. The
command line is :mod:`tether.cli.data`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tether.data.batches import batch_indices, batches_per_epoch, partition, record_range
    from tether.data.builtin import NUM_CLASSES, Dataset, load_dataset
    from tether.data.importer import import_file, import_table, read_file
    from tether.data.reader import StoredDataset, read_records
    from tether.store.datasets import MASK_SUFFIX

_HOME = {
    "StoredDataset": "tether.data.reader",
    "read_records": "tether.data.reader",
    "import_file": "tether.data.importer",
    "import_table": "tether.data.importer",
    "read_file": "tether.data.importer",
    "partition": "tether.data.batches",
    "record_range": "tether.data.batches",
    "batch_indices": "tether.data.batches",
    "batches_per_epoch": "tether.data.batches",
    "Dataset": "tether.data.builtin",
    "load_dataset": "tether.data.builtin",
    "NUM_CLASSES": "tether.data.builtin",
    "MASK_SUFFIX": "tether.store.datasets",
}

__all__ = [
    "MASK_SUFFIX",
    "NUM_CLASSES",
    "Dataset",
    "StoredDataset",
    "batch_indices",
    "batches_per_epoch",
    "import_file",
    "import_table",
    "load_dataset",
    "partition",
    "read_file",
    "read_records",
    "record_range",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'tether.data' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)

"""What a shard holds, by table (DESIGN §2, §5): each table applies its part of an update,
replays it from the log, gives and loads its part of a base, and serves reads. The protocol
around them (`state.py`: epochs, clocks, de-duplication, durability) is the same for every
table, as optax's `partition` runs one transformation per label over one shared step.

Today's one table is `DenseSlice`, the shard's contiguous slice of the flat parameter vector
with its optimizer; a push's part for it is the slice's gradient. A log entry or base names a
table's arrays `"{table}.{name}"` (the codec adds the prefix).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from tether.config import OptimizerConfig
from tether.wire import DEFAULT_CHUNK_BYTES, FLOAT, chunk_bytes_of

from .messages import Code, Reject
from .optim import Optimizer


class Table(Protocol):
    """One named table of a shard. An update part is whatever the table's pushes carry."""

    def check(self, part: Any, who: str) -> Reject | None:
        """Judge a part before anything changes (shape, dtype, finiteness): a Reject or None."""

    def hold(self, worker_id: int, part: Any) -> None:
        """Keep a worker's part of an open BSP clock until every member pushed it."""

    def held(self) -> Sequence[int]:
        """The workers whose part of the open BSP clock is held."""

    def aggregate(self, ids: Sequence[int]) -> Any:
        """The open clock's update: the held parts of `ids` combined in that order (and
        forgotten), so the result does not depend on the order they arrived in."""

    def apply(self, part: Any) -> dict[str, np.ndarray]:
        """Apply one update; return the arrays that redo it exactly (its log part)."""

    def replay(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Redo an update from its log part, exactly as `apply` did it."""

    def base_parts(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON meta, named live arrays) of the table's part of a base (copy before use)."""

    def load(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Take a base's part (the inverse of `base_parts`)."""

    @property
    def nbytes(self) -> int:
        """Bytes of the table's part of a base."""

    def validate(self) -> None:
        """Raise AssertionError when the table's own invariants are broken."""


class DenseSlice:
    """A shard's slice of the flat parameter vector (DESIGN §2) and its optimizer state (§4).

    Under BSP it also keeps the parameters of the previous version (a worker restarted between
    its pushes to two shards must recompute its gradient from the same parameters, DESIGN §5)
    and the gradients held for the open clock.
    """

    def __init__(
        self,
        params: np.ndarray,
        optimizer: OptimizerConfig,
        *,
        offset: int,
        keeps_previous: bool,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        transformation: Any = None,
    ) -> None:
        if params.ndim != 1:
            raise ValueError(f"a dense slice is a flat vector, got shape {params.shape}")
        self.length = int(params.shape[0])
        self.params = np.array(params, dtype=FLOAT, copy=True)
        # The offset aligns the optimizer's compiled blocks to the run's flat vector, so every
        # element goes through the same code whatever the shard count (DESIGN §3, §4).
        self.optimizer = Optimizer(
            optimizer, self.length, offset=offset, transformation=transformation
        )
        self.prev_params = self.params.copy() if keeps_previous else None
        self.pending: dict[int, np.ndarray] = {}  # BSP: worker id -> gradient of the open clock
        self.chunk_bytes = chunk_bytes

    # -- updates ------------------------------------------------------------------------------

    def check(self, part: Any, who: str) -> Reject | None:
        if not isinstance(part, np.ndarray) or part.dtype != FLOAT or part.shape != (self.length,):
            return Reject(Code.INVALID_ARGUMENT, "gradient is not a flat float32 vector")
        if not _all_finite(part):
            return Reject(Code.INVALID_ARGUMENT, f"gradient from {who} contains NaN or Inf")
        return None

    def hold(self, worker_id: int, part: np.ndarray) -> None:
        self.pending[worker_id] = part

    def held(self) -> Sequence[int]:
        return sorted(self.pending)

    def aggregate(self, ids: Sequence[int]) -> np.ndarray:
        # Sum in worker-id order, then average: the order is fixed so results are bit-for-bit
        # reproducible and independent of arrival order (DESIGN §3).
        total = self.pending.pop(ids[0])
        for w in ids[1:]:
            np.add(total, self.pending.pop(w), out=total)
        np.divide(total, np.float32(len(ids)), out=total)
        return total

    def apply(self, part: np.ndarray) -> dict[str, np.ndarray]:
        """The optimizer only reads `part`, so the gradient itself is the log part: it is what
        redoes the update exactly (DESIGN §5)."""
        if self.prev_params is not None:
            np.copyto(self.prev_params, self.params)
        self.optimizer.apply(self.params, part)
        return {"grad": part}

    def replay(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.apply(arrays["grad"])

    # -- reads ----------------------------------------------------------------------------------

    def serve(self, previous: bool, into: np.ndarray | None) -> tuple[bytes, ...]:
        """The current (or, under BSP, the previous) parameters as wire chunks, or copied into
        `into` (a same-host segment: no chunks). One copy, taken under the shard's lock, so no
        update interleaves with it."""
        params = self.prev_params if previous and self.prev_params is not None else self.params
        if into is not None:
            np.copyto(into, params)
            return ()
        return tuple(chunk_bytes_of(params, self.chunk_bytes))

    # -- bases ----------------------------------------------------------------------------------

    def base_parts(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"params": self.params}
        if self.prev_params is not None:
            arrays["prev_params"] = self.prev_params
        scalars = {}
        for name, value in self.optimizer.state_arrays().items():
            if value.ndim == 0:
                scalars[name] = int(value)
            else:
                arrays[f"opt.{name}"] = value
        return {"optimizer_scalars": scalars}, arrays

    def load(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        params = np.asarray(arrays["params"])
        if params.shape != (self.length,):
            raise ValueError(f"a base holds {params.shape} params, the slice {self.length}")
        opt = {k[len("opt.") :]: v for k, v in arrays.items() if k.startswith("opt.")}
        opt.update({k: np.array(v, dtype=np.int64) for k, v in meta["optimizer_scalars"].items()})
        self.optimizer.load_state_arrays(opt)
        self.params = np.array(params, dtype=FLOAT, copy=True)
        if self.prev_params is not None:
            self.prev_params = np.array(arrays["prev_params"], dtype=FLOAT, copy=True)

    @property
    def nbytes(self) -> int:
        """Parameters, previous parameters and per-element optimizer state (fixed for a slice:
        the shapes never change)."""
        arrays = self.optimizer.state_arrays().values()
        n = self.params.nbytes + sum(a.nbytes for a in arrays if a.ndim == 1 and a.size > 1)
        return n + (0 if self.prev_params is None else self.prev_params.nbytes)

    def validate(self) -> None:
        assert self.params.dtype == FLOAT and self.params.shape == (self.length,)
        if self.prev_params is not None:
            assert self.prev_params.dtype == FLOAT and self.prev_params.shape == (self.length,)
        else:
            assert not self.pending, "only a BSP slice holds gradients"
        for w, g in self.pending.items():
            assert g.dtype == FLOAT and g.shape == (self.length,), (w, g.shape)


def _all_finite(a: np.ndarray) -> bool:
    # A finite sum proves every element finite (NaN and Inf propagate); only when the sum is not
    # finite (Inf/NaN, or overflow of large finite values) is the full elementwise check paid.
    # The float32 sum allocates nothing and is 4x faster than a float64 one on the push path.
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(np.add.reduce(a))):
            return True
    return bool(np.isfinite(a).all())

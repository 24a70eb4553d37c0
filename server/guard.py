"""The gradient-norm guard (DESIGN §10): a defence against a buggy worker, off by default.

A shard refuses a push whose gradient norm exceeds `factor` times the median norm of the last
`window` pushes it accepted, once it has accepted `warmup` of them (so early training, whose
norms move fast, is never judged on too few). The norm is the L2 norm of the push's part for
the shard's dense slice, accumulated in float64: each shard sees only its slice, so the guard is
per slice, and a worker whose gradient is wild in one slice is refused by that shard alone.

The guard only reads the gradient, never changes it, so with nothing refused a run is bit
for bit the run without it. Its window is a heuristic, not shard state: it is neither logged
nor replicated, and a restarted shard starts with an empty one that refills from the pushes it
accepts; replaying the log never touches it. A median of 0 (a slice whose accepted gradients
were all zero) gives no scale and refuses nothing.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from tether.config import GradientGuard

from .messages import Code, Reject

# Elements per float64 block of the norm: the accumulation is float64 without a float64 copy
# of the whole slice on the push path.
_BLOCK = 1 << 16


def l2_norm(values: np.ndarray) -> float:
    """The L2 norm of a float32 vector, each block squared and summed in float64."""
    total = 0.0
    for start in range(0, values.shape[0], _BLOCK):
        block = values[start : start + _BLOCK].astype(np.float64)
        total += float(np.dot(block, block))
    return math.sqrt(total)


class NormGuard:
    """The recent accepted norms of one shard's slice, and the judgement of a new one."""

    def __init__(self, policy: GradientGuard, shard_id: int) -> None:
        self.policy = policy
        self.shard_id = shard_id
        self.norms: deque[float] = deque(maxlen=policy.window)
        self.rejected = 0  # pushes refused by the guard since this shard process started

    @property
    def on(self) -> bool:
        return self.policy.factor is not None

    def median(self) -> float | None:
        """The median of the window once it holds `warmup` norms; None before."""
        if len(self.norms) < self.policy.warmup:
            return None
        return float(np.median(np.fromiter(self.norms, dtype=np.float64)))

    def check(self, norm: float, who: str) -> Reject | None:
        """Refuse `norm` when it exceeds the factor times the median (counting the refusal)."""
        factor, median = self.policy.factor, self.median()
        if factor is None or median is None or median <= 0 or norm <= factor * median:
            return None
        self.rejected += 1
        return Reject(
            Code.INVALID_ARGUMENT,
            f"gradient norm {norm:.3g} from {who} exceeds {factor:g}× the median {median:.3g} "
            f"of the last {len(self.norms)} accepted pushes on shard {self.shard_id} "
            "(--reject-grad-norm)",
        )

    def accepted(self, norm: float) -> None:
        self.norms.append(norm)

    def validate(self) -> None:
        assert len(self.norms) <= self.policy.window
        assert all(math.isfinite(n) and n >= 0 for n in self.norms), self.norms
        assert self.on or (not self.norms and not self.rejected), "an off guard judged a push"

"""The timing loop every benchmark shares, and the task's own gradient step to time against.

JAX is imported inside `model_step` only: `interleaved_medians` is also the timing loop of
`tether bench pushpull`, and the `tether` command must start without JAX.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tether.tasks.runtime import TaskRuntime


def interleaved_times(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds of each function in every round; a round runs every function once, in turn."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int
) -> dict[str, float]:
    """Median seconds of each function over rounds that run every function once, in turn."""
    times = interleaved_times(fns, repeats, warmup)
    return {name: statistics.median(ts) for name, ts in times.items()}


def model_step(runtime: TaskRuntime, params: Any, batch: Any) -> Callable[[], Any]:
    """The task's own gradient step on device-resident parameters, blocking on the result."""
    import jax

    has_aux = isinstance(jax.eval_shape(runtime.task.loss, params, batch), tuple)
    grad = jax.jit(jax.value_and_grad(runtime.task.loss, has_aux=has_aux))
    params = jax.device_put(params, runtime.device)
    batch = jax.device_put(batch, runtime.device)
    return lambda: jax.block_until_ready(grad(params, batch))

"""`tether bench step`: the worker's gradient step against the task's own (DESIGN §11).

Both run in this process on the same parameters and the same batch, in interleaved rounds (so a
drift of a shared machine's speed hits both alike), after warm-up rounds that absorb the
compilation:

- model: the task's own jitted `value_and_grad(loss)` on parameters already on the device, until
  the gradient is ready: what a single-process training loop pays per step;
- worker: `TaskRuntime.step` from the flat float32 buffer a pull lands in to the gradient ready to
  push (its leaves on the host, in flat order): the tree of views, any device transfer, the
  gradient and its host views.

The ratio worker/model is the worker's overhead; DESIGN §11's target is <= 1.1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tether.bench.timing import interleaved_medians, model_step
from tether.tasks.api import TaskContext

if TYPE_CHECKING:
    from tether.tasks.runtime import TaskRuntime


def bench_step(
    runtime: TaskRuntime, ctx: TaskContext, repeats: int = 30, warmup: int = 3
) -> dict[str, Any]:
    if repeats < 1 or warmup < 1:
        raise ValueError("--repeats and --warmup must be >= 1")
    flat = runtime.init_flat(ctx.seed)
    batch = runtime.task.batch(ctx, 0)
    t = interleaved_medians(
        {
            "model": model_step(runtime, runtime.layout.views(flat.copy()), batch),
            "worker": lambda: runtime.step(flat, batch),
        },
        repeats,
        warmup,
    )
    return {
        "num_params": runtime.num_params,
        "batch_size": ctx.batch_size,
        "device": str(runtime.device),
        "repeats": repeats,
        "model_step_ms": t["model"] * 1e3,
        "worker_step_ms": t["worker"] * 1e3,
        "ratio": t["worker"] / t["model"],
        "model_steps_per_s": 1 / t["model"],
    }

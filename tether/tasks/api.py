"""The task API: the user's model and data, as every shard and worker loads it (DESIGN §11).

A task is any object with `init`, `loss` and `batch` (subclassing `Task` is optional and only
documents the contract). Tether never looks inside the parameters: it sees the pytree's leaves
in `jax.tree_util` order, each raveled into one flat float32 vector (DESIGN §2), and hands the
user's functions the same tree back, built from views of the pulled buffer.

    import jax, jax.numpy as jnp, numpy as np, tether

    class LinearRegression(tether.Task):
        def init(self, key):
            return {"w": jnp.zeros(8), "b": jnp.zeros(())}

        def loss(self, params, batch):
            x, y = batch
            return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

        def batch(self, ctx, clock):
            rng = np.random.default_rng([ctx.seed, ctx.worker_id, clock])
            ...

    task = LinearRegression()   # tether launch --task linreg.py:task
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tether.roles import TaskRole


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a task's `batch` and `evaluate` may depend on.

    `batch(ctx, clock)` must be a pure function of (`seed`, `worker_id`, `num_workers`, `clock`)
    and the task's own constants: that is what makes BSP bit-identical run to run and lets a
    restarted worker redo an iteration exactly (DESIGN §3, §5).
    """

    seed: int
    worker_id: int  # 0..num_workers-1; 0 for the driver's evaluation
    num_workers: int
    batch_size: int  # --batch-size: per worker, per clock
    steps: int  # clocks per worker in the run
    role: TaskRole = "worker"  # the process: "worker", "server" (a shard) or "driver"
    run_id: str = ""
    store_uri: str = ""  # where `tether.data.StoredDataset` reads its records from
    device: str = "cpu"


class Task:
    """Base class of a task. Override `init`, `loss` and `batch`; the rest is optional.

    - ``init(key) -> params``: any pytree of float32 arrays (dicts, Flax params, Equinox
      arrays). Called once per process on the CPU backend, so every process gets the same bits.
      Traced (``jax.eval_shape``, then ``jax.jit``): split the key and draw with ``jax.random``;
      never turn it into a Python or numpy value (``int(key[0])`` is refused, naming the task).
    - ``loss(params, batch) -> scalar`` or ``(scalar, {name: scalar})``: traced by JAX. The
      metrics dict is logged per step beside the loss.
    - ``batch(ctx, clock) -> batch``: any pytree of arrays, deterministic in (ctx.seed,
      ctx.worker_id, ctx.num_workers, clock). Keep its shapes fixed: a new shape recompiles.
    - ``evaluate(params, ctx) -> {name: float}``: optional, run on the final parameters (and at
      intervals in experiments). A ``"loss"`` entry becomes the summary's ``final_loss``, an
      ``"accuracy"`` or ``"test_accuracy"`` entry its ``test_accuracy``.
    - ``optimizer() -> optax.GradientTransformation``: optional, the shards' optimizer in place
      of ``--optimizer``. It must be elementwise (DESIGN §11) or it is refused.
    """

    def init(self, key: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define init(key) -> params")

    def loss(self, params: Any, batch: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define loss(params, batch)")

    def batch(self, ctx: TaskContext, clock: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define batch(ctx, clock)")


REQUIRED = ("init", "loss", "batch")

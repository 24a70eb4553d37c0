"""Ray's asynchronous parameter-server example on the same task, for `tether bench train` to be
compared with (DESIGN §11's peer baseline).

The shape is Ray's documented example ("Parameter Server", async version): one
`ParameterServer` actor holds the weights and applies each gradient as it arrives; `DataWorker`
actors compute a gradient on the weights they are handed and return it; the driver feeds each
finished gradient to the server and hands the worker the new weights (an object reference, so
the weights travel through Ray's object store). Here the model is Tether's task (the built-in
MLP by default), the gradient is the task's own jitted tree gradient, flattened, and the
server's optimizer is optax's Adam on the flat vector. Reported: updates per second after the
first `--skip` updates, beside the single-process gradient-step rate measured first in the
same run.

    pip install ray   # not a dependency of Tether
    python benchmarks/ray_ps.py [--model mlp:512x512 --dataset synthetic:784 --batch-size 128]
        [--workers 2] [--updates 600] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp:512x512")
    parser.add_argument("--dataset", default="synthetic:784")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--updates", type=int, default=600)
    parser.add_argument("--skip", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        import ray
    except ImportError:
        print("ray_ps: ray is not installed (pip install ray)", file=sys.stderr)
        return 2

    from tether.bench.timing import interleaved_medians, model_step
    from tether.driver.api import new_run
    from tether.tasks.build import context_of, runtime_of

    config = new_run(
        run_id="ray-ps",
        model=args.model,
        dataset=args.dataset,
        batch_size=args.batch_size,
        workers=args.workers,
        seed=args.seed,
    )
    print(f"ray_ps: seed {config.seed}, {config.num_params} parameters", file=sys.stderr)
    runtime = runtime_of(config)
    flat = runtime.init_flat(config.seed)
    batch = runtime.task.batch(context_of(config, "worker"), 0)
    step = model_step(runtime, runtime.layout.views(flat), batch)
    single = 1 / interleaved_medians({"model": step}, 50, 5)["model"]

    ray.init(num_cpus=args.workers + 1, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class ParameterServer:
        def __init__(self, weights: np.ndarray, lr: float) -> None:
            import jax
            import optax

            self.tx = optax.adam(lr)
            self.params = jax.numpy.asarray(weights)
            self.state = self.tx.init(self.params)

            def apply(params, state, grad):  # type: ignore[no-untyped-def]
                updates, state = self.tx.update(grad, state, params)
                return optax.apply_updates(params, updates), state

            self.apply = jax.jit(apply)

        def apply_gradients(self, grad: np.ndarray) -> np.ndarray:
            self.params, self.state = self.apply(self.params, self.state, grad)
            return np.asarray(self.params)

        def get_weights(self) -> np.ndarray:
            return np.asarray(self.params)

    @ray.remote
    class DataWorker:
        def __init__(self, worker_id: int) -> None:
            self.runtime = runtime_of(config)
            self.ctx = context_of(config, "worker", worker_id)
            self.clock = 0

        def compute_gradients(self, weights: np.ndarray) -> np.ndarray:
            batch = self.runtime.task.batch(self.ctx, self.clock)
            self.clock += 1
            return self.runtime.step(np.ascontiguousarray(weights), batch).grad.to_array()

    ps = ParameterServer.remote(flat, args.lr)
    workers = [DataWorker.remote(w) for w in range(args.workers)]
    weights = ps.get_weights.remote()
    pending = {w.compute_gradients.remote(weights): w for w in workers}
    times = []
    for _ in range(args.updates):
        (ready,), _ = ray.wait(list(pending))
        worker = pending.pop(ready)
        weights = ps.apply_gradients.remote(ready)
        pending[worker.compute_gradients.remote(weights)] = worker
        times.append(time.perf_counter())  # a gradient finished: one update handed on
    ray.get(weights)  # the last update applied
    times[-1] = time.perf_counter()
    ray.shutdown()
    window = times[-1] - times[args.skip]
    rate = (len(times) - 1 - args.skip) / window
    result = {
        "peer": "ray parameter-server example (async)",
        "ray_version": ray.__version__,
        "num_params": config.num_params,
        "batch_size": config.batch_size,
        "workers": args.workers,
        "seed": config.seed,
        "single_process_steps_per_s": single,
        "updates_per_s": rate,
        "ratio": rate / single,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"  {key:28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

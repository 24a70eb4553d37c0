"""Time one optimizer step on a shard-sized float32 vector: numpy in place vs optax under jax.jit.

This is the measurement DESIGN §4 asks for before leaving optax ("use optax unless measurement
shows a numpy in-place update is needed to reach the bandwidth target"). For each optimizer it
times, in the same process and on the same data:

- numpy: ``tether.server.optim.Optimizer.apply(params, grads)``, what a shard runs per push;
- optax: a ``jax.jit`` step (``tx.update`` + ``optax.apply_updates``, params and state donated) on
  the CPU, plus the conversions a shard holding numpy buffers needs around it: the received
  gradient numpy -> jax before the step, the new parameters copied jax -> numpy into the buffer
  pulls are served from after it. (Keeping ``np.asarray(params)`` views alive instead pins the
  donated buffers and is slower, so this is optax's better case.)

numpy runs on one thread; XLA may use every core (``cpu_count`` is in the report). The paths
alternate step by step so both see the same machine noise; times are medians.

Both start from the same parameters and see the same gradients, and the report gives the largest
difference between their final parameters as a sanity check.

    python benchmarks/optimizer_apply.py [--size-mb 16] [--repeats 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

NAMES = ("sgd", "momentum", "adam")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=16.0, help="vector size in MiB (default 16)")
    ap.add_argument("--repeats", type=int, default=20, help="timed steps per path (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random data (default 0)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    if not args.size_mb > 0 or args.repeats < 1:
        ap.error("--size-mb must be > 0 and --repeats >= 1")
    return args


def _optax_tx(name: str, lr: float, momentum: float, b1: float, b2: float, eps: float) -> Any:
    import optax

    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=momentum)
    return optax.adam(lr, b1=b1, b2=b2, eps=eps)


def bench_one(name: str, n: int, repeats: int, seed: int) -> dict[str, float]:
    import jax
    import optax

    from tether.config import OptimizerConfig
    from tether.server.optim import Optimizer

    config = OptimizerConfig(name=name)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    params0 = rng.standard_normal(n, dtype=np.float32)
    # A few distinct gradients, cycled, so the two paths see identical inputs.
    grad_pool = [rng.standard_normal(n, dtype=np.float32) for _ in range(3)]

    # numpy, in place: the shard's params buffer and a received gradient buffer it consumes.
    opt = Optimizer(config, n)
    params = params0.copy()
    grads = np.empty(n, dtype=np.float32)

    # optax, jitted on the CPU, params and state donated so XLA can reuse their buffers.
    tx = _optax_tx(name, config.lr, config.momentum, config.b1, config.b2, config.eps)
    cpu = jax.devices("cpu")[0]

    def step(p: Any, s: Any, g: Any) -> Any:
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    p_j = jax.device_put(params0, cpu)
    s_j = jax.device_put(tx.init(p_j), cpu)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p_j, s_j, p_j).compile()
    compile_s = time.perf_counter() - t0
    shard_params = params0.copy()  # the numpy buffer pulls are served from

    # The two paths alternate step by step so that both see the same machine noise. Refilling a
    # gradient buffer is not timed: on a shard the gRPC receive writes it.
    numpy_s: list[float] = []
    optax_s: list[float] = []
    for i in range(repeats + 1):
        source = grad_pool[i % len(grad_pool)]
        np.copyto(grads, source)
        t0 = time.perf_counter()
        opt.apply(params, grads)
        t1 = time.perf_counter()

        g_np = source.copy()
        t2 = time.perf_counter()
        g_j = jax.device_put(g_np, cpu)  # numpy -> jax
        p_j, s_j = compiled(p_j, s_j, g_j)
        np.copyto(shard_params, p_j)  # jax -> numpy (blocks until the step is done)
        t3 = time.perf_counter()
        del g_j
        if i:  # the first step of each path is warm-up
            numpy_s.append(t1 - t0)
            optax_s.append(t3 - t2)
    max_abs_diff = float(np.max(np.abs(params - shard_params))) if n else 0.0

    numpy_ms = statistics.median(numpy_s) * 1e3
    optax_ms = statistics.median(optax_s) * 1e3
    return {
        "numpy_ms": numpy_ms,
        "numpy_min_ms": min(numpy_s) * 1e3,
        "optax_ms": optax_ms,
        "optax_min_ms": min(optax_s) * 1e3,
        "ratio": optax_ms / numpy_ms,
        "optax_compile_s": compile_s,
        "max_abs_diff": max_abs_diff,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import jax

    jax.config.update("jax_platforms", "cpu")  # the shard's apply runs on its CPU

    n = int(args.size_mb * (1 << 20)) // 4
    human = sys.stderr if args.json else sys.stdout
    print(
        f"optimizer step on {n:,} float32 ({n * 4 / (1 << 20):.1f} MiB), "
        f"median of {args.repeats}; optax = jit on CPU incl. numpy<->jax conversions",
        file=human,
    )
    results: dict[str, dict[str, float]] = {}
    for name in NAMES:
        results[name] = bench_one(name, n, args.repeats, args.seed)
    header = (
        f"{'optimizer':<10} {'numpy ms':>9} {'optax ms':>9} {'optax/numpy':>12} {'max |diff|':>11}"
    )
    print(header, file=human)
    for name, r in results.items():
        print(
            f"{name:<10} {r['numpy_ms']:>9.2f} {r['optax_ms']:>9.2f} {r['ratio']:>11.2f}x "
            f"{r['max_abs_diff']:>11.2e}",
            file=human,
        )
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "optimizer_apply",
                    "size_mb": args.size_mb,
                    "elements": n,
                    "repeats": args.repeats,
                    "seed": args.seed,
                    "machine": platform.machine(),
                    "processor": platform.processor(),
                    "cpu_count": os.cpu_count(),
                    "numpy": np.__version__,
                    "jax": jax.__version__,
                    "results": results,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

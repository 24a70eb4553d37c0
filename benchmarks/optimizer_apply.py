"""Time one optimizer step on a shard-sized float32 vector: the optax path vs numpy in place.

DESIGN §4 keeps a numpy in-place update only where measurement shows optax too slow for the
bandwidth target. For each of sgd, momentum and adam this times ``Optimizer.apply(params, grads)``
of ``tether.server.optim`` both ways a shard can run the rule, in the same process on the same
data:

- optax: the transformation (``optax.sgd(lr)``, ``optax.sgd(lr, momentum=0.9)``,
  ``optax.adam(lr)``) given as ``transformation=``, so it runs as every other optax optimizer
  does: one program compiled for ``BLOCK`` elements, run block by block, numpy state updated
  from its outputs;
- numpy: the same rule named by the config, which the shard runs in numpy in place.

The allocator is tuned as in a shard process (``tether.malloc``), and the gradient buffer is a
fresh numpy array, as a shard's receive buffer is. The paths alternate step by step so both see
the same machine noise; times are medians. Both start from the same parameters and see the same
gradients, and the report gives the largest difference between their final parameters as a
sanity check (float32 rounding).

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
LR = {"sgd": 0.1, "momentum": 0.1, "adam": 0.01}


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


def _transformation(name: str) -> Any:
    import optax

    if name == "sgd":
        return optax.sgd(LR[name])
    if name == "momentum":
        return optax.sgd(LR[name], momentum=0.9)
    return optax.adam(LR[name])


def bench_one(name: str, n: int, repeats: int, seed: int) -> dict[str, float]:
    from tether.config import OptimizerConfig
    from tether.server.optim import Optimizer

    rng = np.random.default_rng(seed)
    params0 = rng.standard_normal(n, dtype=np.float32)
    # A few distinct gradients, cycled, so the two paths see identical inputs.
    grad_pool = [rng.standard_normal(n, dtype=np.float32) for _ in range(3)]

    config = OptimizerConfig(name, lr=LR[name])
    t0 = time.perf_counter()
    opt = Optimizer(config, n, transformation=_transformation(name))
    build_s = time.perf_counter() - t0
    baseline = Optimizer(config, n)
    optax_params, numpy_params = params0.copy(), params0.copy()
    grads = np.empty(n, dtype=np.float32)  # a shard's receive buffer; refilling it is not timed

    optax_s: list[float] = []
    numpy_s: list[float] = []
    for i in range(repeats + 1):
        source = grad_pool[i % len(grad_pool)]
        np.copyto(grads, source)
        t0 = time.perf_counter()
        opt.apply(optax_params, grads)
        t1 = time.perf_counter()
        np.copyto(grads, source)
        t2 = time.perf_counter()
        baseline.apply(numpy_params, grads)
        t3 = time.perf_counter()
        if i:  # the first step of each path is warm-up
            optax_s.append(t1 - t0)
            numpy_s.append(t3 - t2)
    max_abs_diff = float(np.max(np.abs(optax_params - numpy_params))) if n else 0.0

    optax_ms = statistics.median(optax_s) * 1e3
    numpy_ms = statistics.median(numpy_s) * 1e3
    return {
        "optax_ms": optax_ms,
        "optax_min_ms": min(optax_s) * 1e3,
        "numpy_ms": numpy_ms,
        "numpy_min_ms": min(numpy_s) * 1e3,
        "ratio": optax_ms / numpy_ms,
        "optax_build_s": build_s,
        "max_abs_diff": max_abs_diff,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import jax

    from tether.malloc import tune_allocator
    from tether.server.optim import BLOCK

    tune_allocator()  # as a shard process does (server/main.py)
    n = int(args.size_mb * (1 << 20)) // 4
    human = sys.stderr if args.json else sys.stdout
    print(
        f"optimizer step on {n:,} float32 ({n * 4 / (1 << 20):.1f} MiB), median of "
        f"{args.repeats}; optax = compiled in blocks of {BLOCK:,}, numpy = in place",
        file=human,
    )
    results: dict[str, dict[str, float]] = {}
    for name in NAMES:
        results[name] = bench_one(name, n, args.repeats, args.seed)
    header = (
        f"{'optimizer':<10} {'optax ms':>9} {'numpy ms':>9} {'optax/numpy':>12} {'max |diff|':>11}"
    )
    print(header, file=human)
    for name, r in results.items():
        print(
            f"{name:<10} {r['optax_ms']:>9.2f} {r['numpy_ms']:>9.2f} {r['ratio']:>11.2f}x "
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
                    "block": BLOCK,
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

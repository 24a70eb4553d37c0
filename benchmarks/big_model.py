"""A 55M-parameter model trained for a few steps with 4 shards (DESIGN §11, "big models").

Reports, from one invocation:

- step time: each worker's median `step_s` (pull + gradient + push) after its first two steps
  (compilation and first touches excluded), with the pull's share;
- bytes moved per step: every worker pulls and pushes the whole float32 vector, so 2 x 4N bytes
  per worker step, against the wire limit: the raw gRPC byte throughput to the same 4 shards
  measured in the same invocation (`tether bench pushpull`'s baseline), giving the step time the
  wire alone would allow;
- each process's peak resident memory (members report it in their heartbeats), beside what it
  must hold: a shard its slice and the optimizer state (Adam: 2 slices), and under BSP one
  pending gradient slice per worker and the previous parameters; a worker one copy of the
  parameters and one of the gradient (XLA's output, pushed as it is), all above the resident
  size of an idle process with JAX loaded (measured). `above_idle_in_vectors` is the same in
  units of what the process holds one copy of: the shard's slice, or the worker's whole vector.

    python benchmarks/big_model.py [--steps 8] [--workers 2] [--json]

The task below is what a user would write: an MLP 1024-4096-4096-4096-4096-10 whose init draws
each layer from its own key, so a shard computes only the layers that overlap its slice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import tether

SIZES = (1024, 4096, 4096, 4096, 4096, 10)


class BigMLP(tether.Task):
    def init(self, key):  # type: ignore[no-untyped-def]
        keys = jax.random.split(key, len(SIZES) - 1)
        return [
            {"w": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, SIZES[:-1], SIZES[1:], strict=True)
        ]

    def loss(self, params, batch):  # type: ignore[no-untyped-def]
        x, y = batch
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        out = x @ params[-1]["w"] + params[-1]["b"]
        logp = jax.nn.log_softmax(out)
        return -jnp.mean(jnp.sum(jax.nn.one_hot(y, SIZES[-1]) * logp, axis=-1))

    def batch(self, ctx, clock):  # type: ignore[no-untyped-def]
        rng = np.random.default_rng([ctx.seed, ctx.worker_id, clock])
        x = rng.standard_normal((ctx.batch_size, SIZES[0]), dtype=np.float32)
        return x, rng.integers(0, SIZES[-1], ctx.batch_size).astype(np.int32)


task = BigMLP()

IDLE_RSS = (
    "import resource, jax, jax.numpy as jnp, tether.worker.loop; "
    "jnp.zeros(1).block_until_ready(); "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
)


def main() -> int:
    parser = argparse.ArgumentParser(description="a 55M-parameter run with 4 shards")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-shared-memory", dest="shared_memory", action="store_false",
        help="stream over gRPC only (by default same-host tensors go through /dev/shm)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from tether.bench.pushpull import BenchOptions, bench_pushpull
    from tether.store import open_store

    shards = 4
    print(f"big_model: seed {args.seed}", file=sys.stderr)
    idle_rss = int(subprocess.run([sys.executable, "-c", IDLE_RSS], capture_output=True,
                                  text=True, check=True).stdout)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tether-big-") as tmp:
        summary = tether.launch(
            f"{Path(__file__).resolve()}:task",
            shards=shards,
            workers=args.workers,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            optimizer="adam",
            lr=1e-4,
            replication="off",
            shared_memory=args.shared_memory,
            run_dir=Path(tmp) / "run",
        )
        with open_store(summary["store"]) as store:
            rows = store.metrics(summary["run_id"])
            members = store.members(summary["run_id"])
    n = summary["num_params"]
    wire = bench_pushpull(BenchOptions(size_mb=n * 4 / 2**20, shards=shards, repeats=3, warmup=1))
    steady = [r for r in rows if r.source.startswith("worker:") and r.step >= 2]
    step_s = statistics.median(r.values["step_s"] for r in steady)
    pull_s = statistics.median(r.values["pull_s"] for r in steady)
    moved = 2 * 4 * n  # one pull and one push of the whole vector per worker step
    raw_push_s = 4 * n * 8 / (wire["raw_push_gbps"] * 1e9)
    raw_pull_s = 4 * n * 8 / (wire["raw_pull_gbps"] * 1e9)
    slice_bytes = 4 * n / shards
    expect = {
        "server": slice_bytes * (1 + 2 + args.workers + 1),  # params, adam mu+nu, pending, prev
        # The pulled parameters and XLA's gradient; with the same-host path also the segment's
        # gradient region, which the gradient is copied into for the shards to read.
        "worker": 4 * n * (3 if summary["segment_pushes"] else 2),
    }
    unit = {"server": slice_bytes, "worker": 4 * n}
    procs = []
    for m in sorted(members, key=lambda m: (m.role, m.member_id)):
        if m.role not in expect:
            continue  # the launcher's own record
        peak = int(m.info.get("peak_rss_bytes", 0))
        procs.append({
            "role": m.role, "id": m.member_id, "peak_rss_mb": peak / 2**20,
            "above_idle_mb": (peak - idle_rss) / 2**20, "expected_mb": expect[m.role] / 2**20,
            "above_idle_in_vectors": (peak - idle_rss) / (unit[m.role]),
        })  # fmt: skip
    result = {
        "num_params": n,
        "shards": shards,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "seed": args.seed,
        "shared_memory": args.shared_memory,
        "segment_pulls": summary["segment_pulls"],
        "step_s": step_s,
        "pull_s": pull_s,
        "bytes_per_worker_step": moved,
        "worker_gbps": moved * 8 / step_s / 1e9,
        "raw_push_gbps": wire["raw_push_gbps"],
        "raw_pull_gbps": wire["raw_pull_gbps"],
        "wire_limited_step_s": raw_push_s + raw_pull_s,
        "idle_process_rss_mb": idle_rss / 2**20,
        "processes": procs,
        "final_loss": summary["final_loss"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

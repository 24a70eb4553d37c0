"""Step time with sync and async replication against replication off (issue: recovery).

Runs real `tether launch` runs (separate shard and worker processes, SQLite store) for each
replication setting, interleaved over several rounds so machine drift hits all alike, and reports
the median step time of each setting and its ratio to `off` measured in the same run.

    python benchmarks/replication_overhead.py [--mode bsp] [--rounds 3] [--steps 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile


def launch(mode: str, replication: str, steps: int, extra: list[str], run_dir: str) -> dict:
    cmd = [sys.executable, "-m", "tether", "launch", "--json", "--mode", mode, "--steps",
           str(steps), "--replication", replication, "--run-dir", run_dir, *extra]  # fmt: skip
    if mode == "ssp":
        cmd += ["--staleness", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="bsp", choices=("bsp", "ssp", "asp"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--model", default="mlp:64")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    extra = ["--model", args.model, "--dataset", args.dataset]
    step_ms: dict[str, list[float]] = {"off": [], "sync": [], "async": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for setting in step_ms:
                s = launch(args.mode, setting, args.steps, extra, f"{tmp}/{setting}-{r}")
                step_ms[setting].append(s["train_s"] / args.steps * 1000)
                print(f"round {r} {setting:5s} {step_ms[setting][-1]:.2f} ms/step", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in step_ms.items()}
    result = {
        "mode": args.mode,
        "model": args.model,
        "steps": args.steps,
        "rounds": args.rounds,
        "step_ms": med,
        "sync_over_off": med["sync"] / med["off"],
        "async_over_off": med["async"] / med["off"],
    }
    for k, v in med.items():
        print(f"{k:5s} {v:7.2f} ms/step  x{v / med['off']:.2f} of off", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

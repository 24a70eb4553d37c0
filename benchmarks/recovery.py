"""Time from a shard's SIGKILL to the replacement serving again, over several kills.

One real `tether launch` run on the SQLite store; shard 0 is killed every `--every` clocks of
progress (read from the store) and the launcher's measured `recovery_s` values are summarised,
each with what the replacement rebuilt itself from (its heartbeat's `recovered`: the base's
version, the log entries replayed on it, and the seconds spent reading and replaying them).

    python benchmarks/recovery.py [--kills 5] [--mode bsp] [--model M --dataset D]
        [--replication sync|async] [--batch-size B] [--compaction-budget-ms MS] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tether.store import open_store


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--every", type=int, default=60, help="clocks of progress between kills")
    p.add_argument("--mode", default="bsp", choices=("bsp", "ssp", "asp"))
    p.add_argument("--model", default=None, help="built-in model (the launch default)")
    p.add_argument("--dataset", default=None, help="built-in data set (the launch default)")
    p.add_argument("--replication", default=None, choices=("sync", "async"))
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--compaction-budget-ms", type=float, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    steps = args.every * (args.kills + 2)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "tether", "launch", "--json", "--mode", args.mode,
               "--steps", str(steps), "--max-restarts", str(args.kills), "--run-dir",
               str(run_dir)]  # fmt: skip
        if args.mode == "ssp":
            cmd += ["--staleness", "2"]
        for flag in ("model", "dataset", "replication", "batch_size", "compaction_budget_ms"):
            if (value := getattr(args, flag)) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            db = run_dir / "tether.db"
            while not db.exists():
                time.sleep(0.05)
            store = open_store(f"sqlite:///{db}")
            rebuilt: list[dict] = []
            for k in range(args.kills):
                target = args.every * (k + 1)
                while True:
                    runs = store.list_runs()
                    workers = store.members(runs[0].run_id, "worker") if runs else []
                    clocks = [m.info.get("clock", 0) for m in workers]
                    if len(clocks) >= 2 and min(clocks) >= target:
                        break
                    time.sleep(0.02)
                shard = store.member(runs[0].run_id, "server", 0)
                assert shard is not None
                os.kill(shard.pid, signal.SIGKILL)
                print(f"killed shard 0 (epoch {shard.epoch}) at clock {target}", file=sys.stderr)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    new = store.member(runs[0].run_id, "server", 0)
                    if new is not None and new.epoch > shard.epoch and new.info.get("recovered"):
                        rebuilt.append(new.info["recovered"])
                        print(f"  rebuilt from {new.info['recovered']}", file=sys.stderr)
                        break
                    time.sleep(0.05)
            store.close()
            out, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    summary = json.loads(out.strip().splitlines()[-1])
    rec = summary["recovery_s"]
    result = {
        "mode": args.mode,
        "num_params": summary["num_params"],
        "replication": summary.get("replication"),
        "kills": args.kills,
        "recovery_s": rec,
        "median_s": statistics.median(rec),
        "max_s": max(rec),
        "rebuilt_from": rebuilt,
        "lost_updates": summary["lost_updates"],
        "test_accuracy": summary["test_accuracy"],
    }
    print(f"recovery: median {result['median_s']:.3f}s, max {result['max_s']:.3f}s over "
          f"{len(rec)} kills", file=sys.stderr)  # fmt: skip
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What replication costs: steady step time, bytes written and store size per setting and size.

For each model size and replication setting (off, async, sync) one real `tether launch` run
(separate shard and worker processes, SQLite store; BSP, 2 shards, 2 workers by default) trains
`--steps` clocks. Reported per run, all measured in this invocation:

- `step_ms`: the median of the workers' own per-step times (`step_s` rows in the store) after
  the first `--skip` clocks, so start-up and compilation are left out; `over_off`: its ratio to
  the `off` run of the same size and round;
- `written_per_clock_mb`: what the shard processes passed to write(2) (`wchar` in /proc, sampled
  while they run: the store's writes, their logs and heartbeats) divided by the clocks; and
  `x_update`: that against one aggregated update of the whole model (num_params x 4 bytes);
- `store_mb`: the store at the end of the run: the SQLite files (database, WAL) and the payload
  files of bases and log entries beside them (`store_files_mb`: each part); `store_peak_mb`:
  the most it held while the run went on (sampled every second).

Settings run interleaved within a round, so a drifting machine hits them alike.

    python benchmarks/replication_overhead.py [--sizes 2M,8M] [--steps 60] [--rounds 1] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
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

# name -> (model, dataset): MLPs of about 2M, 8M and 32M parameters.
SIZES = {
    "2M": ("mlp:1024x1024", "synthetic:1024"),  # 2,109,450
    "8M": ("mlp:2048x2048", "synthetic:2048"),  # 8,413,194
    "32M": ("mlp:4096x4096", "synthetic:4096"),  # 33,603,594
}
SETTINGS = ("off", "async", "sync")


def _wchar(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/io") as f:
            fields = dict(line.split(": ") for line in f.read().splitlines())
    except (OSError, ValueError):
        return None
    return int(fields["wchar"])


def _store_bytes(run_dir: Path) -> dict[str, int]:
    """Bytes of each part of the SQLite store in `run_dir`: its files, and its payload folder."""
    parts = {}
    for p in run_dir.glob("tether.db*"):
        if p.is_dir():
            parts[p.name] = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        else:
            parts[p.name] = p.stat().st_size
    return parts


def run_once(args: argparse.Namespace, size: str, setting: str, run_dir: Path) -> dict:
    model, dataset = SIZES[size]
    cmd = [sys.executable, "-m", "tether", "launch", "--json", "--mode", args.mode,
           "--shards", str(args.shards), "--workers", str(args.workers),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--model", model, "--dataset", dataset, "--replication", setting,
           "--run-dir", str(run_dir)]  # fmt: skip
    if args.mode == "ssp":
        cmd += ["--staleness", "2"]
    # stderr to a file: the launcher's progress lines would fill a pipe nobody reads while polling
    run_dir.mkdir(parents=True)
    log = open(run_dir / "launch.err", "w+")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True
    )
    written: dict[int, int] = {}  # shard pid -> the last wchar read
    peak, sized_at = 0, 0.0
    db = run_dir / "tether.db"
    store = None
    try:
        while proc.poll() is None:
            if store is None and db.exists():
                store = open_store(f"sqlite:///{db}")
            runs = store.list_runs() if store is not None else []
            for m in store.members(runs[0].run_id, "server") if runs else []:
                if (w := _wchar(m.pid)) is not None:
                    written[m.pid] = max(w, written.get(m.pid, 0))
            if time.monotonic() - sized_at >= 1.0:
                with contextlib.suppress(OSError):  # a file compacted away while listed
                    peak = max(peak, sum(_store_bytes(run_dir).values()))
                sized_at = time.monotonic()
            time.sleep(0.05)  # a sampling interval, not a wait for an event
        out, _ = proc.communicate(timeout=600)
        log.seek(0)
        err = log.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        if store is not None:
            store.close()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{err[-3000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    with open_store(f"sqlite:///{db}") as reader:
        rows = reader.metrics(summary["run_id"])
    steps = [
        r.values["step_s"] for r in rows if r.source.startswith("worker:") and r.step >= args.skip
    ]
    files = _store_bytes(run_dir)
    per_clock = sum(written.values()) / args.steps
    update_bytes = summary["num_params"] * 4
    return {
        "size": size,
        "setting": setting,
        "num_params": summary["num_params"],
        "step_ms": 1e3 * statistics.median(steps),
        "written_per_clock_mb": per_clock / 1e6,
        "x_update": per_clock / update_bytes,
        "store_mb": sum(files.values()) / 1e6,
        "store_peak_mb": max(peak, sum(files.values())) / 1e6,
        "store_files_mb": {name: size / 1e6 for name, size in files.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2M,8M", help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--mode", default="bsp", choices=("bsp", "ssp", "asp"))
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10, help="start-up clocks left out (10)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sizes, settings = args.sizes.split(","), args.settings.split(",")
    if bad := [s for s in sizes if s not in SIZES] + [s for s in settings if s not in SETTINGS]:
        p.error(f"unknown size or setting: {', '.join(bad)}")
    if not 0 <= args.skip < args.steps - 1:
        p.error("--skip must be in [0, --steps - 1)")
    results = []
    with tempfile.TemporaryDirectory(prefix="tether-repl-") as tmp:
        for size in sizes:
            for r in range(args.rounds):
                off = None
                for setting in settings:
                    got = run_once(args, size, setting, Path(tmp) / f"{size}-{setting}-{r}")
                    if setting == "off":
                        off = got["step_ms"]
                    got["over_off"] = got["step_ms"] / off if off else None
                    got["round"] = r
                    results.append(got)
                    print(
                        f"{size:>4} {setting:5s} round {r}: {got['step_ms']:8.1f} ms/step"
                        + (f" (x{got['over_off']:.2f} of off)" if got["over_off"] else "")
                        + f", {got['written_per_clock_mb']:8.1f} MB written per clock"
                        f" (x{got['x_update']:.1f} of one update), store {got['store_mb']:.0f} MB",
                        file=sys.stderr,
                        flush=True,
                    )
    if args.json:
        print(json.dumps({"mode": args.mode, "steps": args.steps, "skip": args.skip,
                          "batch_size": args.batch_size, "results": results}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

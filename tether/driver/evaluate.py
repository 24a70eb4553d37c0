"""Evaluation of a running job's parameters at a fixed wall-clock interval (DESIGN §8).

The workers' mini-batch losses are noisy and measured on parameters each worker saw; comparing
consistency modes needs the loss of the parameters the shards hold, over time. This thread reads
every shard's slice as an observer (outside the clock protocol: it never waits and never counts
as a worker), runs the task's `evaluate` on them (for the built-in classifier: the loss and
accuracy on the whole training set), and writes one metric row per evaluation under the source
``eval``: its time, what evaluate returned, and how many optimizer updates and worker gradients
the shards had applied at that point.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from tether.config import RunConfig
from tether.store import MetricRow, open_store
from tether.transport import Security

SOURCE = "eval"


class Evaluator(threading.Thread):
    def __init__(
        self, config: RunConfig, store_uri: str, interval_s: float, security: Security
    ) -> None:
        super().__init__(name="evaluator", daemon=True)
        if not interval_s > 0:
            raise ValueError(f"the evaluation interval must be > 0 seconds, got {interval_s}")
        self.config, self.store_uri, self.interval_s = config, store_uri, interval_s
        self.security = security
        self.stop_event = threading.Event()
        self.count = 0
        self.error: str | None = None

    def run(self) -> None:
        from tether.tasks.build import context_of, runtime_of
        from tether.worker.client import read_params

        cfg = self.config
        runtime = runtime_of(cfg, device="cpu")
        ctx = context_of(cfg, "driver", store_uri=self.store_uri)
        if not hasattr(runtime.task, "evaluate"):
            return  # a task without evaluate has no loss curve of its own to record
        store = open_store(self.store_uri)
        try:
            while True:
                try:
                    shards = store.members(cfg.run_id, "server")
                    if len(shards) == cfg.shards:
                        flat, infos = read_params(cfg, shards, self.security)
                        values = runtime.evaluate(flat, ctx)
                        store.log_metrics(cfg.run_id, [self.row(values, infos)])
                except Exception as e:  # noqa: BLE001 - a shard being replaced (a gRPC error),
                    # a busy store: this point is skipped, not the run.
                    self.error = f"{type(e).__name__}: {e}"
                if self.stop_event.wait(self.interval_s):
                    return
        finally:
            store.close()

    def row(self, evaluation: dict[str, float], infos: list[Any]) -> MetricRow:
        """One point of the loss curve: what the task's evaluate returned (the built-in
        classifier's: loss, accuracy, test_accuracy) and how far training had got."""
        self.count += 1
        return MetricRow(
            source=SOURCE,
            step=self.count - 1,
            t=time.time(),
            values={
                **evaluation,
                # Every shard applies every update; the slowest shard's count is the model's.
                "updates": float(min(i.updates_applied for i in infos)),
                "gradients": float(min(i.pushes_accepted for i in infos)),
            },
        )

    def close(self) -> None:
        self.stop_event.set()
        self.join(30)

"""The typed run configuration (STYLE §7: read at the edge, passed down as arguments).

`run.py` holds `RunConfig`, nested by concern, and its flat stored form; `optimizer.py` the
shards' optimizer and the parsing of `--opt`/`--schedule`; `policies.py` replication,
liveness and the gradient guard. Everything is importable from here.
"""

from tether.config.optimizer import (
    SCHEDULE_FORMS,
    OptimizerConfig,
    default_lr,
    optimizer_names,
    parse_opt_arg,
    parse_schedule,
)
from tether.config.policies import (
    GradientGuard,
    LivenessPolicy,
    ReplicationMode,
    ReplicationPolicy,
    default_replication,
)
from tether.config.run import (
    DEVICES,
    SETTINGS,
    RunConfig,
    TaskConfig,
    Transport,
    new_run_id,
    parse_straggler,
)

__all__ = [
    "DEVICES",
    "SCHEDULE_FORMS",
    "SETTINGS",
    "GradientGuard",
    "LivenessPolicy",
    "OptimizerConfig",
    "ReplicationMode",
    "ReplicationPolicy",
    "RunConfig",
    "TaskConfig",
    "Transport",
    "default_lr",
    "default_replication",
    "new_run_id",
    "optimizer_names",
    "parse_opt_arg",
    "parse_schedule",
    "parse_straggler",
]

"""Who takes part in a run: the one vocabulary of roles (pymongo's ``server_type.py``).

A run's members are its shards, its workers and the driver that launched it. The store records
each member under its *role* -- ``"server"``, ``"worker"`` or ``"launcher"`` -- and those words
are stored values (member records, heartbeats, the JSON of ``tether status``): they never change.
People read a member by its *name*: ``"shard 0"``, ``"worker 1"``, ``"launcher 0"``; a shard's
role is ``"server"`` (it runs ``tether server``) but it is called a shard everywhere a person
reads it (:func:`member_name`, chaos scenario targets ``shard:N``).

A task's code runs in one of three kinds of process, named by :data:`TaskRole`
(``TaskContext.role``, what users see): a worker computing gradients, a shard computing its
slice of the initial parameters, or the driver evaluating the final ones. The driver's task role
is ``"driver"``; as a member of the run it is the ``"launcher"``.

What a chaos fault hits is not a member role either: a shard or a worker of the run, or a member
of the MongoDB replica set behind the store (``tether.chaos.scenario.TargetKind``).
"""

from __future__ import annotations

from typing import Final, Literal

# A member of a run, as the store records it.
Role = Literal["server", "worker", "launcher"]
ROLES: Final[tuple[Role, ...]] = ("server", "worker", "launcher")

# The process a task's code runs in (TaskContext.role).
TaskRole = Literal["worker", "server", "driver"]
TASK_ROLES: Final[tuple[TaskRole, ...]] = ("worker", "server", "driver")

# How a person reads a member of each role.
ROLE_NAMES: Final[dict[Role, str]] = {"server": "shard", "worker": "worker", "launcher": "launcher"}
_NAME_OF: Final[dict[str, str]] = {role: name for role, name in ROLE_NAMES.items()}


def member_name(role: str, member_id: int) -> str:
    """``"shard 0"``, ``"worker 1"``, ``"launcher 0"``: a member as messages name it."""
    return f"{_NAME_OF.get(role, role)} {member_id}"


def role_named(name: str) -> Role:
    """The role of a member called ``name`` (``"shard"`` -> ``"server"``); ValueError else."""
    for role, word in ROLE_NAMES.items():
        if word == name:
            return role
    raise ValueError(f"a member is a {', '.join(ROLE_NAMES.values())}; got {name!r}")

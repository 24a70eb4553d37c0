"""Chaos scenarios: a run, the links behind proxies, a timeline of faults, invariants (DESIGN §7).

A scenario is a TOML file (see ``chaos/scenarios/``)::

    name = "shard-kill"
    description = "SIGKILL shard 0 mid-run."
    seed = 1
    ci = true                      # part of the short subset CI runs

    [run]                          # the run's options: any `tether launch` setting
    mode = "bsp"
    steps = 120
    replication = "sync"

    [proxies]
    workers = true                 # every worker->shard link through its own proxy

    [[fault]]
    at_step = 40                   # or at_s (since training began) or after_s (since the last)
    action = "kill"
    target = "shard:0"

    [invariants]
    bit_identical = true

Loading validates everything up front, so a bad scenario is one clear sentence (exit 2) before any
process starts. Everything here is data; `chaos.runner` executes it.
"""

from __future__ import annotations

import dataclasses
import random
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tether.config import SETTINGS, RunConfig
from tether.roles import ROLE_NAMES, role_named

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

# What a process fault hits: a shard or a worker of the run, by its member role (tether.roles),
# or a member of the MongoDB replica set behind the store, which is no member of the run.
# Scenario files name them as people do: shard:N, worker:N, store:N.
TargetKind = Literal["server", "worker", "store"]
PROCESS_ACTIONS = ("kill", "pause", "resume", "stop", "restart", "replace")
LINK_ACTIONS = ("add_toxic", "remove_toxic", "disable", "enable")
TOXIC_TYPES = (
    "latency", "bandwidth", "slow_close", "timeout", "reset_peer", "slicer", "limit_data",
)  # fmt: skip
# The run options a scenario may set: RunConfig's fields, less what the runner decides.
RUN_KEYS = set(SETTINGS) - {
    "run_id", "num_params", "in_dim", "num_classes",
} | {"store"}  # fmt: skip

_PROCESS_TARGET = re.compile(r"^(shard|worker|store):(\d+|primary)$")
_LINK_TARGET = re.compile(r"^link:worker:(\d+)->shard:(\d+)$|^links:(worker|shard):(\d+)$|^links$")


class ScenarioError(ValueError):
    """A scenario file that cannot run; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class ProcessTarget:
    role: TargetKind
    member_id: int | None  # None: the MongoDB primary, found when the fault fires

    def describe(self) -> str:
        name = "store" if self.role == "store" else ROLE_NAMES[self.role]
        return f"{name}:{'primary' if self.member_id is None else self.member_id}"


@dataclass(frozen=True, slots=True)
class LinkTarget:
    """The worker->shard links a link fault acts on; None matches every id."""

    worker: int | None
    shard: int | None

    def links(self, workers: int, shards: int) -> list[tuple[int, int]]:
        return [
            (w, s)
            for w in range(workers)
            for s in range(shards)
            if self.worker in (None, w) and self.shard in (None, s)
        ]

    def describe(self) -> str:
        if self.worker is not None and self.shard is not None:
            return f"link:worker:{self.worker}->shard:{self.shard}"
        if self.worker is not None:
            return f"links:worker:{self.worker}"
        if self.shard is not None:
            return f"links:shard:{self.shard}"
        return "links"


@dataclass(frozen=True, slots=True)
class ToxicSpec:
    """A toxic as a scenario file gives it: the body of Toxiproxy's ``POST .../toxics``."""

    type: str
    name: str
    stream: str = "downstream"
    toxicity: float = 1.0
    attributes: dict[str, float] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": self.toxicity,
            "attributes": dict(self.attributes),
        }


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One ``[[fault]]`` of a scenario: what to do to which target, and when."""

    action: str
    target: ProcessTarget | LinkTarget
    at_step: int | None = None
    at_s: float | None = None
    after_s: float | None = None
    toxic: ToxicSpec | None = None  # add_toxic
    toxic_name: str | None = None  # remove_toxic

    def describe(self) -> str:
        when = (
            f"at step {self.at_step}"
            if self.at_step is not None
            else f"at {self.at_s}s"
            if self.at_s is not None
            else f"{self.after_s}s after the previous fault"
        )
        what = f"{self.action} {self.target.describe()}"
        if self.toxic is not None:
            what += f" ({self.toxic.type} {self.toxic.stream} {self.toxic.attributes})"
        elif self.toxic_name is not None:
            what += f" ({self.toxic_name})"
        return f"{what} {when}"


@dataclass(frozen=True, slots=True)
class Invariants:
    finished: bool = True
    accuracy_tolerance: float | None = None  # accuracy may be at most this much below fault-free
    clock_gap: bool = True  # the mode's bound held at every served pull
    ledger: bool = True  # no push applied twice or missing from the shards' logs
    no_acked_loss: bool = False  # no acknowledged push lost (sync replication)
    bit_identical: bool = False  # params_sha256 equals the fault-free run's (BSP + sync)
    max_recovery_s: float | None = None  # every fault recovered within this
    zombie_fenced: bool = False  # every replaced process that ran again was fenced
    no_spurious_restarts: bool = True  # every restart answers a fault injected on that member

    @property
    def needs_baseline(self) -> bool:
        return self.accuracy_tolerance is not None or self.bit_identical


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    path: Path
    description: str
    seed: int
    ci: bool
    run: dict[str, Any]
    proxy_workers: bool
    faults: tuple[FaultSpec, ...]
    invariants: Invariants
    needs_mongod: bool

    @property
    def store(self) -> str:
        return str(self.run.get("store", "sqlite"))


def shipped() -> list[Path]:
    return sorted(SCENARIO_DIR.glob("*.toml"))


def resolve_path(name: str) -> Path:
    """A scenario file, or the name of a shipped one (`shard-kill`)."""
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ScenarioError(f"no scenario file {path}")
        return path
    candidate = SCENARIO_DIR / f"{name}.toml"
    if not candidate.is_file():
        names = ", ".join(p.stem for p in shipped())
        raise ScenarioError(f"no scenario {name!r}; shipped scenarios: {names}")
    return candidate


def load_scenario(
    path: Path, *, seed: int | None = None, overrides: list[str] | None = None
) -> Scenario:
    """Read and validate a scenario; `overrides` are `section.key=value` (TOML values)."""
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ScenarioError(f"{where}: cannot read the scenario: {e}") from None
    for text in overrides or []:
        _apply_override(raw, text, where)
    known = {"name", "description", "seed", "ci", "run", "proxies", "fault", "random", "invariants"}
    _no_unknown(raw, known, where, "the top level")
    seed = int(raw.get("seed", 0)) if seed is None else seed
    if seed < 0:
        raise ScenarioError(f"{where}: seed must be >= 0, got {seed}")
    run = dict(raw.get("run", {}))
    _no_unknown(run, RUN_KEYS, where, "[run]")
    run["seed"] = seed
    store = run.get("store", "sqlite")
    if store not in ("sqlite", "mongodb"):
        raise ScenarioError(f'{where}: [run] store must be "sqlite" or "mongodb", got {store!r}')
    proxies = raw.get("proxies", {})
    _no_unknown(proxies, {"workers"}, where, "[proxies]")
    try:
        config = _config(run)
    except (TypeError, ValueError) as e:
        raise ScenarioError(f"{where}: [run]: {e}") from None
    workers, shards = config.workers, config.shards
    faults = [
        _fault(f, i, where, workers, shards, store, bool(proxies.get("workers", False)))
        for i, f in enumerate(raw.get("fault", []))
    ]
    if "random" in raw:
        faults += _random_faults(raw["random"], seed, where, workers, shards)
    inv = raw.get("invariants", {})
    _no_unknown(inv, {f.name for f in dataclasses.fields(Invariants)}, where, "[invariants]")
    # bit_identical is promised for BSP with sync replication only (DESIGN §5); it is checked
    # as written, so that a scenario run with replication off shows the promise broken.
    invariants = Invariants(**inv)
    return Scenario(
        name=str(raw.get("name", path.stem)),
        path=path,
        description=str(raw.get("description", "")),
        seed=seed,
        ci=bool(raw.get("ci", False)),
        run=run,
        proxy_workers=bool(proxies.get("workers", False)),
        faults=tuple(faults),
        invariants=invariants,
        needs_mongod=store == "mongodb",
    )


def run_settings(scenario: Scenario) -> dict[str, Any]:
    """The scenario's run options as `new_run`'s settings (the store is the runner's)."""
    return {k: v for k, v in scenario.run.items() if k != "store"}


def run_config(scenario: Scenario, run_id: str) -> RunConfig:
    """The scenario's run with the product's defaults, before its task is resolved."""
    return _config(scenario.run, run_id)


def _config(run: dict[str, Any], run_id: str = "scenario") -> RunConfig:
    return RunConfig.of(run_id, **{k: v for k, v in run.items() if k != "store"})


def _apply_override(raw: dict[str, Any], text: str, where: str) -> None:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ScenarioError(
            f"--set expects SECTION.KEY=VALUE (e.g. run.replication=off), got {text!r}"
        )
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare word: a string
    *sections, leaf = key.split(".")
    node = raw
    for s in sections:
        node = node.setdefault(s, {})
        if not isinstance(node, dict):
            raise ScenarioError(f"{where}: --set {text!r}: {s} is not a table")
    node[leaf] = parsed


def _no_unknown(table: dict[str, Any], known: set[str], where: str, what: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ScenarioError(
            f"{where}: unknown key {unknown[0]!r} in {what}; known: {', '.join(sorted(known))}"
        )


def parse_target(text: str, action: str, where: str) -> ProcessTarget | LinkTarget:
    if action in LINK_ACTIONS:
        m = _LINK_TARGET.match(text)
        if not m:
            raise ScenarioError(
                f"{where}: {action} needs a link target (link:worker:W->shard:S, "
                f"links:worker:W, links:shard:S or links), got {text!r}"
            )
        if m.group(1) is not None:
            return LinkTarget(int(m.group(1)), int(m.group(2)))
        if m.group(3) == "worker":
            return LinkTarget(int(m.group(4)), None)
        if m.group(3) == "shard":
            return LinkTarget(None, int(m.group(4)))
        return LinkTarget(None, None)
    m = _PROCESS_TARGET.match(text)
    if not m:
        raise ScenarioError(
            f"{where}: {action} needs a process target (shard:N, worker:N, store:N or "
            f"store:primary), got {text!r}"
        )
    role = "store" if m.group(1) == "store" else role_named(m.group(1))
    assert role != "launcher"  # the pattern names shards, workers and store members only
    if m.group(2) == "primary":
        if role != "store":
            raise ScenarioError(f"{where}: only store members have a primary, got {text!r}")
        return ProcessTarget(role, None)
    return ProcessTarget(role, int(m.group(2)))


def _fault(
    f: dict[str, Any], i: int, where: str, workers: int, shards: int, store: str, proxied: bool
) -> FaultSpec:
    where = f"{where}: fault {i + 1}"
    _no_unknown(
        f,
        {"action", "target", "at_step", "at_s", "after_s", "toxic", "toxic_name"},
        where,
        "[[fault]]",
    )
    action = f.get("action")
    if action not in PROCESS_ACTIONS + LINK_ACTIONS:
        raise ScenarioError(
            f"{where}: action must be one of {', '.join(PROCESS_ACTIONS + LINK_ACTIONS)}, "
            f"got {action!r}"
        )
    target = parse_target(str(f.get("target", "")), action, where)
    whens = [k for k in ("at_step", "at_s", "after_s") if k in f]
    if len(whens) != 1:
        raise ScenarioError(f"{where}: give exactly one of at_step, at_s, after_s")
    if any(f[k] < 0 for k in whens):
        raise ScenarioError(f"{where}: {whens[0]} must be >= 0")
    if isinstance(target, ProcessTarget):
        limit = {"server": shards, "worker": workers, "store": 3}[target.role]
        if target.member_id is not None and target.member_id >= limit:
            raise ScenarioError(f"{where}: {target.describe()} is outside the run (0..{limit - 1})")
        if target.role == "store" and store != "mongodb":
            raise ScenarioError(f'{where}: store faults need [run] store = "mongodb"')
        if target.role == "store" and action == "replace":
            raise ScenarioError(
                f"{where}: a store member cannot be replaced, only killed or paused"
            )
    else:
        if not proxied:
            raise ScenarioError(f"{where}: link faults need [proxies] workers = true")
        if (target.worker or 0) >= workers or (target.shard or 0) >= shards:
            raise ScenarioError(f"{where}: {target.describe()} is outside the run")
    toxic = None
    if action == "add_toxic":
        toxic = _toxic(f.get("toxic"), where)
    toxic_name = f.get("toxic_name")
    if action == "remove_toxic" and not toxic_name:
        raise ScenarioError(f"{where}: remove_toxic needs toxic_name")
    return FaultSpec(
        action=action,
        target=target,
        at_step=f.get("at_step"),
        at_s=f.get("at_s"),
        after_s=f.get("after_s"),
        toxic=toxic,
        toxic_name=toxic_name,
    )


def _toxic(t: Any, where: str) -> ToxicSpec:
    if not isinstance(t, dict):
        raise ScenarioError(f"{where}: add_toxic needs toxic = {{ type = ..., attributes = ... }}")
    _no_unknown(t, {"type", "name", "stream", "toxicity", "attributes"}, where, "toxic")
    kind, stream = t.get("type"), t.get("stream", "downstream")
    if kind not in TOXIC_TYPES:
        raise ScenarioError(f"{where}: toxic type must be one of {', '.join(TOXIC_TYPES)}")
    if stream not in ("upstream", "downstream"):
        raise ScenarioError(f"{where}: toxic stream must be upstream or downstream")
    toxicity = float(t.get("toxicity", 1.0))
    if not 0.0 <= toxicity <= 1.0:
        raise ScenarioError(f"{where}: toxicity must be within 0..1, got {toxicity}")
    return ToxicSpec(
        type=kind,
        name=str(t.get("name", f"{kind}_{stream}")),
        stream=stream,
        toxicity=toxicity,
        attributes=dict(t.get("attributes", {})),
    )


def _random_faults(
    r: dict[str, Any], seed: int, where: str, workers: int, shards: int
) -> list[FaultSpec]:
    """Seeded random process faults at steps drawn from a range (replayable with the seed)."""
    where = f"{where}: [random]"
    _no_unknown(r, {"action", "targets", "count", "steps"}, where, "[random]")
    action = r.get("action", "kill")
    if action not in ("kill", "stop", "restart"):
        raise ScenarioError(f"{where}: action must be kill, stop or restart, got {action!r}")
    targets = [parse_target(t, action, where) for t in r.get("targets", [])]
    count = int(r.get("count", 0))
    lo, hi = (int(v) for v in r.get("steps", [0, 0]))
    if not targets or count < 1 or not 0 <= lo < hi:
        raise ScenarioError(f"{where}: needs targets, count >= 1 and steps = [lo, hi] with lo < hi")
    for t in targets:
        assert isinstance(t, ProcessTarget)
        limit = shards if t.role == "server" else workers
        if t.role == "store" or t.member_id is None or t.member_id >= limit:
            raise ScenarioError(f"{where}: {t.describe()} is not a shard or worker of the run")
    rng = random.Random(seed)
    steps = sorted(rng.randrange(lo, hi) for _ in range(count))
    return [FaultSpec(action=action, target=rng.choice(targets), at_step=s) for s in steps]

"""The import graph: no cycles, and every module imports only from its own layer or below.

The layers are DESIGN §15's. The graph is read statically from every module's source (imports
inside functions and under TYPE_CHECKING count too: a lazy import is still a dependency), so a
cycle or a back-edge fails here whatever the import order at run time. A module that no layer
claims fails too: a new folder must say where it stands.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

from helpers import REPO

# The installed namespace (pyproject.toml's package-dir): package prefix -> folder
FOLDERS = {
    "tether.proto": "proto",
    "tether.server": "server",
    "tether.worker": "worker",
    "tether.consistency": "consistency",
    "tether.chaos": "chaos",
    "tether": "tether",
}

# Lowest first. A prefix claims the module of that name and everything under it; the longest
# matching prefix wins, so `tether.consistency.experiments` sits above `tether.consistency`.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundations",
        (
            "tether.exitcodes", "tether.config", "tether.wire", "tether.shm", "tether.malloc",
            "tether.retry", "tether.roles", "tether.plotting", "tether.store", "tether.proto",
            "tether.transport",
            "tether.consistency",
        ),
    ),
    ("tasks", ("tether.tasks", "tether.data")),
    ("members", ("tether.member", "tether.metrics", "tether.server", "tether.worker")),
    ("driver", ("tether.driver",)),
    (
        "harnesses",
        ("tether.chaos", "tether.consistency.experiments", "tether.devtools", "tether.bench"),
    ),
    ("cli", ("tether.cli", "tether.__main__")),
    # The package itself is the public surface (`tether.Task`, `tether.launch`): it names the
    # layers below lazily, so importing any submodule stays as cheap as that submodule.
    ("public", ("tether",)),
]  # fmt: skip

# Siblings that must not know each other, and a subpackage that stands alone.
APART = [("tether.server", "tether.worker"), ("tether.worker", "tether.server")]
STANDALONE = ["tether.chaos.toxiproxy"]

Graph = dict[str, set[str]]


def module_names() -> dict[str, Path]:
    """Every module of the installed namespace -> its file (generated protobuf code excluded)."""
    out: dict[str, Path] = {}
    for prefix, folder in FOLDERS.items():
        root = REPO / folder
        for path in root.rglob("*.py"):
            if "_pb2" in path.name:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([prefix, *parts])
            out.setdefault(name, path)
    return out


def _resolve(name: str, known: Iterable[str]) -> str | None:
    """The longest known module that `name` (a module or `module.attribute`) refers to."""
    known = set(known)
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            hit = _resolve(target, known)
            if hit is not None and hit != module:
                found.add(hit)
    # `from tether.x import y` names both tether.x and (if a module) tether.x.y; the package
    # itself is a dependency only when nothing more precise was named
    return {m for m in found if not any(o.startswith(m + ".") for o in found) or m in _direct(tree)}


def _direct(tree: ast.Module) -> set[str]:
    """Modules imported by name (`import a.b`, `from a.b import c`), not through an attribute."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def import_graph() -> Graph:
    modules = module_names()
    known = set(modules)
    return {m: imports_of(m, p, known) for m, p in modules.items()}


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + ".") and prefix != "tether":
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    return None if best is None else best[1]


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def violations(graph: Graph) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        mine = layer_of(module)
        if mine is None:
            problems.append(f"{module} is in no layer (add it to LAYERS and DESIGN §15)")
            continue
        for target in sorted(targets):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                problems.append(
                    f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]}), "
                    "a layer above it"
                )
            for a, b in APART:
                if _under(module, a) and _under(target, b):
                    problems.append(f"{module} imports {target}: {a} and {b} stay apart")
            for alone in STANDALONE:
                if _under(module, alone) and not _under(target, alone):
                    problems.append(f"{module} imports {target}: {alone} stands alone")
    return problems


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


# -- the checker itself fails on what it must catch ---------------------------------------------


def test_a_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_a_foundation_importing_from_above_is_a_violation():
    graph = {"tether.config": {"tether.driver.launcher"}, "tether.driver.launcher": set()}
    assert violations(graph) == [
        "tether.config (foundations) imports tether.driver.launcher (driver), a layer above it"
    ]


def test_siblings_apart_and_a_standalone_subpackage():
    graph = {
        "tether.server.main": {"tether.worker.loop"},
        "tether.worker.loop": set(),
        "tether.chaos.toxiproxy.proxy": {"tether.wire"},
        "tether.wire": set(),
    }
    assert violations(graph) == [
        "tether.chaos.toxiproxy.proxy imports tether.wire: tether.chaos.toxiproxy stands alone",
        "tether.server.main imports tether.worker.loop: tether.server and tether.worker stay apart",
    ]


def test_an_unplaced_module_is_a_violation():
    assert violations({"tether.newthing": set()}) == [
        "tether.newthing is in no layer (add it to LAYERS and DESIGN §15)"
    ]


def test_relative_and_lazy_imports_are_read(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n\ndef f():\n    import p.c\n")
    known = {"p", "p.a", "p.b", "p.c"}
    assert imports_of("p.a", pkg / "a.py", known) == {"p.b", "p.c"}


# -- the repository ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph()


def test_the_graph_covers_the_code(graph):
    assert {"tether.config", "tether.server.state", "tether.driver.launcher", "tether.cli.main",
            "tether.chaos.toxiproxy.proxy"} <= set(graph)  # fmt: skip
    assert "tether.driver.spawner" in graph["tether.driver.launcher"]


def test_there_are_no_import_cycles(graph):
    assert cycles(graph) == []


def test_every_module_imports_only_its_layer_or_below(graph):
    assert violations(graph) == []

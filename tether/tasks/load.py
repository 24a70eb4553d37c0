"""Loading a task by its import spec, the same way in every process (DESIGN §11).

`path/to/file.py:NAME` loads a file (its folder joins `sys.path`, so it may import its
neighbours); `package.module:NAME` imports a module. NAME is a task instance, a class (called
with no arguments) or a factory function (called with no arguments). The driver resolves a file
path to an absolute one before writing the run config, so members started from another folder
load the same file.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import zlib
from pathlib import Path
from typing import Any

from tether.tasks.api import REQUIRED

_FORMS = "expected path/to/file.py:NAME or package.module:NAME"


def split_spec(spec: str) -> tuple[str, str]:
    """('file.py' or 'pkg.mod', 'NAME'); ValueError for anything else."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"bad --task {spec!r}: {_FORMS}.")
    return where, name


def absolute_spec(spec: str) -> str:
    """The spec with a file path made absolute (module specs are returned unchanged)."""
    where, name = split_spec(spec)
    if not where.endswith(".py"):
        return spec
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"--task {spec!r}: no such file {path}.")
    return f"{path}:{name}"


@functools.cache
def load_task(spec: str) -> Any:
    """The task object a spec names, checked for `init`, `loss` and `batch`.

    Cached per process: shards, workers and the driver's evaluator load a spec once.
    """
    where, name = split_spec(spec)
    module = _load_file(where) if where.endswith(".py") else _import(where, spec)
    try:
        obj = getattr(module, name)
    except AttributeError:
        raise ValueError(f"--task {spec!r}: {where} has no attribute {name!r}.") from None
    task = obj
    if callable(obj) and not _is_task(obj):
        try:
            task = obj()  # a class or a factory, called with no arguments
        except Exception as e:  # noqa: BLE001 - the user's code: any failure is one sentence
            raise ValueError(f"--task {spec!r}: calling {name}() failed: {e!r}.") from e
    missing = [m for m in REQUIRED if not callable(getattr(task, m, None))]
    if missing:
        raise ValueError(
            f"--task {spec!r}: {type(task).__name__} is not a task: it lacks "
            f"{', '.join(missing)} (a task defines init(key), loss(params, batch) and "
            f"batch(ctx, clock); see tether.Task)."
        )
    return task


def _is_task(obj: Any) -> bool:
    # An instance with the methods; a class has them too, but as functions to be bound.
    return not isinstance(obj, type) and all(callable(getattr(obj, m, None)) for m in REQUIRED)


def _load_file(where: str) -> Any:
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"--task: no such file {path}.")
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    # A name of its own per file, so two task files called model.py do not collide.
    module_name = f"tether_task_{zlib.crc32(str(path).encode()):08x}_{path.stem}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None  # a .py file always has a loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _import(where: str, spec: str) -> Any:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        raise ValueError(f"--task {spec!r}: cannot import {where!r} ({e}).") from None

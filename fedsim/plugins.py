"""Plug-ins: modules whose registrations a scenario can name like built-ins.

Built-in strategies and client behaviours are plug-ins too: the packages that hold them
declare themselves under the ``fedsim.plugins`` entry-point group (``pyproject.toml``),
so the engine never imports an algorithm by name, and a pip-installed package can add
its own. A scenario adds more with ``run.plugins``: dotted module names, or paths of
``.py`` files (relative to the working directory). Each is imported once per process,
in the driver and in every Ray worker, before the scenario is validated.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from importlib.metadata import entry_points
from pathlib import Path

from fedsim.errors import ScenarioError

GROUP = "fedsim.plugins"

_loaded: set[str] = set()  # entry-point values, module names and resolved file paths


def load_builtins() -> None:
    """Import every module registered under the ``fedsim.plugins`` entry-point group
    (fedsim's own strategies and client behaviours among them: a source checkout must be
    installed, ``pip install -e .``, for them to register)."""
    for ep in entry_points(group=GROUP):
        if ep.value not in _loaded:
            try:
                ep.load()
            except Exception as exc:  # an installed package's plug-in: name it, no traceback
                where = f"entry point {GROUP}:{ep.name}"
                msg = f"plug-in {ep.value!r} failed to load: {type(exc).__name__}: {exc}"
                raise ScenarioError([(where, msg)]) from None
            _loaded.add(ep.value)


def is_file(spec: str) -> bool:
    """Whether a ``run.plugins`` entry names a file (else a module)."""
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def load_plugins(specs: list[str], *, key: str = "run.plugins") -> None:
    """Import each plug-in once; a failure is a ScenarioError naming the entry."""
    load_builtins()
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        try:
            _load(spec)
        except ScenarioError:
            raise
        except Exception as exc:  # the user's code: report it, do not crash
            raise ScenarioError(
                [(where, f"plug-in {spec!r} failed to load: {type(exc).__name__}: {exc}")]
            ) from None


def _load(spec: str) -> None:
    if not is_file(spec):
        if spec not in _loaded:
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", spec):
                raise ValueError("not a module name or a .py file")
            importlib.import_module(spec)
            _loaded.add(spec)
        return
    path = Path(spec).expanduser().resolve()
    if str(path) in _loaded:
        return
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    # A name of its own per file, registered before running it, so that classes defined
    # there can be found by module (pydantic, dataclasses, pickling by reference).
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"fedsim_plugin_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _loaded.add(str(path))

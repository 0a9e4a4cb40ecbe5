"""Imports run down the layers only (DESIGN.md's data flow): a lower layer never imports
a higher one, not even lazily inside a function or under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Lowest first. A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, ...]] = [
    (
        "fedsim.errors",
        "fedsim.sections",
        "fedsim.registry",
        "fedsim.variants",
        "fedsim.rng",
        "fedsim.arrays",
        "fedsim.state",
    ),
    ("fedsim.plugins",),
    (
        "fedsim.world",
        "fedsim.data",
        "fedsim.models",
        "fedsim.client_params",
        "fedsim.strategy_params",
        "fedsim.attack_params",
        "fedsim.transforms",
        "fedsim.privacy",
        "fedsim.deploy.config",
    ),
    ("fedsim.scenario", "fedsim.reference"),
    ("strategies", "clients"),
    # (the ledger reads a whole Scenario; fedsim.deploy is the deployment engine)
    ("fedsim.engine", "fedsim.privacy.ledger", "fedsim.deploy"),
    ("fedsim.results", "fedsim.plots", "fedsim.progress"),
    # (the ServerApp that Flower's `flwr run` starts is an entry point, as the CLI is)
    ("fedsim.runner", "fedsim.cli", "fedsim.deploy.serverapp", "fedsim.__init__", "fedsim"),
]


def _layer(module: str) -> int | None:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    return layer


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.add(name)
    return out


def _sources() -> list[Path]:
    root = Path(REPO)
    return sorted(
        p for pkg in ("fedsim", "clients", "strategies") for p in (root / pkg).rglob("*.py")
    )


def test_every_module_has_a_layer():
    assert [m for m in map(_module_name, _sources()) if _layer(m) is None] == []


def test_no_import_runs_up_the_layers():
    upward = []
    for path in _sources():
        module = _module_name(path)
        own = _layer(module)
        for target in _imports(path, module):
            layer = _layer(target)
            if layer is not None and own is not None and layer > own:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    # The checker itself can fail: a lazy import of a strategy inside a function.
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from strategies import STRATEGIES\n")
    assert "strategies" in _imports(src, "fedsim.scenario")
    assert _layer("strategies") > _layer("fedsim.scenario")


def test_scenario_imports_no_algorithm_package():
    path = Path(REPO) / "fedsim" / "scenario.py"
    names = _imports(path, "fedsim.scenario")
    assert not [n for n in names if n.split(".")[0] in ("clients", "strategies")]


def test_every_package_is_in_the_wheel():
    """pyproject lists its packages by hand: a new sub-package left out of the list
    works in an editable install (the tests) and is missing from a real one."""
    import tomllib

    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {"fedsim.scenarios"}  # (scenarios/, installed as fedsim.scenarios)
    for top in ("fedsim", "strategies", "clients"):
        for init in (REPO / top).rglob("__init__.py"):
            found.add(init.parent.relative_to(REPO).as_posix().replace("/", "."))
    assert found <= listed, f"not in [tool.setuptools] packages: {sorted(found - listed)}"

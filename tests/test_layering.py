"""Imports flow one way: settings, models, store (side by side) <- indexer / service <- evaluation /
bench <- the CLI (medsearch), and no file imports itself through others.

Checked on the source (every import statement, including those inside functions and under
TYPE_CHECKING), so a lazy import that reaches back up, or closes a circle, is caught too. Imports by
name (importlib) are not seen: the CLI imports its commands with import statements for this reason.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

from tests.conftest import REPO

# What each package may import among the project's own packages.
BELOW_EVALUATION = {"settings", "models", "store", "indexer", "service"}
ALLOWED: dict[str, set[str]] = {
    "settings": set(),
    "models": set(),
    "store": set(),
    "indexer": {"settings", "models", "store"},
    "service": {"settings", "models", "store"},
    "evaluation": BELOW_EVALUATION,
    "bench": BELOW_EVALUATION,
    "medsearch": BELOW_EVALUATION | {"evaluation", "bench"},
}
PROJECT = set(ALLOWED)


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {
    _module_name(path): path for package in sorted(PROJECT) for path in sorted((REPO / package).rglob("*.py"))
}


def _known(name: str) -> str | None:
    """The project module ``name`` loads: itself, or the nearest enclosing one (``pkg.mod.Class``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported_modules(module: str) -> set[str]:
    """The project modules ``module`` imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {_known(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up from this module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found |= {_known(f"{base}.{alias.name}") or _known(base) for alias in node.names}
    return {name for name in found if name is not None and name != module}


IMPORTS: dict[str, set[str]] = {module: _imported_modules(module) for module in MODULES}


def test_the_allowed_imports_are_layers() -> None:
    # A circle between packages would make the per-package checks below meaningless.
    graphlib.TopologicalSorter(ALLOWED).prepare()


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = {
        str(MODULES[module].relative_to(REPO)): sorted(
            {m.split(".")[0] for m in imported} - ALLOWED[package] - {package}
        )
        for module, imported in IMPORTS.items()
        if module.split(".")[0] == package
    }
    assert {k: v for k, v in wrong.items() if v} == {}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_circle_between_the_files_of_a_package(package: str) -> None:
    # Between packages, the layers above already rule circles out; within one, files must be layered too.
    inside = {
        module: {m for m in imported if m.split(".")[0] == package}
        for module, imported in IMPORTS.items()
        if module.split(".")[0] == package
    }
    try:
        graphlib.TopologicalSorter(inside).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import circle: {' -> '.join(exc.args[1])}")


def test_the_checks_see_lazy_and_type_checking_imports() -> None:
    # The CLI's development commands are imported inside functions; bench's report types for annotations.
    assert {"medsearch.eval_cli", "medsearch.bench_cli", "medsearch.align_cli"} <= IMPORTS["medsearch.cli"]
    assert "bench.query_latency" in IMPORTS["bench.plot"]

"""Imports flow one way: settings <- models <- store <- indexer / service <- the CLI (medsearch).

Checked on the source (every import statement, including those inside functions), so a lazy import
that reaches back up is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# What each package may import among the project's own packages.
ALLOWED: dict[str, set[str]] = {
    "settings": set(),
    "models": set(),
    "store": {"models"},
    "indexer": {"settings", "models", "store"},
    "service": {"settings", "models", "store"},
}
PROJECT = {"settings", "models", "store", "indexer", "service", "evaluation", "bench", "medsearch"}


def _project_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & PROJECT


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = {
        str(path.relative_to(REPO)): sorted(_project_imports(path) - ALLOWED[package] - {package})
        for path in sorted((REPO / package).rglob("*.py"))
    }
    assert {k: v for k, v in wrong.items() if v} == {}

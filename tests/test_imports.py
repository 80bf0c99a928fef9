"""Every ``from slug_pl... import name`` in the package resolves, including the imports inside
functions (the demos import their builders lazily: a renamed helper broke a demo build that only
the heavy tests run)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "slug_pl"


def _imports():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("slug_pl"):
                for alias in node.names:
                    yield path.relative_to(PACKAGE.parent), node.lineno, node.module, alias.name


def test_every_package_import_resolves():
    missing = []
    for path, line, module, name in _imports():
        loaded = importlib.import_module(module)
        if not hasattr(loaded, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{path}:{line}: {module}.{name}")
    assert not missing, missing
    assert sum(1 for _ in _imports()) > 100  # the scan sees the package's imports

"""The package's layering, checked on the source (fast: nothing is imported).

- No module reaches another layer through Lightning's back doors (``trainer.lightning_module``,
  ``datamodule.trainer``) or digs through nested attributes (``getattr(getattr(``): what a piece
  needs is handed to it.
- The subpackages of ``slug_pl`` (``data``, ``evaluation``, ``families``, ``methods``, ``targets``,
  ...) import each other without a cycle at module top level (imports inside functions and under
  ``if TYPE_CHECKING:`` are not counted: they run later or never).
- The step search (``slug_pl/step_search.py``) is plain code over a judge: neither it nor any
  ``slug_pl`` module it imports at top level imports Lightning.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "slug_pl"
FORBIDDEN = ("trainer.lightning_module", "datamodule.trainer", "getattr(getattr(")
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")


def _modules(package: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module under ``package`` (a package is its ``__init__``)."""
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _top_level_imports(path: Path, name: str) -> set[str]:
    """Every module name ``path`` (the module ``name``) imports when it is loaded: the imports of its
    body, of top-level ``try`` / ``if`` blocks, but not of ``if TYPE_CHECKING:`` or of functions.
    ``from a import b`` counts both ``a`` and ``a.b``."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def _subpackage(module: str, modules: dict[str, Path]) -> str | None:
    """``data`` for ``slug_pl.data.shards`` (and for ``slug_pl.data`` itself); None for a module
    directly in ``slug_pl``."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and modules[module].name == "__init__.py"):
        return parts[1]
    return None


def forbidden_reaches(package: Path = PACKAGE) -> list[str]:
    """``file:line: text`` of every line of ``package`` that holds one of :data:`FORBIDDEN`."""
    hits = []
    for path in sorted(package.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if any(pattern in line for pattern in FORBIDDEN):
                hits.append(f"{path.relative_to(package.parent)}:{number}: {line.strip()}")
    return hits


def package_cycles(package: Path = PACKAGE) -> list[list[str]]:
    """The cycles of the subpackage graph (an edge a -> b when a module of ``a`` imports one of
    ``b`` at top level), each a sorted list of subpackages, with an example import per edge."""
    modules = _modules(package)
    edges: dict[str, dict[str, str]] = {}
    for module, path in modules.items():
        source = _subpackage(module, modules)
        if source is None:
            continue
        for imported in _top_level_imports(path, module) & modules.keys():
            target = _subpackage(imported, modules)
            if target is not None and target != source:
                edges.setdefault(source, {}).setdefault(target, f"{module} imports {imported}")
    cycles = []
    for component in _strongly_connected(edges):
        examples = [edges[a][b] for a in component for b in component if b in edges.get(a, {})]
        cycles.append(component + examples)
    return cycles


def _strongly_connected(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def lightning_imports(start: str = "slug_pl.step_search", package: Path = PACKAGE) -> list[str]:
    """``module imports lightning...`` for every ``slug_pl`` module that ``start`` loads (itself and
    what it imports at top level, transitively) and that imports Lightning at top level."""
    modules = _modules(package)
    seen, todo, found = set(), [start], []
    while todo:
        module = todo.pop()
        if module in seen or module not in modules:
            continue
        seen.add(module)
        imported = _top_level_imports(modules[module], module)
        found += [f"{module} imports {m}" for m in sorted(imported) if m.split(".")[0] in LIGHTNING]
        todo += [m for m in imported if m in modules]
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        todo += [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
    return sorted(set(found))


def test_no_module_reaches_another_layer_through_lightning_or_nested_getattr():
    hits = forbidden_reaches()
    assert not hits, "hand the object over instead of reaching for it:\n" + "\n".join(hits)


def test_the_subpackages_import_each_other_without_cycles():
    cycles = package_cycles()
    assert not cycles, "subpackage import cycles (top level):\n" + "\n".join(map(str, cycles))


def test_the_step_search_imports_no_lightning():
    found = lightning_imports()
    assert not found, "\n".join(found)
    assert (PACKAGE / "step_search.py").is_file()


def test_the_checks_see_what_they_look_for(tmp_path):
    """Each check finds a planted violation (so a passing check means something)."""
    package = tmp_path / "slug_pl"
    for sub in ("a", "b"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "a" / "x.py").write_text("from slug_pl.b.y import thing\n")
    (package / "b" / "y.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    from slug_pl.a import x\n"
                                        "def f():\n    from slug_pl.a import x\nthing = 1\n")
    assert package_cycles(package) == []  # TYPE_CHECKING and function imports do not count
    (package / "b" / "y.py").write_text("from slug_pl.a import x\nthing = 1\n")
    assert package_cycles(package)[0][:2] == ["a", "b"]
    (package / "step_search.py").write_text("from slug_pl.b.y import thing\n")
    assert lightning_imports("slug_pl.step_search", package) == []
    (package / "b" / "__init__.py").write_text("from lightning.pytorch import Trainer\n")
    assert lightning_imports("slug_pl.step_search", package)[0] == "slug_pl.b imports lightning.pytorch"
    (package / "a" / "z.py").write_text("m = trainer.lightning_module\nn = getattr(getattr(m, 'a'), 'b')\n")
    assert [h.split(":")[1] for h in forbidden_reaches(package)] == ["1", "2"]
    assert re.search(r"a/z\.py:1: m = trainer\.lightning_module", forbidden_reaches(package)[0])

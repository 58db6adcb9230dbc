"""Layering: no module of lancet imports a package that comes later in the flow (function-level imports too)."""

from __future__ import annotations

import ast
from pathlib import Path

ORDER = ["moe", "models", "step", "capture", "graph", "cost", "sim", "passes", "plan", "runtime", "measure", "app"]
SAME_AS = {"losses": "moe", "integrations": "app"}
"""Top-level modules and packages that sit at a layer of the order (integrations of other libraries: with app)."""
EXEMPT = {"lancet", "lancet.api", "lancet.__main__"}
"""The public API and the entry point sit on top, with app."""
FOUNDATION = {"lancet.graph.meta"}
"""Leaf modules (they import nothing from lancet) that any layer may import: the node-metadata schema, which the
layers that trace (moe, step, capture) write and the later ones read."""
ALLOWED: dict[tuple[str, str], str] = {}
"""(importer, imported module) -> why this one crossing is tolerated."""

SRC = Path(__file__).resolve().parents[2] / "src"


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "lancet" or len(parts) < 2:
        return None
    package = SAME_AS.get(parts[1], parts[1])
    return ORDER.index(package) if package in ORDER else None


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "lancet").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """Modules ``path`` imports: ``from a.b import c`` counts as ``a.b.c`` when that is a module, else ``a.b``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.append((full if full in modules else node.module, node.lineno))
    return out


def test_no_module_imports_a_later_layer():
    modules = _modules()
    violations = []
    for name, path in modules.items():
        own = _layer(name)
        if name in EXEMPT or own is None:
            continue
        for imported, line in _imports(path, modules):
            if imported in FOUNDATION or (name, imported) in ALLOWED:
                continue
            other = _layer(imported)
            if other is not None and other > own:
                violations.append(f"{path.relative_to(SRC)}:{line}: {name} imports {imported}")
    assert violations == [], "\n".join(violations)


def test_every_package_has_a_layer():
    unplaced = {name.split(".")[1] for name in _modules() if name not in EXEMPT | FOUNDATION and "." in name
                and _layer(name) is None}
    assert unplaced == set(), f"packages with no place in the layer order: {sorted(unplaced)}"


def test_foundation_modules_import_nothing_from_lancet():
    modules = _modules()
    for name in FOUNDATION:
        assert [i for i, _ in _imports(modules[name], modules) if i.startswith("lancet")] == [], name

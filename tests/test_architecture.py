"""The import graph of graviton_serve/ and handlers/ has no cycle: every dependency goes one way.

Modules are found by walking the folders (not a fixed list), and every import statement counts,
wherever it is: at the top, inside a function (a lazy import only hides a cycle) or under
TYPE_CHECKING. ``from package import name`` depends on the module ``package.name`` where there is
one, else on the package itself; ``importlib.import_module`` calls are not followed.
"""

from __future__ import annotations

import ast
from pathlib import Path

from graviton_serve.paths import ROOT

PACKAGES = ("graviton_serve", "handlers")


def module_files(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``packages`` (a package is its __init__.py)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules among ``modules`` that ``module``'s file imports anywhere in it."""
    is_package = path.name == "__init__.py"
    targets = set()

    def nearest(name: str) -> None:  # the module itself, else the package it is an attribute of
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            targets.add(name)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                nearest(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join([*package[:len(package) - (node.level - 1)], *([base] if base else [])])
            for alias in node.names:
                nearest(f"{base}.{alias.name}")
    return targets - {module}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules among ``modules`` it imports."""
    return {module: imported_modules(module, path, modules) for module, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_among_our_modules():
    modules = module_files()
    assert {name.split(".")[0] for name in modules} == set(PACKAGES)  # the walk found both packages
    graph = import_graph(modules)
    found = cycles(graph)
    assert not found, "import cycles; within each, who imports whom:\n" + "\n".join(
        "; ".join(f"{module} -> {', '.join(sorted(graph[module] & set(cycle)))}" for module in cycle)
        for cycle in found)


def test_the_check_sees_lazy_type_checking_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from pkg import a\n")  # depends on a, nothing depends on d
    graph = import_graph(module_files(tmp_path, ("pkg",)))
    assert graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


# What docs/architecture.md promises a reader: one request's path in a file read at one sitting,
# and no module so long that its jobs hide in it.
LINE_LIMITS = {"handlers/lifecycle.py": 200, "handlers/*.py": 250, "graviton_serve/**/*.py": 300}
GENERATED = "grpc_stubs"  # graviton_serve/grpc_stubs/: protoc's output, git-ignored


def test_no_module_is_longer_than_its_limit():
    too_long = []
    for pattern, limit in LINE_LIMITS.items():
        for path in sorted(ROOT.glob(pattern)):
            if GENERATED in path.parts:
                continue
            lines = len(path.read_text().splitlines())
            if lines > limit:
                too_long.append(f"{path.relative_to(ROOT)}: {lines} lines > {limit}")
    assert not too_long, "\n".join(too_long)


def test_the_settings_schema_and_launch_path_import_no_torch():
    # The launch path (scripts/serve, the container's main) reads these before any worker starts,
    # and a settings error must not cost a torch import.
    import subprocess
    import sys

    code = ("import sys, handlers.settings, handlers.launch, handlers.cpu_features; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0

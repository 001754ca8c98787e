"""The layers of the house: the library never imports Prefect, flows/ or tasks/, and no module of
`weightsmith` imports itself back through others (function-level and TYPE_CHECKING imports
included: every import statement in the source counts, wherever it stands)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "weightsmith"
FORBIDDEN = ("prefect", "prefect_aws", "prefect_dask", "flows", "tasks", "weightsmith_flows", "weightsmith_tasks")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import statement in the file; `from a import b` gives
    a.b when that is a module of ours, else a."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in MODULES else base))
    return found


def test_the_walk_sees_function_level_and_type_checking_imports(tmp_path):
    path = PACKAGE / "space.py"  # imports weightsmith.sources only under TYPE_CHECKING
    assert "weightsmith.sources" in {m for _, m in imports(path)}, "the walk missed a TYPE_CHECKING import"
    path = PACKAGE / "cli" / "common.py"  # imports flows inside a function
    assert "weightsmith_flows" in {m for _, m in imports(path)}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith("weightsmith.cli")))
def test_the_library_imports_no_prefect_flows_or_tasks(name):
    bad = [
        f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: import {module}"
        for line, module in imports(MODULES[name])
        if module.split(".")[0] in FORBIDDEN
    ]
    assert not bad, bad


def test_no_import_cycles_in_the_package():
    graph = {
        name: sorted({m for _, m in imports(path) if m in MODULES and m != name}) for name, path in MODULES.items()
    }
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_pyproject_lists_every_package():
    import tomllib

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    tree = sorted(".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py"))
    assert sorted(config["packages"]) == sorted([*tree, "weightsmith_flows", "weightsmith_tasks"])
    assert config["package-dir"] == {"weightsmith_flows": "flows", "weightsmith_tasks": "tasks"}

"""The layering of ARCHITECTURE.md, checked on the source: no import cycles, no import running up a layer.

Every import statement counts, also those inside functions and under
``TYPE_CHECKING``: a cycle hidden in a function body is still a cycle a reader
has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "surgeon"

# What each layer may import from inside surgeon (prefixes). Anything not listed is refused.
SHARED = ("surgeon.errors", "surgeon.progress", "surgeon.provenance")
ALLOWED = {
    "surgeon.ops": ("surgeon.ops",),
    "surgeon.report": ("surgeon.report", "surgeon.errors"),
    "surgeon.parallel": ("surgeon.parallel", "surgeon.errors"),
    "surgeon.io": ("surgeon.io", "surgeon.ops", *SHARED),
    "surgeon.workflows": ("surgeon.workflows", "surgeon.io", "surgeon.ops", "surgeon.report", "surgeon.parallel", *SHARED),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The surgeon modules ``path`` imports (``from a import b`` names ``a.b`` when that is a module)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "surgeon")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "surgeon":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in sorted(graph.items()):
        layer = next((prefix for prefix in ALLOWED if name == prefix or name.startswith(prefix + ".")), None)
        if layer is None:
            continue
        for target in sorted(targets):
            if target == "surgeon" and layer in ("surgeon.io", "surgeon.workflows"):
                continue  # the package root holds only __version__
            if not any(target == ok or target.startswith(ok + ".") for ok in ALLOWED[layer]):
                bad.append(f"{name} imports {target}")
    return bad


def test_the_source_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_workflow_packages_depend_one_way():
    """Between capability folders too (merge -> spectral and spectral -> merge would be a knot)."""
    packages: dict[str, set[str]] = {}
    for name, targets in import_graph().items():
        if name.startswith("surgeon.workflows."):
            top = ".".join(name.split(".")[:3])
            packages.setdefault(top, set()).update(
                ".".join(t.split(".")[:3]) for t in targets if t.startswith("surgeon.workflows."))
    for top, deps in packages.items():
        deps.discard(top)
    assert cycles(packages) == []


def test_no_import_runs_up_a_layer():
    assert layer_violations(import_graph()) == []


def test_every_module_is_in_a_layer_or_shared():
    top = {"surgeon", "surgeon.__main__", *SHARED}
    homeless = [n for n in all_modules() if n not in top
                and not any(n == p or n.startswith(p + ".") for p in (*ALLOWED, "surgeon.cli"))]
    assert homeless == []


@pytest.mark.parametrize("source, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_cycle_finder_finds_cycles(source, expected):
    assert cycles(source) == expected


def test_the_layer_check_catches_an_upward_import():
    graph = {"surgeon.ops.svd": {"surgeon.io.checkpoint"}, "surgeon.io.writer": {"surgeon.workflows.merge.run"},
             "surgeon.workflows.merge.run": {"surgeon.cli.main"}, "surgeon.report.html": {"surgeon.workflows.demo"}}
    assert layer_violations(graph) == [
        "surgeon.io.writer imports surgeon.workflows.merge.run",
        "surgeon.ops.svd imports surgeon.io.checkpoint",
        "surgeon.report.html imports surgeon.workflows.demo",
        "surgeon.workflows.merge.run imports surgeon.cli.main",
    ]


def test_the_graph_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "surgeon" / "ops"
    src.mkdir(parents=True)
    f = src / "m.py"
    f.write_text("def g():\n    from surgeon.io import checkpoint\n", encoding="utf-8")
    assert imports_of(f, "surgeon.ops.m", {"surgeon.io.checkpoint": f}) == {"surgeon.io.checkpoint"}

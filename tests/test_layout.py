"""The package's layering: the data layer knows no model (no import from data/ into stages/ or tasks/),
and no module imports itself back through others (function-level imports included)."""

from __future__ import annotations

import ast

from tests.conftest import ROOT


def _import_graph() -> dict[str, set[str]]:
    package = ROOT / "ldm_lab"
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ldm_lab"):
                imported.add(node.module)
                imported |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def test_the_data_layer_imports_no_stage_or_task():
    graph = _import_graph()
    assert len(graph) > 40
    crossing = [(m, d) for m, deps in graph.items() for d in deps
                if m.startswith("ldm_lab.data") and d.startswith(("ldm_lab.stages", "ldm_lab.tasks"))]
    assert crossing == []


def test_no_import_cycle():
    graph = _import_graph()
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_tasks_are_thin_and_import_no_other_task():
    """Library code (export, sampling, loading) lives in the package; a task module imports only the
    shared builders (tasks/build.py), and only the dispatcher (tasks/__init__.py) imports the tasks."""
    graph = _import_graph()
    tasks = {m for m in graph if m.startswith("ldm_lab.tasks.") and m != "ldm_lab.tasks.build"}
    assert len(tasks) >= 9
    assert [(m, d) for m in tasks for d in graph[m] if d in tasks] == []
    assert all(d not in tasks for m, deps in graph.items() if not m.startswith("ldm_lab.tasks") for d in deps)

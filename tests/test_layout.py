"""The package's layering: the data layer knows no model (no import from data/ into stages/ or tasks/),
networks, losses and diffusion know no stage or Lightning, tasks know no stage class, no module imports
itself back through others (function-level imports included), and each task's options live in its own
conf/task/ file."""

from __future__ import annotations

import ast
import re

import pytest

from ldm_lab.config.validate import ConfigError, check_task_options
from ldm_lab.tasks import TASKS
from tests.conftest import CONF, ROOT


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


def _external_imports(module: str) -> set[str]:
    path = ROOT / (module.replace(".", "/") + ".py")
    path = path if path.is_file() else path.with_suffix("") / "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
    return names


def test_networks_losses_and_diffusion_are_pure():
    """nn/, losses/ and diffusion/ import no stage, no task and no Lightning (ldm_lab/io/model_sources.py loads models)."""
    graph = _import_graph()
    pure = [m for m in graph if m.startswith(("ldm_lab.nn", "ldm_lab.losses", "ldm_lab.diffusion"))]
    assert len(pure) >= 10
    assert [(m, d) for m in pure for d in graph[m] if d.startswith(("ldm_lab.stages", "ldm_lab.tasks"))] == []
    assert [m for m in pure if "lightning" in _external_imports(m)] == []


def test_tasks_know_no_stage_class():
    """A task builds or loads a stage (stages/build.py) and calls the methods of its interface (stages/base.py), or
    fills the latent cache as a stage does (stages/encoding.py): it imports no stage class to test a type against,
    so a new stage is one new class."""
    graph = _import_graph()
    tasks = [m for m in graph if m.startswith("ldm_lab.tasks")]
    interface = ("ldm_lab.stages.build", "ldm_lab.stages.base", "ldm_lab.stages.encoding")
    assert [(m, d) for m in tasks for d in graph[m]
            if d.startswith("ldm_lab.stages") and not d.startswith(interface)] == []


# The folders of ldm_lab/ from the ground up (docs/architecture.md): a folder imports only from lower rows.
LAYERS = [("core",), ("nn",), ("losses", "data", "diffusion"), ("evaluation", "io", "config"), ("stages",),
          ("callbacks",), ("tasks",)]


def test_folders_import_only_from_lower_layers():
    graph = _import_graph()
    level = {folder: row for row, folders in enumerate(LAYERS) for folder in folders}
    packages = {p.name for p in (ROOT / "ldm_lab").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(level), packages ^ set(level)
    upward = sorted((module, dep) for module, deps in graph.items() for dep in deps
                    if module.count(".") > 1 and dep.count(".") > 1 and module.split(".")[1] != dep.split(".")[1]
                    and level[dep.split(".")[1]] >= level[module.split(".")[1]])
    assert upward == []


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
    """Library code (export, sampling, loading) lives in the package; a task module imports only the shared
    builders (tasks/trainer.py) and its own helpers, and only the dispatcher (tasks/__init__.py) imports the tasks."""
    graph = _import_graph()
    tasks = {f"ldm_lab.tasks.{task}" for task in TASKS}
    assert len(tasks) >= 9
    assert [(m, d) for m in tasks for d in graph[m] if d in tasks] == []
    assert all(d not in tasks for m, deps in graph.items() if not m.startswith("ldm_lab.tasks") for d in deps)


def test_each_task_composes_with_its_own_options_only(compose_cfg):
    """conf/task/<task>.yaml holds a task's options: a run holds its task's options and the shared sampling
    options (train's preview grid draws as task=sample does), not another task's."""
    tasks = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
    assert tasks == sorted(TASKS)
    owned = {"evaluate": ("evaluate", "ema_sweep"), "ema_sweep": ("ema_sweep",), "plan": ("plan",),
             "convert": ("convert",), "sweep_dir": ("report",), "overwrite": ("train",)}
    for task in tasks:
        cfg = compose_cfg([f"task={task}", "model=unet_tiny"], tiny=False)
        assert cfg.task == task
        assert {key for key, owner in owned.items() if key in cfg} == {k for k, o in owned.items() if task in o}
        assert ("model" in cfg.sample) == (task == "sample")
        assert cfg.callbacks.image_logger.sampling.num_inference_steps == cfg.sample.num_inference_steps == 50


def test_another_tasks_option_is_refused_with_its_task():
    check_task_options(["task=evaluate", "evaluate.num_samples=64", "sample.num_images=4"], CONF)
    check_task_options(["sample.num_images=4", "overwrite=true"], CONF)  # task=train is the default
    check_task_options(["task=ema_sweep", "evaluate.num_samples=64", "ema_sweep.run=x"], CONF)  # it measures as evaluate
    with pytest.raises(ConfigError, match="evaluate.num_samples: an option of task=evaluate .* this run is task=train"):
        check_task_options(["evaluate.num_samples=64"], CONF)
    with pytest.raises(ConfigError, match="sample.model: an option of task=sample .* add task=sample"):
        check_task_options(["task=evaluate", "sample.model=x"], CONF)
    with pytest.raises(ConfigError, match="^plan: an option of task=plan"):
        check_task_options(["task=train", "plan={budget_gb:6}"], CONF)


def test_the_package_root_holds_no_loose_modules():
    """Modules live in the package that says what they are for (issue 22): io, evaluation, config, ..."""
    loose = sorted(p.name for p in (ROOT / "ldm_lab").glob("*.py") if p.name != "__init__.py")
    assert loose == []


def test_the_documented_layout_matches_the_tree():
    """Every package of ldm_lab/ has its line in docs/architecture.md's layout, and every module a line names exists
    there."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    entries, current = {}, None
    for line in block.splitlines():
        if line and not line.startswith(" "):
            current = line.split()[0]
            entries[current] = line[len(current):]
        elif current:
            entries[current] += line
    packages = {f"ldm_lab/{p.name}/" for p in (ROOT / "ldm_lab").iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(entries), sorted(packages - set(entries))
    named = [(entry, module) for entry, words in entries.items() if entry.startswith("ldm_lab/")
             for module in re.findall(r"(?<![/\w])(\w+\.py)\b", words)]  # not a path elsewhere
    assert len(named) > 20
    assert [(entry, module) for entry, module in named if not (ROOT / entry / module).is_file()] == []

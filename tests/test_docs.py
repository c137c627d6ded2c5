"""Every ``python run.py ...`` line of README.md and docs/*.md composes and passes the checks run.py makes before a
run (group choices, another task's options, moved keys, value ranges, devices), placeholders such as ``<run>``
standing for a path: a page cannot drift from the code. Nothing is built or trained."""

from __future__ import annotations

import itertools
import re
import shlex

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ldm_lab.config.schema import register_configs
from ldm_lab.config.validate import check_config, check_group_choices, check_moved_keys, check_task_options
from tests.conftest import CONF, ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLAGS = {"-m", "--multirun"}


def _commands(text: str) -> list[str]:
    """The ``python run.py`` lines of a page's fenced code blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#(?!SBATCH).*$", "", line)
            if "python run.py" in line:
                commands.append(line[line.index("python run.py") + len("python run.py"):].strip())
    return commands


COMMANDS = [(page.relative_to(ROOT).as_posix(), command) for page in PAGES for command in _commands(page.read_text())]


def _runs(command: str, placeholder: str) -> list[list[str]]:
    """The overrides of each run a command starts: placeholders as a path, a multirun's lists expanded."""
    words = shlex.split(re.sub(r"<[^>]*>", placeholder, command).replace("...", "run"))
    words = [w for w in words if "=" in w]  # flags (-m, --cfg job) and placeholders standing for overrides
    choices = [[f"{key}={value}" for value in values.split(",")] if not re.search(r"[\[{]", values) else [word]
               for word in words for key, _, values in [word.partition("=")]]
    return [list(run) for run in itertools.product(*choices)]


def test_the_pages_have_commands():
    pages = {page for page, _ in COMMANDS}
    assert len(COMMANDS) > 40 and {"README.md", "docs/configuration.md", "docs/latent_diffusion.md"} <= pages


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_documented_command_composes_and_passes_the_checks(page, command, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # a line that asks for GPUs is read on a GPU machine
    register_configs()
    for overrides in _runs(command, str(tmp_path / "run")):
        check_group_choices(overrides, CONF)
        check_task_options(overrides, CONF)
        check_moved_keys(overrides)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        check_config(cfg)

"""Every command README.md shows is a valid command: each `python -m kd_lightning ...` composes
(every override names a real key or group), each module CLI knows every flag shown, and each
`make` target exists. The commands themselves run elsewhere: the experiments one batch per step kind
in test_configs.py, the report / explain / export CLIs in their own tests."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kd_lightning.conf_path import config_dir
from tests.cli import ROOT, cli_env

README = (ROOT / "README.md").read_text()
EXPERIMENT_READMES = sorted((ROOT / "experiments").rglob("README.md"))


def _commands(text: str) -> list[str]:
    """Commands in code blocks (a trailing backslash continues a line) and inline code spans
    (inline spans may wrap over lines)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = re.sub(r"\\\n\s*", " ", block)
        found += [line.split("#")[0].strip() for line in block.splitlines()]
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        found.append(" ".join(span.split()))
    return [c for c in found if c.startswith(("python -m kd_lightning", "make "))]


COMMANDS = _commands(README)
# The experiments' READMEs show the commands that produced their results: those must compose too.
EXPERIMENT_COMMANDS = sorted({c for r in EXPERIMENT_READMES for c in _commands(r.read_text())})


def test_readme_shows_the_main_commands() -> None:
    assert "make demo" in COMMANDS and "make test" in COMMANDS
    assert any(c.startswith("python -m kd_lightning.report") for c in COMMANDS)
    assert len(COMMANDS) >= 15


def test_experiment_readmes_show_their_commands() -> None:
    assert len(EXPERIMENT_READMES) >= 8
    assert (
        sum(c.startswith("python -m kd_lightning +experiment=") for c in EXPERIMENT_COMMANDS) >= 10
    )


def _shown(pattern: str) -> list[str]:
    """Every command of README.md and the experiments' READMEs that matches `pattern`, once."""
    return sorted({c for c in COMMANDS + EXPERIMENT_COMMANDS if re.match(pattern, c)})


@functools.cache
def _help(module: str) -> subprocess.CompletedProcess:
    """`python -m MODULE --help`, run once per module however many commands show it."""
    return subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )


@pytest.mark.parametrize("command", _shown(r"python -m kd_lightning( |$)"))
def test_training_command_composes(command: str, tmp_path: Path) -> None:
    # Placeholders (<run>, <methods_cpu>, a trailing ...) stand for a run directory the user has.
    args = [a for a in shlex.split(command)[3:] if a != "-m"]
    args = [re.sub(r"<[a-z_]+>|\.\.\.$", "x", a) for a in args]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args)
    assert cfg.task and cfg.name


@pytest.mark.parametrize("command", _shown(r"python -m kd_lightning\.\w+"))
def test_module_cli_knows_every_flag_shown(command: str) -> None:
    module = shlex.split(command)[2]
    proc = _help(module)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in re.findall(r"(--[a-z][a-z-]+)", command):
        assert flag in proc.stdout, (module, flag)


def test_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for command in (c for c in COMMANDS if c.startswith("make ")):
        target = command.split()[1]
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), target

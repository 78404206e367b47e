"""The `bench` command line: every command listed, each loaded only when used, --help without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from bench.cli import COMMANDS, app, load_command

REPO = Path(__file__).resolve().parent.parent


def test_help_lists_every_command_with_its_line():
    assert list(COMMANDS) == ["train", "max-batch", "eval", "grids", "run", "status", "report", "data"]
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0, res.output
    listed = [line.strip("│ ").split()[0] for line in res.output.splitlines() if line.startswith("│ ")]
    assert [name for name in listed if name in COMMANDS] == list(COMMANDS)
    flat = " ".join(res.output.replace("│", " ").split())  # help lines wrap inside the panel
    for entry in COMMANDS.values():
        assert entry.help in flat


def test_each_help_line_is_the_commands_own():
    # COMMANDS repeats each command's first docstring paragraph so that --help imports nothing; keep them equal
    for name, entry in COMMANDS.items():
        cmd = load_command(name)
        own = " ".join((cmd.help or "").split("\n\n")[0].split())
        assert own == entry.help, name


def test_help_imports_no_torch_and_no_command_module():
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "bench.cli", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "train" in res.stdout and "report" in res.stdout
    # stderr lines: "import time: <self us> | <cumulative us> | <indent><module>"
    modules = [line.rsplit("|", 1)[1].strip() for line in res.stderr.splitlines()
               if line.startswith("import time:") and line.count("|") == 2]
    assert "typer" in modules and "bench" in modules  # the parse found the imports
    heavy = [m for m in modules if m == "torch" or m.startswith("torch.")]
    assert heavy == [], heavy[:5]
    commands = [m for m in modules if m.startswith(("bench.cmd_", "bench.report", "ddnet"))]
    assert commands == [], commands


def test_a_command_and_a_sub_app_load_when_used():
    runner = CliRunner()
    res = runner.invoke(app, ["data", "synth", "--help"])
    assert res.exit_code == 0, res.output
    assert "--out" in res.output and "--val-frac" in res.output
    res = runner.invoke(app, ["grids", "--help"])
    assert res.exit_code == 0 and "List the grids" in res.output


def test_an_unknown_command_suggests_the_close_one():
    res = CliRunner().invoke(app, ["tran"])
    assert res.exit_code == 2
    assert "No such command 'tran'" in res.output and "Did you mean 'train'?" in res.output
